"""Tapestry: robust, compressed and secure aggregation for federated training.

    import tapestry as tp
    agg = tp.trimmed_mean(updates, f=2)
    agg, info = tp.krum(updates, f=2, return_info=True)
    with tp.backend("cpu"):
        ...

See README.md for the command line and ``docs/spec.md`` for what each rule computes.
"""

from __future__ import annotations

import os as _os
import sys as _sys

if "torch" not in _sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(_os.environ):
    # Before the OpenMP runtime starts (torch's libgomp, which tapestry._C shares): a thread whose
    # share of a parallel region is done sleeps after ~10 microseconds of spinning, not the default
    # ~1 ms, so it does not hold a core that a busy machine's other work needs. Set either variable
    # to keep your own policy (docs/flower.md, "Small models on a busy machine").
    _os.environ["GOMP_SPINCOUNT"] = "10000"

from .aggregators import (
    NNM, RULES, AggregationInfo, Bulyan, CenteredClipping, GeometricMedian, Krum, Mean, Median, MultiKrum, Rule,
    TrimmedMean, bulyan, centered_clipping, geometric_median, krum, make_rule, mean, median, multi_krum, nnm,
    trimmed_mean,
)
from .aggregators import (
    ARC, CAF, MDA, SMEA, Bucketing, Clipping, DnC, FLTrust, Meamed, MoNNA, arc, bucketing, caf, clipping, dnc, fltrust,
    mda, meamed, monna, smea,
)
from .ops import BackendError, available_backends, backend
from .updates import UpdateSpec, as_matrix

__version__ = "0.1.0"

_SUBPACKAGES = ("compression", "secure", "federated", "distributed", "integrations", "optim")


def __getattr__(name: str):
    """``tp.compression``, ``tp.secure``, ... load on first use (``import tapestry`` stays light)."""
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'tapestry' has no attribute {name!r}")

__all__ = [
    "AggregationInfo", "Rule", "RULES", "make_rule", "UpdateSpec", "as_matrix",
    "Mean", "TrimmedMean", "Median", "Krum", "MultiKrum", "Bulyan", "NNM", "GeometricMedian", "CenteredClipping",
    "mean", "trimmed_mean", "median", "krum", "multi_krum", "bulyan", "nnm", "geometric_median", "centered_clipping",
    "MDA", "MoNNA", "Meamed", "CAF", "SMEA", "DnC", "FLTrust", "Bucketing", "Clipping", "ARC",
    "mda", "monna", "meamed", "caf", "smea", "dnc", "fltrust", "bucketing", "clipping", "arc",
    "backend", "available_backends", "BackendError", "__version__",
]
