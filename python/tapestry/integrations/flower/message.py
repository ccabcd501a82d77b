"""``TapestryStrategy``: Flower's message API (``flwr >= 1.42``, ``ServerApp`` + ``Grid``)."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from ...aggregators import Rule
from ...optim import server_optimizer as _server_optimizer
from .core import RoundAggregator, RoundResult, build_rule, split_kwargs

PAYLOAD_KEY = "tapestry-payload"
_FEDAVG_PARAMS = [p for p in inspect.signature(FedAvg.__init__).parameters if p != "self"]


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

    ``rule``: a rule name (``tapestry.RULES``, or ``nnm+<rule>``) or a rule object. Rule
    parameters are keyword arguments, by Tapestry's names (``f``, ``m``, ``beta``) or Flower's
    (``num_malicious_nodes``, ``num_nodes_to_select``, ``beta``...), or a ``rule_params`` dict;
    the other keyword arguments are Flower ``FedAvg``'s. An unknown name is a ``TypeError``
    listing the accepted ones. ``weighted``: weight replies by ``weighted_by_key``
    (``num-examples``) in every rule that takes weights (mean, Multi-Krum's average of the selected
    replies, geometric median), as Flower does; ``False`` turns it off. ``on_unmet``: what a round
    whose reply count the rule cannot take does: ``"skip"`` (the model stays, like Flower's
    Bulyan) or a rule name/object to aggregate with instead. ``server_optimizer``: see
    docs/flower.md (None: the aggregate is the new global model, as Flower's ``FedAvg``).

    Each round's decisions (node ids) are in the returned metrics (``tapestry-selected``,
    ``-rejected``, ``-nonfinite``, ``-dropped``, ``-skipped``), in an INFO log line, and in
    ``strategy.last_round`` (a :class:`~tapestry.integrations.flower.core.RoundResult`).
    """

    def __init__(self, rule: str | Rule = "mean", *, rule_params: dict | None = None, weighted: bool | None = None,
                 on_unmet: str | Rule = "skip", server_optimizer: Any = None, **kwargs: Any) -> None:
        rule_kw, fedavg_kw = split_kwargs(rule, kwargs, _FEDAVG_PARAMS, "TapestryStrategy")
        super().__init__(**fedavg_kw)
        self.rule = build_rule(rule, {**(rule_params or {}), **rule_kw})
        self._opt_factory = _optimizer_factory(server_optimizer)
        # with a server optimizer the rule aggregates deltas from the global model
        self.core = RoundAggregator(self.rule, weighted=weighted, on_unmet=on_unmet,
                                    deltas=self._opt_factory is not None)
        self.outer_optimizer = None  # built on the first aggregation, over a copy of the global model
        self._outer_params: dict | None = None
        self.last_round: RoundResult | None = None
        self._global: ArrayRecord | None = None

    @property
    def weighted(self) -> bool:
        return self.core.weighted

    @property
    def last_info(self):
        return None if self.last_round is None else self.last_round.info

    def summary(self) -> None:
        log(INFO, "\t├──> Tapestry rule: %r (weighted: %s, unmet requirement: %s, server optimizer: %s)", self.rule,
            self.weighted, self.core.on_unmet, self.outer_optimizer or ("none" if self._opt_factory is None else "on first aggregation"))
        super().summary()

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, **kwargs: Any):
        available = len(list(grid.get_node_ids()))
        sampled = max(int(available * self.fraction_train), self.min_train_nodes)
        plan = self.core.plan(sampled)
        if plan:  # a configured f that the sampled count can never satisfy
            log(WARNING, "TapestryStrategy: %s (fraction_train=%s of %s available, min_train_nodes=%s)", plan,
                self.fraction_train, available, self.min_train_nodes)
        return super().start(grid, initial_arrays, num_rounds, **kwargs)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = arrays  # compressed replies and server optimizers work from this
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        # node ids (a reply without one, such as a test's mock, is named by its position)
        nodes = [n if isinstance(n := getattr(m.metadata, "src_node_id", None), int) else i for i, m in enumerate(valid)]
        records = [c[self.arrayrecord_key] if self.arrayrecord_key in c.array_records else next(iter(c.array_records.values()))
                   for c in contents]
        weights = [float(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in contents]
        packed = [PAYLOAD_KEY in r for r in records]
        if any(packed):
            if not all(packed):
                raise ValueError(f"round {server_round}: nodes {[n for n, p in zip(nodes, packed) if p]} sent compressed "
                                 f"updates, nodes {[n for n, p in zip(nodes, packed) if not p]} dense ones; "
                                 f"a round must be one or the other")
            result = self._aggregate_compressed(server_round, records, nodes, weights)
        else:
            arrays = [{k: r[k].numpy() for k in r.keys()} for r in records]
            glob = None
            if self._opt_factory is not None:  # the rule aggregates deltas from the global model
                glob = self._global_numpy()
                arrays = [_minus(a, glob) for a in arrays]
            result = self.core.aggregate(server_round, nodes, arrays, weights)
            if result.arrays is not None and glob is not None:
                result.arrays = self._outer_step(result.arrays, glob)
        self.last_round = result
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key) if not result.skipped else MetricRecord()
        for k, v in result.metrics().items():
            metrics[k] = v
        arrays = None if result.arrays is None else ArrayRecord({k: Array(_c_order(v)) for k, v in result.arrays.items()})
        return arrays, metrics

    def _aggregate_compressed(self, server_round: int, records: list[ArrayRecord], nodes: list,
                              weights: list[float]) -> RoundResult:
        from ... import compression

        if self._global is None:
            raise ValueError("compressed replies need the global model this strategy sent (configure_train first)")
        keys = list(self._global.keys())
        d = sum(int(np.prod(self._global[k].shape)) for k in keys)
        keep, payloads, dropped = [], [], []
        for i, (node, rec) in enumerate(zip(nodes, records)):
            if list(rec.keys()) != [PAYLOAD_KEY]:
                log(WARNING, "node %s dropped: a compressed reply holds only %r, got %s", node, PAYLOAD_KEY, list(rec.keys()))
                dropped.append(node)
                continue
            keep.append(i)
            payloads.append(rec[PAYLOAD_KEY].numpy().tobytes())
        nodes = [nodes[i] for i in keep]
        why = self.core.unmet(len(payloads))
        if why is not None:
            log(WARNING, "round %s: %s; round skipped (the global model is unchanged)", server_round, why)
            return RoundResult(None, self.rule.name, dropped=dropped, skipped=why)
        kw = {"weights": [weights[i] for i in keep]} if self.weighted else {}
        # max_values: a payload may not describe more values than the model has (hostile sizes)
        delta, info = compression.aggregate(payloads, self.rule, return_info=True, max_values=d, **kw)
        if not isinstance(delta, dict) or list(delta.keys()) != keys:
            got = list(delta.keys()) if isinstance(delta, dict) else type(delta).__name__
            raise ValueError(f"compressed updates describe {got}, the global model has arrays {keys}")
        delta = {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v, dtype=np.float32) for k, v in delta.items()}
        glob = self._global_numpy()
        for k in keys:
            if delta[k].shape != glob[k].shape:
                raise ValueError(f"compressed update of array {k!r} has shape {list(delta[k].shape)}, the model {list(glob[k].shape)}")
        if self._opt_factory is not None:
            out = self._outer_step(delta, glob)
        else:
            out = {k: (glob[k].astype(np.float32) + delta[k]).astype(glob[k].dtype) for k in keys}
        sel = info.selected if info.selected is not None else range(len(nodes))  # per-coordinate: every reply
        return RoundResult(out, info.rule, selected=[nodes[i] for i in sel], rejected=[nodes[i] for i in info.rejected or []],
                           nonfinite=[nodes[i] for i in info.nonfinite], dropped=dropped, info=info)

    def _global_numpy(self) -> dict[str, np.ndarray]:
        if self._global is None:
            raise ValueError("a server optimizer needs the global model this strategy sent (configure_train first)")
        return {k: self._global[k].numpy() for k in self._global.keys()}

    def _outer_step(self, agg: dict[str, np.ndarray], glob: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The global model moved by the server optimizer from the aggregate of deltas ``agg``
        (floating arrays; integer arrays take the aggregate of the values sent)."""
        import torch

        if list(agg) != list(glob):
            raise ValueError(f"replies hold arrays {list(agg)}, the global model {list(glob)}")
        fkeys = [k for k in glob if glob[k].dtype.kind == "f"]
        if self._outer_params is None:
            self._outer_params = {k: torch.from_numpy(np.array(glob[k], copy=True)) for k in fkeys}
            self.outer_optimizer = self._opt_factory(self._outer_params)
        elif list(self._outer_params) != fkeys:
            raise ValueError(f"the model's arrays changed from {list(self._outer_params)} to {fkeys}")
        for k in fkeys:  # start from the model sent (the optimizer's state carries over)
            self._outer_params[k].numpy()[...] = glob[k]
        self.outer_optimizer.step([np.asarray(agg[k]) for k in fkeys],
                                  allow_nonfinite=True)  # as FedAvg: a NaN aggregate reaches the model
        return {k: (self._outer_params[k].numpy().astype(glob[k].dtype, copy=True) if k in self._outer_params else agg[k])
                for k in glob}


def _c_order(a: np.ndarray) -> np.ndarray:
    """``a`` in C order, 0-dim arrays included (``np.ascontiguousarray`` makes those shape (1,))."""
    a = np.asarray(a)
    return a if a.flags.c_contiguous else a.copy(order="C")


def _minus(arrays: dict[str, np.ndarray], glob: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Floating arrays minus the global model's (shapes checked: a mismatch leaves the array as
    sent, for the round's check to drop the reply); integer arrays as sent."""
    out = {}
    for k, a in arrays.items():
        g = glob.get(k)
        ok = g is not None and a.dtype.kind == "f" and g.shape == a.shape
        out[k] = (a - g).astype(a.dtype, copy=False) if ok else a
    return out


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
