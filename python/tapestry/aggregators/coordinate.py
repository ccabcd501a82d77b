"""Per-coordinate rules: mean / FedAvg, trimmed mean, coordinate median."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..updates import all_finite
from .base import AggregationInfo, Rule, apply, check_f, indices, nonfinite_rows, require


def normalised_weights(weights: Sequence[float] | torch.Tensor | None, n: int) -> torch.Tensor:
    """float64 weights summing to 1; checks docs/spec.md's ``w_i >= 0``, ``sum w > 0``, every weight
    finite, and names the first client whose weight breaks them. The weights are divided by the
    largest before they are summed, so that weights near 1e308 (example counts a hostile client
    reports) neither overflow the sum to inf (which would make every weight 0) nor lose the others."""
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    try:
        w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu().reshape(-1)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"mean: weights must be numbers, one per client ({exc})") from None
    require(w.numel() == n, f"mean: got {w.numel()} weights for n={n} updates")
    check_weights(w)
    top = float(w.max())
    require(top > 0, f"mean needs sum of weights > 0, got {float(w.sum())} (every weight is 0)")
    w = w / top  # in [0, 1]: the sum is at most n, finite
    return w / w.sum()


def check_weights(weights, what: str = "client") -> None:
    """Every weight finite and >= 0, else a ValueError naming the first ``what`` (client index)
    whose weight is not. For other entry points of weights (Flower replies, the trainer): call
    this, then :func:`normalised_weights` (which also guards the sum against overflow)."""
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    bad = torch.nonzero(~torch.isfinite(w) | (w < 0)).flatten().tolist()
    if bad:
        raise ValueError(f"mean: weights must be finite and >= 0; {what} {bad[0]} has weight {w[bad[0]].item()}")


class Mean(Rule):
    """FedAvg: ``sum_i w_i x_i / sum_i w_i`` (weights default to 1; Flower passes example counts).

    No protection: a non-finite update makes the mean non-finite, and ``info.nonfinite`` names the
    clients that caused it. A client with weight 0 is not read at all.
    """

    name = "mean"

    def aggregate(self, src, *, want_info, weights=None):
        w = normalised_weights(weights, src.n)
        agg, backend = apply("weighted_mean", src, w)
        info = AggregationInfo(self.name, src.n, backend=backend)
        bad_shards = src.reduce(torch.tensor([0.0 if all_finite(agg) else 1.0], dtype=torch.float64,
                                             device=agg.device))
        if want_info or float(bad_shards[0]) > 0:
            info.nonfinite = indices(nonfinite_rows(src) & (w != 0))
        return agg, info


class TrimmedMean(Rule):
    """Per coordinate, drop the ``f`` smallest and ``f`` largest values and average the rest
    (Yin et al. 2018). Give ``f``, or ``beta`` in ``[0, 0.5)`` for ``f = floor(beta * n)``
    (Flower's ``proportiontocut``); with neither, ``beta = 0.2`` (Flower's FedTrimmedAvg default).

    NaN and +Inf rank above every finite value, -Inf below: with at most ``f`` non-finite values in
    a coordinate the result there is finite.
    """

    name = "trimmed_mean"

    def __init__(self, f: int | None = None, beta: float | None = None):
        if f is not None and beta is not None:
            raise ValueError("trimmed_mean: give f or beta, not both")
        if f is not None:
            check_f(f, self.name)
        if beta is not None:
            require(isinstance(beta, (int, float)) and 0 <= beta < 0.5, f"trimmed_mean needs beta in [0, 0.5), got beta={beta}")
        elif f is None:
            beta = 0.2
        self.f, self.beta = f, beta

    def trim(self, n: int) -> int:
        f = self.f if self.f is not None else math.floor(self.beta * n)
        require(2 * f < n, f"trimmed_mean needs 2f < n, got n={n}, f={f}")
        return f

    def aggregate(self, src, *, want_info):
        f = self.trim(src.n)
        agg, backend = apply("trimmed_mean", src, f)
        info = AggregationInfo(self.name, src.n, f=f, backend=backend)
        if want_info:
            info.nonfinite = indices(nonfinite_rows(src))
        return agg, info


class Median(Rule):
    """Coordinate-wise median; for even ``n`` the mean of the two middle values (NumPy's
    convention, not ``torch.median``'s lower one). Non-finite values are ranked as in TrimmedMean."""

    name = "median"

    def aggregate(self, src, *, want_info):
        agg, backend = apply("coord_median", src)
        info = AggregationInfo(self.name, src.n, backend=backend)
        if want_info:
            info.nonfinite = indices(nonfinite_rows(src))
        return agg, info


def mean(updates, weights=None, *, return_info: bool = False):
    """FedAvg of ``updates``; see :class:`Mean`."""
    return Mean()(updates, weights=weights, return_info=return_info)


def trimmed_mean(updates, f: int | None = None, beta: float | None = None, *, return_info: bool = False):
    """Coordinate-wise trimmed mean; see :class:`TrimmedMean`."""
    return TrimmedMean(f=f, beta=beta)(updates, return_info=return_info)


def median(updates, *, return_info: bool = False):
    """Coordinate-wise median; see :class:`Median`."""
    return Median()(updates, return_info=return_info)
