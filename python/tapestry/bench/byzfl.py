"""``tapestry bench --family byzfl``: ByzFL's rules in Tapestry, each timed against ByzFL 0.0.11's
own implementation in the same run (when ByzFL is installed), and against the usual baselines
(torch mean for per-coordinate rules, ``X @ X.T`` for the Gram-based ones).

Sizes: n = 16, f = 4 at d = 2^20 (the comparison point of the speed bar: at least 20x faster than
ByzFL), and the exact subset rules MDA and SMEA at n = 32, f = 8 on ``cfg.d``. The data is Gaussian
honest updates plus f shifted ones (a realistic round; on isotropic data with no outlier SMEA's
exact search is exponential in f). ByzFL's rules (MDA and SMEA enumerate C(n, f) subsets, so they
are timed at n = 16 only) run one warm-up and one round paired with Tapestry's (``Case.once``):
their ratios are tens to thousands, far beyond what one round's noise moves.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import torch


def _byzfl():
    """ByzFL's aggregators and pre-aggregators without its framework (see tests/byzfl_oracle.py)."""
    if "byzfl" not in sys.modules:
        spec = importlib.util.find_spec("byzfl")
        if spec is None:
            return None
        pkg = types.ModuleType("byzfl")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["byzfl"] = pkg
    return importlib.import_module("byzfl.aggregators.aggregators"), importlib.import_module("byzfl.aggregators.preaggregators")


def _round(n: int, d: int, f: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    X[n - f:] += 3.0 * torch.randn(1, d, generator=g)
    return X


def cases(cfg):
    import tapestry as tp
    from .harness import Case

    d = 1 << 16 if cfg.quick else 1 << 20
    n, f = 16, 4
    X = _round(n, d, f, cfg.seed)
    nbytes = X.numel() * 4
    out = [
        Case("byzfl", "torch_mean_16", lambda: X.mean(0), nbytes, is_baseline=True),
        Case("byzfl", "matmul_XXt_16", lambda: X @ X.T, nbytes, is_baseline=True),
    ]
    rules = {
        "meamed": (lambda: tp.meamed(X, f), "torch_mean_16"),
        "monna": (lambda: tp.monna(X, f), "torch_mean_16"),
        "mda": (lambda: tp.mda(X, f), "matmul_XXt_16"),
        "smea": (lambda: tp.smea(X, f), "matmul_XXt_16"),
        "caf": (lambda: tp.caf(X, f), "matmul_XXt_16"),
        "dnc": (lambda: tp.dnc(X, f), "matmul_XXt_16"),
        "fltrust": (lambda: tp.fltrust(X, X[0]), "torch_mean_16"),
        "arc+mean": (lambda: tp.arc(X, f, tp.Mean()), "torch_mean_16"),
        "bucketing+median": (lambda: tp.bucketing(X, 2, tp.Median()), "torch_mean_16"),
    }
    for name, (fn, base) in rules.items():
        out.append(Case("byzfl", name, fn, nbytes, "tapestry", baseline=base))
    lib = _byzfl()
    if lib is not None:
        agg, pre = lib
        theirs = {"meamed": agg.Meamed(f), "monna": agg.MoNNA(f), "mda": agg.MDA(f), "smea": agg.SMEA(f),
                  "caf": agg.CAF(f), "arc+mean": lambda V: agg.Average()(pre.ARC(f)(V.clone())),
                  "bucketing+median": lambda V: agg.Median()(pre.Bucketing(2)(V))}
        for name, fn in theirs.items():  # Tapestry's row is the baseline: the ratio is ByzFL's slowdown
            out.append(Case("byzfl", name, (lambda fn=fn: fn(X)), nbytes, "byzfl", baseline=f"{name}:tapestry:float32",
                            once=True))
    # the bar for the exact subset rules: n = 32, f = 8 at cfg.d within one second
    Y = _round(32, cfg.d, 8, cfg.seed + 1)
    ybytes = Y.numel() * 4
    out += [Case("byzfl", "matmul_XXt_32", lambda: Y @ Y.T, ybytes, is_baseline=True),
            Case("byzfl", "mda_n32_f8", lambda: tp.mda(Y, 8), ybytes, "tapestry", baseline="matmul_XXt_32"),
            Case("byzfl", "smea_n32_f8", lambda: tp.smea(Y, 8), ybytes, "tapestry", baseline="matmul_XXt_32")]
    return out
