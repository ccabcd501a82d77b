"""A Flower strategy that aggregates with any Tapestry rule (Flower's message API, ``flwr >= 1.42``).

    from tapestry.integrations.flower import TapestryStrategy
    strategy = TapestryStrategy("trimmed_mean", rule_params={"beta": 0.2})
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=5)

:class:`TapestryStrategy` is Flower's own ``FedAvg`` (sampling, messages, metric aggregation, the
``start`` loop) with ``aggregate_train`` replaced: the clients' ``ArrayRecord``\\ s are aggregated by
the Tapestry rule, so the result equals Flower's ``FedAvg``, ``FedTrimmedAvg``, ``FedMedian`` and
``Krum`` for the matching rule (``mean`` weighted by ``num-examples``, ``trimmed_mean`` with
``beta``, ``median``, ``krum`` with ``f``), and any other Tapestry rule (Bulyan, geometric median,
centered clipping, NNM) is one argument away. ``strategy.last_info`` keeps the last round's
diagnostics (selected and rejected replies, scores, replies holding NaN/Inf), as positions in
``strategy.last_nodes``, the node ids of that round's valid replies in the order aggregated.
(Flower's own ``Bulyan`` selects by Multi-Krum; Tapestry's follows SPEC.md's repeated Krum.)

Compressed updates: a client may reply with :func:`compress_update` (its delta from the global
model, encoded by :mod:`tapestry.compression` with error feedback, one ``uint8`` array under the key
``"tapestry-payload"``). The strategy then aggregates the payloads with the same rule, decoding
block by block, and adds the result to the global model it sent. Every reply of a round must be
compressed or every reply dense.

Server optimizer: with ``server_optimizer="fedadam"`` (or any name of :mod:`tapestry.optim`, a
``(name, hparams)`` pair, a dict ``{"name": ..., **hparams}``, or a factory ``params -> optimizer``)
the rule aggregates the deltas ``reply - global`` (the global model this strategy sent) and the
optimizer moves the global model by that aggregate: ``TapestryStrategy("mean",
server_optimizer="fedadam")`` is Flower's ``FedAdam``, with any rule in place of the mean.
``strategy.outer_optimizer`` is the optimizer (its ``state_dict()`` resumes a run).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO
from typing import Any

import numpy as np

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import FedAvg
    from flwr.supercore import log
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("tapestry.integrations.flower needs the flwr package (pip install 'flwr>=1.42')") from exc

from ..aggregators import Mean, Rule, make_rule
from ..optim import server_optimizer as _server_optimizer

PAYLOAD_KEY = "tapestry-payload"


def compress_update(local: ArrayRecord, global_arrays: ArrayRecord, compressor: Any) -> ArrayRecord:
    """A client's reply carrying ``local - global`` compressed by ``compressor`` (a
    :class:`tapestry.compression.Compressor`, which keeps the error-feedback residual: keep one
    per client across rounds)."""
    keys = list(global_arrays.keys())
    if list(local.keys()) != keys:
        raise ValueError(f"local arrays {list(local.keys())} do not match the global model's {keys}")
    delta = {k: np.asarray(local[k].numpy(), dtype=np.float32) - np.asarray(global_arrays[k].numpy(), dtype=np.float32)
             for k in keys}
    payload = compressor.encode(delta)
    return ArrayRecord({PAYLOAD_KEY: Array(np.frombuffer(payload, dtype=np.uint8).copy())})


class TapestryStrategy(FedAvg):
    """Flower ``FedAvg`` whose training aggregation is a Tapestry rule.

    ``rule``: a rule name (see ``tapestry.RULES``, or ``nnm+<rule>``) with ``rule_params``, or a
    rule object. ``weighted``: pass each reply's ``weighted_by_key`` metric (``num-examples``) as
    weights; defaults to True for ``mean`` (FedAvg) and False otherwise (Flower's robust strategies
    ignore example counts too). ``server_optimizer``: see the module docstring (None: the
    aggregate is the new global model, as Flower's ``FedAvg``). Other keyword arguments go to
    Flower's ``FedAvg``.
    """

    def __init__(self, rule: str | Rule = "mean", *, rule_params: dict | None = None, weighted: bool | None = None,
                 server_optimizer: Any = None, **fedavg_kwargs: Any) -> None:
        super().__init__(**fedavg_kwargs)
        self._opt_factory = _optimizer_factory(server_optimizer)
        self.outer_optimizer = None  # built on the first aggregation, over a copy of the global model
        self._outer_params: dict | None = None
        if isinstance(rule, str):
            self.rule = make_rule(rule, **(rule_params or {}))
        elif isinstance(rule, Rule):
            if rule_params:
                raise ValueError("rule_params go with a rule name, not a rule object")
            self.rule = rule
        else:
            raise TypeError(f"rule must be a rule name or a tapestry Rule, got {type(rule).__name__}")
        self.weighted = isinstance(self.rule, Mean) if weighted is None else bool(weighted)
        self.last_info = None
        self.last_nodes: list[int] = []
        self._global: ArrayRecord | None = None

    def summary(self) -> None:
        log(INFO, "\t├──> Tapestry rule: %r (weighted: %s, server optimizer: %s)", self.rule, self.weighted,
            self.outer_optimizer or ("none" if self._opt_factory is None else "on first aggregation"))
        super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = arrays  # compressed replies are deltas from this
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        nodes = self.last_nodes = [m.metadata.src_node_id for m in valid]
        key = next(iter(contents[0].array_records))
        records = [c[key] for c in contents]
        kwargs = {}
        if self.weighted:
            kwargs["weights"] = [float(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in contents]
        packed = [PAYLOAD_KEY in r for r in records]
        if any(packed):
            if not all(packed):
                raise ValueError(f"round {server_round}: nodes {[n for n, p in zip(nodes, packed) if p]} sent compressed "
                                 f"updates, nodes {[n for n, p in zip(nodes, packed) if not p]} dense ones; "
                                 f"a round must be one or the other")
            arrays = self._aggregate_compressed(records, nodes, kwargs)
        else:
            arrays = self._aggregate_dense(records, nodes, kwargs)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return arrays, metrics

    def _aggregate_dense(self, records: list[ArrayRecord], nodes: list[int], kwargs: dict) -> ArrayRecord:
        keys = list(records[0].keys())
        updates = []
        for node, rec in zip(nodes, records):
            if list(rec.keys()) != keys:
                raise ValueError(f"node {node} sent arrays {list(rec.keys())}, node {nodes[0]} sent {keys}")
            arrays = [rec[k].numpy() for k in keys]
            for k, a, a0 in zip(keys, arrays, updates[0] if updates else arrays):
                if a.shape != a0.shape or a.dtype != a0.dtype:
                    raise ValueError(f"node {node}, array {k!r}: {a.dtype}{list(a.shape)}, node {nodes[0]} sent "
                                     f"{a0.dtype}{list(a0.shape)}")
            updates.append(arrays)
        if self._opt_factory is not None:  # the rule aggregates deltas from the global model
            glob = self._global_arrays(keys, [a.shape for a in updates[0]])
            updates = [[(a - g).astype(a.dtype, copy=False) for a, g in zip(u, glob)] for u in updates]
            agg, self.last_info = self.rule(updates, return_info=True, **kwargs)
            return self._outer_step(keys, glob, agg)
        agg, self.last_info = self.rule(updates, return_info=True, **kwargs)
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in zip(keys, agg)})

    def _aggregate_compressed(self, records: list[ArrayRecord], nodes: list[int], kwargs: dict) -> ArrayRecord:
        from .. import compression

        if self._global is None:
            raise ValueError("compressed replies need the global model this strategy sent (configure_train first)")
        keys = list(self._global.keys())
        d = sum(int(np.prod(self._global[k].shape)) for k in keys)
        payloads = []
        for node, rec in zip(nodes, records):
            if list(rec.keys()) != [PAYLOAD_KEY]:
                raise ValueError(f"node {node}: a compressed reply holds only {PAYLOAD_KEY!r}, got {list(rec.keys())}")
            payloads.append(rec[PAYLOAD_KEY].numpy().tobytes())
        # max_values: a payload may not describe more values than the model has (hostile sizes)
        delta, self.last_info = compression.aggregate(payloads, self.rule, return_info=True, max_values=d, **kwargs)
        if not isinstance(delta, dict) or list(delta.keys()) != keys:
            got = list(delta.keys()) if isinstance(delta, dict) else type(delta).__name__
            raise ValueError(f"compressed updates describe {got}, the global model has arrays {keys}")
        if self._opt_factory is not None:
            glob = self._global_arrays(keys, [self._global[k].shape for k in keys])
            return self._outer_step(keys, glob, [delta[k] for k in keys])
        out = {}
        for k in keys:
            g = self._global[k].numpy()
            v = np.asarray(delta[k].numpy() if hasattr(delta[k], "numpy") else delta[k], dtype=np.float32)
            if v.shape != g.shape:
                raise ValueError(f"compressed update of array {k!r} has shape {list(v.shape)}, the model {list(g.shape)}")
            out[k] = Array((g.astype(np.float32) + v).astype(g.dtype))
        return ArrayRecord(out)

    def _global_arrays(self, keys: list, shapes: list) -> list[np.ndarray]:
        """The global model this strategy sent, checked against the replies' keys and shapes."""
        if self._global is None:
            raise ValueError("a server optimizer needs the global model this strategy sent (configure_train first)")
        if list(self._global.keys()) != keys:
            raise ValueError(f"replies hold arrays {keys}, the global model {list(self._global.keys())}")
        glob = [self._global[k].numpy() for k in keys]
        for k, g, s in zip(keys, glob, shapes):
            if tuple(g.shape) != tuple(s):
                raise ValueError(f"array {k!r}: replies have shape {list(s)}, the global model {list(g.shape)}")
        return glob

    def _outer_step(self, keys: list, glob: list[np.ndarray], agg: list) -> ArrayRecord:
        """The global model moved by the server optimizer from the aggregate of deltas ``agg``."""
        import torch

        if self._outer_params is None:
            self._outer_params = {k: torch.from_numpy(np.array(g, copy=True)) for k, g in zip(keys, glob)}
            self.outer_optimizer = self._opt_factory(self._outer_params)
        elif list(self._outer_params) != keys:
            raise ValueError(f"the model's arrays changed from {list(self._outer_params)} to {keys}")
        for k, g in zip(keys, glob):  # start from the model sent (the optimizer's state carries over)
            self._outer_params[k].numpy()[...] = g
        self.outer_optimizer.step([np.asarray(a.numpy() if hasattr(a, "numpy") else a) for a in agg],
                                  allow_nonfinite=True)  # as FedAvg: a NaN aggregate reaches the model
        return ArrayRecord({k: Array(self._outer_params[k].numpy().astype(g.dtype, copy=True))
                            for k, g in zip(keys, glob)})


def _optimizer_factory(spec: Any):
    """``params -> server optimizer`` from a name, ``(name, hparams)``, ``{"name": ..., **hparams}`` or a
    callable; the name and hyperparameters are checked now, not at the first aggregation."""
    if spec is None or callable(spec):
        return spec
    if isinstance(spec, str):
        name, hparams = spec, {}
    elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], dict):
        name, hparams = spec
    elif isinstance(spec, dict) and "name" in spec:
        hparams = dict(spec)
        name = hparams.pop("name")
    else:
        raise TypeError("server_optimizer must be a name, (name, hparams), {'name': ..., **hparams} or a "
                        f"factory params -> optimizer, got {spec!r}")
    import torch

    _server_optimizer(name, torch.zeros(1), **hparams)  # raises ValueError/TypeError naming what is wrong
    return lambda params: _server_optimizer(name, params, **hparams)


__all__ = ["TapestryStrategy", "compress_update", "PAYLOAD_KEY"]
