"""Robust all-reduce: every rank is one participant, and every rank gets the same robust aggregate.

    agg = tapestry.distributed.all_reduce(pseudo_grad, tp.TrimmedMean(f=1), codec="int8")

Three steps, for the bytes of a plain ring all-reduce (about ``2 d (n-1)/n`` values sent per rank):

1. **reduce-scatter by coordinates**: the ``d`` coordinates are cut into ``n`` contiguous shards;
   rank ``j`` receives shard ``j`` of every participant's update (one ``alltoall``), encoded on
   the wire when ``codec`` is given and decoded inside the fused aggregation kernels;
2. **the rule on the shard**: per-coordinate rules need nothing more; distance-based and iterative
   rules sum their small float64 per-participant partials (Gram matrix, distances, flags) over the
   ranks, in rank order on every rank, so every rank selects the same participants;
3. **all-gather** of the aggregated shards (encoded too with a codec).

Before any large transfer the ranks exchange one small status record each (update size, dtypes,
parameter names and shapes, rule, codec, weight, or the error that stopped a rank) and every rank
raises the same ``ValueError`` when they disagree. Every collective waits at most ``timeout``
seconds: a rank that died or never came makes the others raise :class:`CollectiveError`.

The group is used only through its ``ProcessGroup`` methods (``rank``, ``size``, ``alltoall_base``,
``allgather``), so any process group works: the default group, ``dist.new_group``, or a
torchft replica group. See docs/allreduce.md for the guarantees (what is bit-identical to the
one-process rule) and the byte model.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import inspect
import json
import math
import secrets
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import AllgatherOptions

from .. import _pages
from ..aggregators import Rule
from ..aggregators.columns import InMemory
from ..compression.codecs import decode_rows, encode_flat
from ..compression.fused import Compressed
from ..compression.wire import PayloadError, Spec, parse, payload_nbytes
from ..updates import KERNEL_DTYPES, all_finite, as_matrix

DEFAULT_TIMEOUT = 60.0
CODECS = ("fp16", "bf16", "int8", "int4")
STATUS_BYTES = 2048  # one rank's status record, JSON, zero-padded
_SEED_MASK = (1 << 63) - 1


class CollectiveError(RuntimeError):
    """A collective of :func:`all_reduce` failed or timed out: a peer died, hung or raised."""


# -- the group --------------------------------------------------------------------------------

class Comm:
    """A process group, used through its own methods with a deadline on every wait; counts bytes sent."""

    def __init__(self, group, timeout: float):
        if group is None:
            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError("all_reduce: torch.distributed is not initialised and no group was given")
            group = dist.distributed_c10d._get_default_group()
        self.pg = group
        self.rank, self.size = int(group.rank()), int(group.size())
        # c10d's own groups (gloo, NCCL) do point to point; wrappers such as torchft's may not
        self.p2p = type(group) is dist.ProcessGroup
        self.timeout = float(timeout)
        self.bytes_sent = 0

    def _failed(self, what: str, exc: Exception) -> CollectiveError:
        return CollectiveError(f"all_reduce: rank {self.rank}: the {what} failed or did not complete within "
                               f"{self.timeout:g} s (a peer died, hung or raised): {exc}")

    def _submit(self, what: str, op, *args):
        """Start a collective; a peer already gone can make the submission itself raise."""
        try:
            return op(*args)
        except Exception as exc:  # gloo: "Connection closed by peer", ...
            raise self._failed(what, exc) from None

    def _wait(self, work, what: str) -> None:
        try:
            ok = work.wait(datetime.timedelta(seconds=self.timeout))
        except Exception as exc:  # gloo: "Operation timed out!", "Connection closed by peer", ...
            raise self._failed(what, exc) from None
        if ok is False:
            raise CollectiveError(f"all_reduce: rank {self.rank}: the {what} did not complete within {self.timeout:g} s")

    def alltoall(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int],
                 what: str) -> None:
        self.bytes_sent += (sum(in_splits) - in_splits[self.rank]) * inp.element_size()
        self._wait(self._submit(what, self.pg.alltoall_base, out, inp, out_splits, in_splits,
                                dist.AllToAllOptions()), what)

    def allgather(self, out: torch.Tensor, inp: torch.Tensor, what: str) -> None:
        """``out`` (``size * inp.numel()``) receives every rank's ``inp`` in rank order.

        Sent point to point, one message to each peer (the order staggered by rank so no one
        link carries everything at once): gloo's own allgather, a ring, took 2.5x as long for
        64 MiB on 4 local ranks, while this moves the same bytes as fast as an alltoall."""
        inp = inp.reshape(-1)
        rows = out.view(self.size, -1)
        self.bytes_sent += (self.size - 1) * inp.numel() * inp.element_size()
        if not self.p2p:
            self._wait(self._submit(what, self.pg.allgather, [list(rows.unbind(0))], [inp], AllgatherOptions()), what)
            return
        works = []
        for k in range(1, self.size):
            dst, src = (self.rank + k) % self.size, (self.rank - k) % self.size
            works.append(self._submit(what, self.pg.send, [inp], dst, 0))
            works.append(self._submit(what, self.pg.recv, [rows[src]], src, 0))
        rows[self.rank].copy_(inp)
        for work in works:
            self._wait(work, what)

    def sum(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of a small partial, added in rank order: the same bits on every rank."""
        partial = partial.contiguous()
        parts = torch.empty(self.size * partial.numel(), dtype=partial.dtype, device=partial.device)
        self.allgather(parts, partial, "sum of per-participant partials")
        parts = parts.view(self.size, *partial.shape)
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        return total


class _Shard:
    """Mixin: a Columns source whose ``reduce`` sums partials over the ranks of ``comm``."""

    comm: Comm

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        return self.comm.sum(partial)


class _MemoryShard(_Shard, InMemory):
    def __init__(self, X: torch.Tensor, comm: Comm):
        InMemory.__init__(self, X)
        self.comm = comm


class _CompressedShard(_Shard, Compressed):
    def __init__(self, payloads: list, comm: Comm):
        Compressed.__init__(self, payloads)
        self.comm = comm


def _as_row(update: Any):
    """``(X, spec)``: the update as a ``(1, d)`` view (no copy for a contiguous tensor) and the
    spec that gives the result the update's form."""
    if isinstance(update, torch.Tensor) and update.dtype in KERNEL_DTYPES:
        flat = update.detach().reshape(-1).contiguous()
        return flat.view(1, -1), _Reshape(tuple(update.shape))
    if isinstance(update, torch.Tensor):
        return _as_row(update.to(torch.float32)) if update.dtype == torch.float64 else as_matrix([update])
    return as_matrix([update])


class _Reshape:
    """The spec of a tensor update: the aggregate comes back in its shape (float32)."""

    form, entries = "tensor", ()

    def __init__(self, shape):
        self.shape = shape

    def unflatten(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.view(self.shape)


# -- shards and the status record -------------------------------------------------------------

def shard_bounds(d: int, n: int, align: int = 1) -> list[tuple[int, int]]:
    """``n`` contiguous coordinate ranges covering ``0..d``: all of one length (a multiple of
    ``align``), the last ones shorter or empty."""
    size = -(-max(-(-d // n), 1) // align) * align
    return [(min(j * size, d), min((j + 1) * size, d)) for j in range(n)]


def _empty(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A fresh buffer, on huge pages on the CPU (first-touch page faults cost as much as the copy)."""
    return _pages.empty(numel, dtype) if device.type == "cpu" else torch.empty(numel, dtype=dtype, device=device)


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _status(X: torch.Tensor | None, spec, rule: Rule, codec, block: int, weight, participate: bool,
            error: str | None) -> dict:
    doc: dict[str, Any] = {"rule": repr(rule)[:300], "rule_digest": _digest(repr(rule)), "codec": codec,
                           "block": block if codec in ("int8", "int4") else None,
                           "weight": None if weight is None else float(weight), "participate": participate}
    if X is not None:
        doc.update(d=X.shape[1], dtype=str(X.dtype).replace("torch.", ""), device=X.device.type,
                   names=_digest(repr([(e.key, e.shape, str(e.dtype)) for e in spec.entries]) + spec.form
                                 + repr(getattr(spec, "shape", None))))
    if error:
        doc["error"] = error[:1000]
    return doc


def _exchange_status(comm: Comm, doc: dict, device: torch.device) -> list[dict]:
    raw = json.dumps(doc, separators=(",", ":")).encode()[:STATUS_BYTES]
    mine = torch.zeros(STATUS_BYTES, dtype=torch.uint8)
    mine[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    out = torch.empty(comm.size * STATUS_BYTES, dtype=torch.uint8, device=device)
    comm.allgather(out, mine.to(device), "status exchange")
    docs = []
    for r, row in enumerate(out.cpu().view(comm.size, STATUS_BYTES)):
        try:
            docs.append(json.loads(bytes(row.numpy()).rstrip(b"\0")))
        except ValueError:
            raise ValueError(f"all_reduce: rank {r} sent an unreadable status record") from None
    return docs


_WHAT = {"d": "the update size d", "dtype": "the update dtype", "device": "the device type",
         "names": "the update's parameter names/shapes/dtypes", "rule_digest": "the rule and its parameters",
         "codec": "the codec", "block": "the codec block size"}


def _check_agreement(docs: list[dict]) -> None:
    """The same ValueError on every rank when ranks failed locally or disagree."""
    failed = [(r, doc["error"]) for r, doc in enumerate(docs) if doc.get("error")]
    if failed:
        r, msg = failed[0]
        more = f" (and ranks {[x for x, _ in failed[1:]]})" if len(failed) > 1 else ""
        raise ValueError(f"all_reduce: rank {r} cannot take part{more}: {msg}")
    for key, what in _WHAT.items():
        values = [doc.get(key) for doc in docs]
        if any(v != values[0] for v in values):
            r = next(i for i, v in enumerate(values) if v != values[0])
            show = "rule" if key == "rule_digest" else key
            raise ValueError(f"all_reduce: ranks disagree on {what}: rank 0 has {docs[0].get(show)!r}, "
                             f"rank {r} has {docs[r].get(show)!r}")
    weights = [doc["weight"] for doc in docs if doc["participate"]]
    if any((w is None) != (weights[0] is None) for w in weights):
        raise ValueError(f"all_reduce: some ranks passed a weight and others did not (weights {weights})")


# -- the codec on the wire --------------------------------------------------------------------

def _shard_seed(seed: int, *keys: int) -> int:
    h = hashlib.blake2b(repr((seed, *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & _SEED_MASK


class Wire:
    """Encoded shards in fixed slots: a payload, zero padding, and one flag byte (1: the shard
    held a value the codec cannot carry, NaN/Inf or beyond its range; it is read as all NaN)."""

    def __init__(self, codec: str, block: int, lengths: list[int]):
        self.codec, self.block = codec, block
        self.specs = [Spec("tensor", False, (m,), "float32") for m in lengths]
        self.sizes = [payload_nbytes(codec, m, block if codec in ("int8", "int4") else 0, 0, s)
                      for m, s in zip(lengths, self.specs)]
        self.slot = -(-(max(self.sizes) + 1) // 8) * 8  # payloads start 8-byte aligned

    def encode(self, x: torch.Tensor, j: int, out: torch.Tensor, seed: int) -> None:
        """Shard ``j``'s values ``x`` into the slot ``out``."""
        x = x.to(torch.float32).contiguous()
        block = self.block if self.codec in ("int8", "int4") else 256
        out[-1] = 0
        if all_finite(x):
            try:
                encode_flat(x, self.specs[j], self.codec, block=block, seed=seed, out=out)
                return
            except ValueError:  # a finite value beyond the codec's range (fp16, bf16)
                pass
        encode_flat(torch.zeros_like(x), self.specs[j], self.codec, block=block, rounding="nearest", out=out)
        out[-1] = 1

    def open(self, slot: torch.Tensor, j: int, sender: int):
        """The parsed payload in a received slot (hostile bytes: a PayloadError naming the sender)."""
        try:
            p = parse(memoryview(slot[: self.sizes[j]].numpy()))
        except PayloadError as exc:
            raise PayloadError(f"all_reduce: rank {sender}'s shard {j}: {exc}") from None
        if p.codec != self.codec or p.d != self.specs[j].shape[0]:
            raise PayloadError(f"all_reduce: rank {sender}'s shard {j} holds {p.codec} d={p.d}, expected "
                               f"{self.codec} d={self.specs[j].shape[0]}")
        flag = int(slot[-1])
        if flag not in (0, 1):
            raise PayloadError(f"all_reduce: rank {sender}'s shard {j} has flag byte {flag} (0 or 1 expected)")
        if flag:  # read as NaN everywhere: a NaN scale (or NaN values) in the decoded rows
            if p.scales is not None:
                p.scales = torch.full_like(p.scales, math.nan)
            else:
                p.values = torch.full_like(p.values, math.nan)
        return p


# -- the all-reduce ---------------------------------------------------------------------------

def all_reduce(update: Any, rule: Rule, *, codec: str | None = None, group=None, weight: float | None = None,
               participate: bool = True, block: int = 256, seed: int | None = None,
               timeout: float = DEFAULT_TIMEOUT, return_info: bool = False):
    """Aggregate one update per rank with ``rule``; every rank returns the same aggregate.

    ``update``: this rank's update, a tensor (any shape) or a parameter set (``state_dict``, list
    of arrays), the same names, shapes and dtypes on every rank; float32, float16 and bfloat16 travel
    as they are. The result is ``rule`` applied to the ``n`` updates of ranks ``0..n-1`` in one
    process, in the update's form (see docs/allreduce.md for what is bit-identical).
    ``rule``: a Tapestry rule object, the same on every rank. ``codec``: ``"int8"``, ``"int4"``,
    ``"fp16"`` or ``"bf16"`` to encode both transfers (int8/int4: ``block`` values per scale;
    stochastic rounding from ``seed``, fresh when None). ``weight``: this rank's weight for
    ``mean`` (for example its example count). ``group``: a process group (default: the world);
    ``timeout``: seconds any one collective may wait. ``participate=False``: this rank takes part
    in the communication and gets the aggregate, but its update is not one of the rule's inputs
    (a replica that is recovering, a spare); participants are numbered in rank order among those
    that participate. ``return_info``: also return the :class:`~tapestry.AggregationInfo` (the
    same selected, rejected and non-finite participants on every rank; ``bytes_sent``: what this
    rank sent).
    """
    if not isinstance(rule, Rule):
        raise TypeError(f"rule must be a tapestry rule object (e.g. tp.TrimmedMean(f=1)), got {type(rule).__name__}")
    if codec is not None and codec not in CODECS:
        raise ValueError(f"all_reduce: unknown codec {codec!r}; valid: {', '.join(CODECS)} (or None)")
    if not (isinstance(timeout, (int, float)) and 0 < timeout < math.inf):
        raise ValueError(f"all_reduce: timeout must be a positive number of seconds, got {timeout!r}")
    comm = Comm(group, timeout)
    n, me = comm.size, comm.rank

    # Local preparation; a failure here is told to every rank through the status exchange.
    X = spec = None
    error = None
    try:
        X, spec = _as_row(update)
        if codec is not None and X.device.type != "cpu":
            raise ValueError(f"codec {codec!r} needs CPU tensors, the update is on {X.device}")
        if codec in ("int8", "int4") and not (isinstance(block, int) and 2 <= block <= 4096 and block % 2 == 0):
            raise ValueError(f"{codec} block size must be even and in [2, 4096], got {block!r}")
        if weight is not None:
            if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
                raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
            if "weights" not in inspect.signature(rule.aggregate).parameters:
                raise ValueError(f"rule {rule.name!r} takes no weights (weight={weight!r} given)")
    except (ValueError, TypeError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    device = X.device if X is not None else torch.device("cpu")
    docs = _exchange_status(comm, _status(X, spec, rule, codec, block, weight, bool(participate), error), device)
    _check_agreement(docs)
    rows = [r for r, doc in enumerate(docs) if doc["participate"]]  # the rule's inputs, in rank order
    if not rows:
        raise ValueError("all_reduce: no rank participates (participate=False on every rank)")
    copy.deepcopy(rule)(torch.zeros(len(rows), 1))  # the rule's own requirement on n: the same error everywhere

    x = X[0]
    d = x.numel()
    bounds = shard_bounds(d, n, block if codec in ("int8", "int4") else 16)
    lengths = [b - a for a, b in bounds]
    mine = lengths[me]
    base = secrets.randbits(63) if seed is None else int(seed)
    kwargs = {}
    if docs[0]["weight"] is not None:
        kwargs["weights"] = [docs[r]["weight"] for r in rows]
    sending = me in rows
    counts = [1 if r in rows else 0 for r in range(n)]  # rows received from each rank

    # 1. reduce-scatter: shard j of every update to rank j
    if codec is None:
        recv = _empty(len(rows) * mine, x.dtype, x.device)
        comm.alltoall(recv, x if sending else x[:0], [c * mine for c in counts],
                      lengths if sending else [0] * n, "reduce-scatter of the updates")
        src = _MemoryShard(recv.view(len(rows), mine), comm)
    else:
        wire = Wire(codec, block, lengths)
        send = torch.empty(n * wire.slot if sending else 0, dtype=torch.uint8)
        if sending:
            slots = send.view(n, wire.slot)
            for j, (a, b) in enumerate(bounds):
                wire.encode(x[a:b], j, slots[j], _shard_seed(base, 1, me, j))
        recv = torch.empty(len(rows) * wire.slot, dtype=torch.uint8)
        comm.alltoall(recv, send, [c * wire.slot for c in counts], [wire.slot if sending else 0] * n,
                      "reduce-scatter of the encoded updates")
        payloads = [wire.open(row, me, r) for r, row in zip(rows, recv.view(len(rows), wire.slot))]
        src = _CompressedShard(payloads, comm)

    # 2. the rule on this rank's shard (partials summed over the ranks)
    agg, info = rule.aggregate(src, want_info=return_info, **kwargs)
    del src, recv

    # 3. all-gather of the aggregated shards
    width = lengths[0]
    if codec is None:
        gathered = _empty(n * width, torch.float32, agg.device)
        piece = agg
        if mine < width:  # the last shards are shorter (or empty): pad to the common width
            piece = torch.zeros(width, dtype=torch.float32, device=agg.device)
            piece[:mine] = agg
        comm.allgather(gathered, piece, "all-gather of the aggregate")
        out = gathered[:d]
    else:
        mine_slot = torch.zeros(wire.slot, dtype=torch.uint8)
        wire.encode(agg, me, mine_slot, _shard_seed(base, 2, me))
        gathered = torch.empty(n * wire.slot, dtype=torch.uint8)
        comm.allgather(gathered, mine_slot, "all-gather of the encoded aggregate")
        out = _empty(d, torch.float32, torch.device("cpu"))
        for j, row in enumerate(gathered.view(n, wire.slot)):
            a, b = bounds[j]
            if b > a:
                decode_rows([wire.open(row, j, j)], [out[a:b]], 0, b - a)
    info.bytes_sent = comm.bytes_sent
    result = spec.unflatten(out)
    return (result, info) if return_info else result
