"""torchft's fault-tolerant DiLoCo with a Tapestry rule for its outer step (``torchft >= 0.2, < 0.3``).

    from tapestry.integrations.torchft import TapestryManager
    manager = TapestryManager(pg=ProcessGroupGloo(), min_replica_size=2, use_async_quorum=False,
                              load_state_dict=..., state_dict=..., rule="trimmed_mean",
                              rule_params={"f": 1}, codec=None, ...)   # every other Manager argument
    with DiLoCo(manager, [model], inner_opt, outer_opt, sync_every=50):
        ...                                            # the training loop is unchanged

torchft has no aggregation hook: :class:`TapestryManager` is torchft's ``Manager`` (quorum,
Lighthouse, healing, commit vote, all unchanged) with ``allreduce(tensor, reduce_op=AVG)`` replaced.
Every average it is asked for is deferred until one of the returned works is waited on; then all
tensors requested since the last wait (for DiLoCo: the whole pseudo-gradient of the fragment being
synchronised) go through ONE robust all-reduce over the manager's cross-replica process group, so
distance rules (Krum, Bulyan, NNM, geometric median) see whole pseudo-gradients, not one parameter
at a time. Every replica group gets ``rule(pseudo-gradients of the participating groups)``.

Participation: a replica group contributes a row only when torchft says it participates
(``Manager.is_participating()``: not a spare, not healing) and it did not heal in the current quorum
(a healed group's pseudo-gradient is a copy of its recovery source's, or zero: torchft counts it in
its average, Tapestry leaves it out). The rows are in replica rank order. Any failure (a peer
died, a timeout, a rule whose requirements the current quorum does not meet) is reported with
``Manager.report_error`` so ``should_commit()`` is False on every group and DiLoCo discards the step.

``reduce_op`` other than ``AVG`` goes to torchft's own allreduce. ``should_quantize`` is ignored:
``codec`` ("fp16", "bf16", "int8", "int4") compresses instead. See docs/torchft.md for what this
relies on in torchft.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from datetime import timedelta
from typing import Any

import torch

SUPPORTED = ">=0.2,<0.3"


def _check_torchft_version(version: str) -> None:
    parts = version.split(".")
    try:
        major, minor = int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        major, minor = -1, -1
    if not (0, 2) <= (major, minor) < (0, 3):
        raise ImportError(f"tapestry.integrations.torchft needs torchft {SUPPORTED} (it subclasses torchft's Manager "
                          f"and relies on its allreduce/quorum/commit behaviour, see docs/torchft.md); found torchft "
                          f"{version}")


try:
    _check_torchft_version(importlib.metadata.version("torchft"))
    import torch.distributed as dist
    from torch.distributed import ReduceOp
    from torch.distributed.distributed_c10d import AllgatherOptions
    from torchft.manager import Manager
except importlib.metadata.PackageNotFoundError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"tapestry.integrations.torchft needs the torchft package (pip install 'torchft{SUPPORTED}')") from exc

from ..aggregators import Rule, make_rule  # noqa: E402  (after the torchft version check)
from ..aggregators.base import AggregationInfo  # noqa: E402  (after the torchft version check)
from ..distributed.allreduce import all_reduce as _all_reduce  # noqa: E402  (after the torchft version check)

logger = logging.getLogger(__name__)


class _Work(dist._Work):
    """The Work :meth:`TapestryManager.allreduce` returns: waiting on it runs the deferred robust
    all-reduce (once for all pending tensors); like torchft's own works it never raises."""

    def __init__(self, manager: TapestryManager | None, tensor: torch.Tensor) -> None:
        super().__init__()
        self._manager = manager
        self.tensor = tensor
        self.ok = manager is None
        self.future: torch.futures.Future = torch.futures.Future()
        if manager is None:                    # nothing to do (the manager had already errored)
            self.future.set_result(tensor)

    def wait(self, timeout: Any = None) -> bool:
        if self._manager is not None:
            self._manager._flush()
        return self.ok

    def synchronize(self) -> None:
        self.wait()

    def block_current_stream(self, timeout: Any = None) -> None:
        self.wait()

    def get_future(self) -> torch.futures.Future:
        return self.future


class _Group:
    """The manager's process group with the right ``rank()``: torchft's reconfigurable groups
    report rank 0 on every rank (they never override ``rank()``), so the rank is discovered once
    per all-reduce by an all-gather of per-manager random tokens."""

    def __init__(self, pg: Any, rank: int) -> None:
        self._pg, self._rank = pg, rank

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._pg.size()

    def allgather(self, outputs: list, inputs: list, opts: Any = None):
        # torchft's groups need the options argument that torch's own groups default
        return self._pg.allgather(outputs, inputs, AllgatherOptions() if opts is None else opts)

    def __getattr__(self, name: str) -> Any:         # the collectives themselves: alltoall_base, allgather, ...
        return getattr(self._pg, name)


def _all_gather(pg: Any, t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(pg.size())]
    pg.allgather([out], [t], AllgatherOptions()).wait()
    return out


class TapestryManager(Manager):
    """torchft's ``Manager`` whose averaging allreduce is a Tapestry robust all-reduce.

    ``rule``: a rule name (see :data:`tapestry.aggregators.RULES`, with ``rule_params``) or a
    :class:`~tapestry.aggregators.Rule`. ``codec``: None (float32 rows) or a codec name; each
    replica group's row is then the decoded encoding of its pseudo-gradient. Every other argument
    is torchft's ``Manager``'s. After each robust all-reduce, ``last_info`` holds the rule's
    diagnostics (positions in ``last_replicas``, the replica ranks whose rows were aggregated).
    """

    def __init__(self, *args: Any, rule: str | Rule, rule_params: dict | None = None, codec: str | None = None,
                 **kwargs: Any) -> None:
        if isinstance(rule, str):
            rule = make_rule(rule, **(rule_params or {}))
        elif rule_params:
            raise TypeError("rule_params goes with a rule name; a Rule object already holds its parameters")
        if not isinstance(rule, Rule):
            raise TypeError(f"rule must be a rule name or a tapestry Rule, got {type(rule).__name__}")
        pg = kwargs["pg"] if "pg" in kwargs else (args[0] if args else None)
        if pg is None:
            raise TypeError("TapestryManager needs the cross-replica process group (pg=...), as torchft's Manager does")
        super().__init__(*args, **kwargs)
        self.rule, self.codec = rule, codec
        self._tp_pg = pg
        self._tp_timeout = kwargs.get("timeout", timedelta(seconds=60)).total_seconds()
        self._tp_token = int.from_bytes(os.urandom(7), "little")  # identifies this rank in the gather
        self._tp_pending: list[_Work] = []
        self._tp_healed = False
        self.last_info: AggregationInfo | None = None
        self.last_replicas: list[int] = []

    # -- torchft hooks -------------------------------------------------------------------------
    def start_quorum(self, *args: Any, **kwargs: Any) -> None:
        self._flush()                          # works nobody waited on still run, in the same order everywhere
        self._tp_healed = False
        super().start_quorum(*args, **kwargs)

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        # torchft calls this while healing (with the recovery source's step): this group's
        # pseudo-gradient of this quorum is then not its own work.
        self._tp_healed = True
        super().load_state_dict(state_dict)

    def should_commit(self, *args: Any, **kwargs: Any) -> bool:
        self._flush()
        return super().should_commit(*args, **kwargs)

    def allreduce(self, tensor: torch.Tensor, should_quantize: bool = False, reduce_op: ReduceOp = ReduceOp.AVG):
        if reduce_op != ReduceOp.AVG:
            return super().allreduce(tensor, should_quantize=should_quantize, reduce_op=reduce_op)
        if not torch.is_floating_point(tensor):
            raise ValueError(f"a robust average needs a floating-point tensor, got {tensor.dtype}")
        if self.errored():
            return _Work(None, tensor)
        self.wait_quorum()
        work = _Work(self, tensor)
        self._tp_pending.append(work)
        return work

    # -- the robust all-reduce -----------------------------------------------------------------
    def _flush(self) -> None:
        pending, self._tp_pending = self._tp_pending, []
        if not pending:
            return
        tensors = [w.tensor for w in pending]
        ok = True
        try:
            self._robust_all_reduce(tensors)
        except Exception as e:  # noqa: BLE001 - torchft's contract: report, never raise
            logger.exception("tapestry robust all-reduce failed; the step will not be committed: %s", e)
            self.report_error(e)
            for t in tensors:                  # torchft zeroes what it cannot trust
                t.zero_()
            ok = False
        for w in pending:
            w.ok = ok
            w.future.set_result(w.tensor)

    def _robust_all_reduce(self, tensors: list[torch.Tensor]) -> None:
        pg = self._tp_pg
        participate = self.is_participating() and not self._tp_healed
        # one small all-gather: who is who (torchft's groups report rank 0 everywhere) and who
        # contributes a row (all_reduce checks everything else before any large transfer)
        meta = torch.tensor([self._tp_token, int(participate)], dtype=torch.int64)
        metas = torch.stack(_all_gather(pg, meta))
        tokens = metas[:, 0].tolist()
        if len(set(tokens)) != len(tokens):
            raise RuntimeError("two ranks of the replica process group drew the same token; retry the step")
        rank = tokens.index(self._tp_token)
        update = {str(i): t.detach() for i, t in enumerate(tensors)}
        agg, info = _all_reduce(update, self.rule, codec=self.codec, group=_Group(pg, rank), participate=participate,
                                seed=self.current_step(), timeout=self._tp_timeout, return_info=True)
        with torch.no_grad():
            for i, t in enumerate(tensors):
                t.copy_(agg[str(i)].reshape(t.shape))
        self.last_info = info
        self.last_replicas = [r for r, flag in enumerate(metas[:, 1].tolist()) if flag]
