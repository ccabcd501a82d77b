"""Robust aggregation rules: each a class (parameters fixed at construction) and a function."""

from __future__ import annotations

import inspect

from .base import AggregationInfo, Rule
from .coordinate import Mean, Median, TrimmedMean, mean, median, trimmed_mean
from .distance import NNM, Bulyan, Krum, MultiKrum, bulyan, krum, multi_krum, nnm
from .iterative import CenteredClipping, GeometricMedian, centered_clipping, geometric_median

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
}


def make_rule(name: str, **params) -> Rule:
    """A rule object from its name (see :data:`RULES`) and parameters; ``nnm+<rule>`` wraps
    ``<rule>`` in NNM pre-aggregation with the same ``f`` (given to ``<rule>`` too when it takes
    one). Unknown names list the valid ones."""
    if name.startswith("nnm+"):
        if "f" not in params:
            raise ValueError(f"{name}: NNM needs f")
        inner_params = dict(params)
        if "f" not in inspect.signature(RULES.get(name[4:], Rule).__init__).parameters:
            inner_params.pop("f")
        return NNM(params["f"], make_rule(name[4:], **inner_params))
    if name not in RULES:
        raise ValueError(f"unknown rule {name!r}; valid: {', '.join(RULES)}, or nnm+<rule>")
    return RULES[name](**params)


__all__ = [
    "AggregationInfo", "Rule", "RULES", "make_rule",
    "Mean", "TrimmedMean", "Median", "Krum", "MultiKrum", "Bulyan", "NNM", "GeometricMedian", "CenteredClipping",
    "mean", "trimmed_mean", "median", "krum", "multi_krum", "bulyan", "nnm", "geometric_median", "centered_clipping",
]
