"""Robust aggregation rules: each a class (parameters fixed at construction) and a function."""

from __future__ import annotations

import inspect

from .base import AggregationInfo, Rule
from .coordinate import Mean, Median, TrimmedMean, mean, median, trimmed_mean
from .distance import NNM, Bulyan, Krum, MultiKrum, bulyan, krum, multi_krum, nnm
from .iterative import CenteredClipping, GeometricMedian, centered_clipping, geometric_median
from .anchored import FLTrust, Meamed, MoNNA, fltrust, meamed, monna
from .preagg import ARC, Bucketing, Clipping, arc, bucketing, clipping
from .spectral import CAF, DnC, caf, dnc
from .subsets import MDA, SMEA, mda, smea

# Rule names as the command line, the training loop and integrations spell them.
RULES: dict[str, type[Rule]] = {
    "mean": Mean,
    "trimmed_mean": TrimmedMean,
    "median": Median,
    "krum": Krum,
    "multi_krum": MultiKrum,
    "bulyan": Bulyan,
    "geometric_median": GeometricMedian,
    "centered_clipping": CenteredClipping,
    "mda": MDA,
    "monna": MoNNA,
    "meamed": Meamed,
    "caf": CAF,
    "smea": SMEA,
    "dnc": DnC,
    "fltrust": FLTrust,
}

# Pre-aggregators composed as "<name>+<rule>": the class and the parameters it takes itself
# (f goes to both the pre-aggregator and the inner rule, when they take it).
PREAGGREGATORS: dict[str, tuple[type[Rule], tuple[str, ...]]] = {
    "nnm": (NNM, ("f",)),
    "bucketing": (Bucketing, ("s", "seed")),
    "clipping": (Clipping, ("c",)),
    "arc": (ARC, ("f",)),
}


def make_rule(name: str, **params) -> Rule:
    """A rule object from its name (see :data:`RULES`) and parameters. ``<pre>+<rule>`` wraps
    ``<rule>`` in a pre-aggregator of :data:`PREAGGREGATORS` (``nnm``, ``bucketing``, ``clipping``,
    ``arc``; they chain: ``arc+nnm+krum``): the pre-aggregator takes its own parameters (``f``;
    ``s``, ``seed``; ``c``) and ``f`` is given to the inner rule too when it takes one. Unknown
    names list the valid ones."""
    pre, _, rest = name.partition("+")
    if rest:
        if pre not in PREAGGREGATORS:
            raise ValueError(f"unknown pre-aggregator {pre!r} in {name!r}; valid: {', '.join(PREAGGREGATORS)}")
        cls, own = PREAGGREGATORS[pre]
        missing = [p for p in own if p not in params and p != "seed"]
        if missing:
            raise ValueError(f"{name}: {cls.__name__} needs {', '.join(missing)}")
        inner_params = {k: v for k, v in params.items() if k not in own or k == "f"}
        base = rest.split("+")[-1]
        if "f" in inner_params and "f" not in inspect.signature(RULES.get(base, Rule).__init__).parameters \
                and rest == base:
            inner_params.pop("f")
        return cls(**{k: params[k] for k in own if k in params}, rule=make_rule(rest, **inner_params))
    if name not in RULES:
        raise ValueError(f"unknown rule {name!r}; valid: {', '.join(RULES)}, or <pre>+<rule> with <pre> one of "
                         f"{', '.join(PREAGGREGATORS)}")
    return RULES[name](**params)


__all__ = [
    "AggregationInfo", "Rule", "RULES", "make_rule",
    "Mean", "TrimmedMean", "Median", "Krum", "MultiKrum", "Bulyan", "NNM", "GeometricMedian", "CenteredClipping",
    "mean", "trimmed_mean", "median", "krum", "multi_krum", "bulyan", "nnm", "geometric_median", "centered_clipping",
    "MDA", "MoNNA", "Meamed", "CAF", "SMEA", "DnC", "FLTrust", "Bucketing", "Clipping", "ARC", "PREAGGREGATORS",
    "mda", "monna", "meamed", "caf", "smea", "dnc", "fltrust", "bucketing", "clipping", "arc",
]
