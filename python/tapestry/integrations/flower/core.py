"""What both Flower strategies share: rule parameters (with Flower's names), reply checks, the
round's aggregation of named NumPy arrays, and the decisions it reports.

Both API modules turn their replies into ``(node, {key: ndarray}, weight)`` and call
:meth:`RoundAggregator.aggregate`; nothing here imports Flower.

Arrays by dtype (docs/flower.md has the reasons):

* floating arrays (float16/32/64) go to the rule, stacked as one float32 ``(n, d)`` matrix, and
  come back in their own dtype and shape (0-dim included);
* integer and boolean arrays (BatchNorm's ``num_batches_tracked``, masks, counters) never reach the
  rule. Under ``mean`` they get what Flower's ``FedAvg`` gives (the weighted mean, float64, in
  Flower's order of operations); under every other rule the coordinate-wise lower median of the
  replies the rule kept (its selected replies, or every finite reply for per-coordinate rules),
  which keeps dtype and shape and is one of the values sent;
* under Krum the result is the selected reply's arrays exactly as sent, every dtype included.
"""

from __future__ import annotations

import copy
import inspect
import math
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...aggregators import RULES, Krum, Mean, Rule, make_rule

log = logging.getLogger("flwr")  # Flower's own logger: the lines appear in its run output

# Flower's parameter names -> Tapestry's (Krum, MultiKrum, Bulyan, FedTrimmedAvg, both APIs).
ALIASES = {
    "num_malicious_nodes": "f", "num_malicious_clients": "f",
    "num_nodes_to_select": "m", "num_nodes_to_keep": "m", "num_clients_to_keep": "m",
    "proportiontocut": "beta",
}
OWN = ("rule_params", "weighted", "on_unmet", "server_optimizer")


def rule_parameters(name: str) -> list[str]:
    """The constructor parameters of rule ``name`` (``nnm+<rule>``: ``f`` and the inner rule's)."""
    if name.startswith("nnm+"):
        return sorted({"f", *rule_parameters(name[4:])})
    if name not in RULES:
        make_rule(name)  # raises, listing the valid names
    return [p for p in inspect.signature(RULES[name].__init__).parameters if p != "self"]


def split_kwargs(rule: str | Rule, kwargs: dict, flower_params: list[str], api: str) -> tuple[dict, dict]:
    """``kwargs`` split into (rule parameters, Flower strategy parameters); Flower's names for rule
    parameters are translated. Anything else is a TypeError listing every accepted name."""
    rule_names = rule_parameters(rule) if isinstance(rule, str) else []
    if isinstance(rule, str) and rule in ("krum", "multi_krum"):
        rule_names = sorted({*rule_names, "m"})  # krum + m (Flower's num_clients_to_keep) is Multi-Krum
    rule_kw, flower_kw = {}, {}
    for key, value in kwargs.items():
        target = ALIASES.get(key, key)
        if key in flower_params:
            flower_kw[key] = value
        elif target in rule_names:
            if target in rule_kw:
                raise TypeError(f"{api}: {key}={value!r} repeats rule parameter {target!r}, already given")
            rule_kw[target] = value
        else:
            accepted = sorted({*rule_names, *(k for k, v in ALIASES.items() if v in rule_names), *OWN, *flower_params})
            what = f"rule {rule!r}" if isinstance(rule, str) else "a rule object (its parameters are fixed)"
            raise TypeError(f"{api}: unknown parameter {key!r} for {what}; accepted: {', '.join(accepted)}")
    return rule_kw, flower_kw


def build_rule(rule: str | Rule, params: dict) -> Rule:
    if isinstance(rule, Rule):
        if params:
            raise ValueError("rule parameters go with a rule name, not a rule object")
        return rule
    if not isinstance(rule, str):
        raise TypeError(f"rule must be a rule name or a tapestry Rule, got {type(rule).__name__}")
    params = dict(params)
    base = RULES.get(rule[4:] if rule.startswith("nnm+") else rule)
    required = ["f"] if rule.startswith("nnm+") else [
        p.name for p in inspect.signature(base.__init__).parameters.values()
        if p.name != "self" and p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD] if base else []
    for p in required:
        if p not in params:  # Flower's Krum/Bulyan default f to 0: a robust rule here says how robust
            flower = [k for k, v in ALIASES.items() if v == p]
            raise TypeError(f"rule {rule!r} needs {p}" + (f" (Flower's name: {' or '.join(flower)})" if flower else ""))
    if rule in ("krum", "multi_krum") and "m" in params:
        m = params.pop("m")
        if rule == "krum" and not m:  # Flower's Krum: num_clients_to_keep=0 means plain Krum
            return make_rule("krum", **params)
        return make_rule("multi_krum", m=m, **params)
    return make_rule(rule, **params)


def takes_weights(rule: Rule) -> bool:
    return "weights" in inspect.signature(rule.aggregate).parameters


@dataclass
class RoundResult:
    """One round's outcome: ``arrays`` (None when the round is skipped) and its decisions, as node
    ids: ``selected``/``rejected`` (replies the rule kept or left out; per-coordinate rules keep
    every reply), ``nonfinite`` (replies holding NaN/Inf), ``dropped`` (replies unlike the others)."""

    arrays: dict[str, np.ndarray] | None
    rule: str
    selected: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    nonfinite: list = field(default_factory=list)
    dropped: list = field(default_factory=list)
    skipped: str | None = None  # why the round was skipped
    info: Any = None

    def metrics(self) -> dict:
        """The decisions as metric entries (lists of node ids; ``tapestry-skipped`` 0 or 1)."""
        return {"tapestry-selected": list(self.selected), "tapestry-rejected": list(self.rejected),
                "tapestry-nonfinite": list(self.nonfinite), "tapestry-dropped": list(self.dropped),
                "tapestry-skipped": int(self.skipped is not None)}


def _signature(arrays: dict) -> tuple:
    return tuple((k, a.shape, a.dtype.str) for k, a in arrays.items())


def _difference(mine: tuple, ref: tuple) -> str:
    keys, ref_keys = [k for k, *_ in mine], [k for k, *_ in ref]
    if keys != ref_keys:
        return f"arrays {keys}, the others {ref_keys}"
    for (k, s, d), (_, s0, d0) in zip(mine, ref):
        if s != s0 or d != d0:
            return f"array {k!r}: {np.dtype(d)}{list(s)}, the others {np.dtype(d0)}{list(s0)}"
    return "different arrays"


class RoundAggregator:
    """Aggregates one round's replies with ``rule``; see the module docstring."""

    def __init__(self, rule: Rule, *, weighted: bool | None, on_unmet: str | Rule = "skip", deltas: bool = False):
        if rule.deltas_only and not deltas:  # the strategy would hand the rule whole models
            raise ValueError(f"{type(rule).__name__} clips deltas (local - global): give a server_optimizer, e.g. "
                             f"server_optimizer='fedavg' for DP-FedAvg (TapestryStrategy, the message API)")
        self.rule = rule
        can_weigh = takes_weights(rule)
        if weighted and not can_weigh:
            raise ValueError(f"weighted=True: rule {rule.name!r} takes no weights "
                             f"(weighted rules: {', '.join(n for n, c in RULES.items() if 'weights' in inspect.signature(c.aggregate).parameters)})")
        self.weighted = can_weigh if weighted is None else bool(weighted)
        if isinstance(on_unmet, str) and on_unmet != "skip":
            on_unmet = make_rule(on_unmet)
        elif not isinstance(on_unmet, (str, Rule)):
            raise TypeError(f"on_unmet must be 'skip', a rule name or a tapestry Rule, got {type(on_unmet).__name__}")
        self.on_unmet = on_unmet
        self._unmet: dict[tuple[int, int], str | None] = {}

    def unmet(self, n: int, rule: Rule | None = None) -> str | None:
        """Why ``rule`` cannot aggregate ``n`` replies (its own message, naming the inequality),
        or None. Found by running a copy of it on ``n`` one-value updates, so every rule (and every
        requirement it states) is covered without a table, and no rule's state (centered
        clipping's centre, a DP accountant's rounds) is touched."""
        rule = rule or self.rule
        key = (id(rule), n)
        if key not in self._unmet:
            try:
                copy.deepcopy(rule)(torch.zeros(n, 1)) if n > 0 else None
                self._unmet[key] = None if n > 0 else "no replies"
            except ValueError as exc:
                self._unmet[key] = str(exc)
        return self._unmet[key]

    def plan(self, n: int) -> str:
        """What a round of ``n`` replies will do, for the start-of-run report."""
        why = self.unmet(n)
        if why is None:
            return ""
        if isinstance(self.on_unmet, Rule) and self.unmet(n, self.on_unmet) is None:
            return f"{why}: with {n} sampled nodes every round falls back to {self.on_unmet!r}"
        return f"{why}: with {n} sampled nodes every round will be skipped"

    def check(self, nodes: list, records: list[dict]) -> tuple[list[int], list]:
        """Positions of the replies shaped like the most common reply (ties: the earliest), and
        the node ids of the others, each logged with how it differs."""
        sigs = [_signature(r) for r in records]
        counts = Counter(sigs)
        ref = max(counts, key=lambda s: (counts[s], -sigs.index(s)))
        keep = [i for i, s in enumerate(sigs) if s == ref]
        dropped = [nodes[i] for i, s in enumerate(sigs) if s != ref]
        for i, s in enumerate(sigs):
            if s != ref:
                log.warning("node %s dropped: %s", nodes[i], _difference(s, ref))
        for k, _, d in ref:
            if np.dtype(d).kind not in "fiub":
                raise TypeError(f"node {nodes[keep[0]]}, array {k!r}: dtype {np.dtype(d)} cannot be aggregated "
                                f"(floating, integer and boolean arrays can)")
        return keep, dropped

    def aggregate(self, server_round: int, nodes: list, records: list[dict], weights: list[float] | None) -> RoundResult:
        """The round's aggregate of ``records`` (one ``{key: ndarray}`` per node, in ``nodes``)."""
        keep, dropped = self.check(nodes, records)
        nodes = [nodes[i] for i in keep]
        records = [records[i] for i in keep]
        weights = None if weights is None else [float(weights[i]) for i in keep]
        rule = self.rule
        why = self.unmet(len(records))
        if why is not None:
            if isinstance(self.on_unmet, Rule) and self.unmet(len(records), self.on_unmet) is None:
                log.warning("round %s: %s; aggregating with %r instead", server_round, why, self.on_unmet)
                rule = self.on_unmet
            else:
                log.warning("round %s: %s; round skipped (the global model is unchanged)", server_round, why)
                return RoundResult(None, rule.name, dropped=dropped, skipped=why)
        result = self._run(rule, nodes, records, weights if self.weighted and takes_weights(rule) else None)
        result.dropped = dropped
        log.info("round %s: %s kept nodes %s, rejected %s, non-finite %s, dropped %s", server_round, result.rule,
                 result.selected, result.rejected, result.nonfinite, dropped)
        return result

    def _run(self, rule: Rule, nodes: list, records: list[dict], weights: list[float] | None) -> RoundResult:
        keys = list(records[0])
        first = records[0]
        fkeys = [k for k in keys if first[k].dtype.kind == "f"]
        ikeys = [k for k in keys if first[k].dtype.kind != "f"]
        n = len(records)
        sizes = [first[k].size for k in fkeys]
        X = np.empty((n, sum(sizes)), dtype=np.float32)  # one copy: the rule reads a stacked matrix
        for i, rec in enumerate(records):
            o = 0
            for k, s in zip(fkeys, sizes):
                X[i, o:o + s] = rec[k].reshape(-1)
                o += s
        if X.shape[1]:
            kw = {} if weights is None else {"weights": weights}
            agg, info = rule(torch.from_numpy(X), return_info=True, **kw)
            agg = agg.numpy()
            nonfinite = list(info.nonfinite)
        else:  # nothing floating: every reply counts (integer arrays cannot be non-finite)
            agg, info = X[0], None
            nonfinite = []
        selects = info is not None and info.selected is not None
        selected = list(info.selected) if selects else list(range(n))  # per-coordinate rules: every reply
        rejected = list(info.rejected) if selects else []
        bad = set(nonfinite)
        kept = [i for i in selected if i not in bad] or selected  # whose integer arrays count
        out: dict[str, np.ndarray] = {}
        if isinstance(rule, Krum) and info is not None:  # the selected reply, exactly as sent
            out = {k: np.array(records[selected[0]][k], copy=True) for k in keys}
        else:
            o = 0
            for k, s in zip(fkeys, sizes):
                out[k] = agg[o:o + s].reshape(first[k].shape).astype(first[k].dtype)
                o += s
            for k in ikeys:
                out[k] = self._integer(rule, [r[k] for r in records], kept, weights)
            out = {k: out[k] for k in keys}
        return RoundResult(out, info.rule if info is not None else rule.name, selected=[nodes[i] for i in selected],
                           rejected=[nodes[i] for i in rejected], nonfinite=[nodes[i] for i in nonfinite], info=info)

    @staticmethod
    def _integer(rule: Rule, arrays: list[np.ndarray], selected: list[int], weights: list[float] | None) -> np.ndarray:
        if isinstance(rule, Mean):  # Flower's FedAvg: sum of a * (w / total), float64, in reply order
            w = weights if weights is not None else [1.0] * len(arrays)
            total = sum(w)
            if not math.isfinite(total):  # weights near 1e308 (each finite, checked by the rule): scale first
                top = max(w)
                w = [wi / top for wi in w]
                total = sum(w)
            acc = arrays[0] * (w[0] / total)
            for a, wi in zip(arrays[1:], w[1:]):
                acc = acc + a * (wi / total)
            return np.asarray(acc)
        rows = np.stack([arrays[i] for i in (selected or range(len(arrays)))])
        # lower median per coordinate: the ceil(m/2)-th smallest, a value one of the replies holds
        return np.asarray(np.sort(rows, axis=0)[(len(rows) - 1) // 2], dtype=arrays[0].dtype)
