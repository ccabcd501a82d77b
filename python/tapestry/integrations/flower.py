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
    ignore example counts too). Other keyword arguments go to Flower's ``FedAvg``.
    """

    def __init__(self, rule: str | Rule = "mean", *, rule_params: dict | None = None, weighted: bool | None = None,
                 **fedavg_kwargs: Any) -> None:
        super().__init__(**fedavg_kwargs)
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
        log(INFO, "\t├──> Tapestry rule: %r (weighted: %s)", self.rule, self.weighted)
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
        out = {}
        for k in keys:
            g = self._global[k].numpy()
            v = np.asarray(delta[k].numpy() if hasattr(delta[k], "numpy") else delta[k], dtype=np.float32)
            if v.shape != g.shape:
                raise ValueError(f"compressed update of array {k!r} has shape {list(v.shape)}, the model {list(g.shape)}")
            out[k] = Array((g.astype(np.float32) + v).astype(g.dtype))
        return ArrayRecord(out)


__all__ = ["TapestryStrategy", "compress_update", "PAYLOAD_KEY"]
