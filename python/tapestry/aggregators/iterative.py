"""Iterative rules: geometric median (smoothed Weiszfeld, RFA) and centered clipping.

Each iteration needs the distance from every update to the current centre (computed here in float64,
over column chunks) and a weighted mean of the updates (the ``weighted_mean`` kernel). Clients with
non-finite values are given weight 0, so they are never read by the kernel; ``info.nonfinite``
names them.
"""

from __future__ import annotations

import torch

from .base import AggregationInfo, Rule, apply, indices, nonfinite_rows, require, sq_distances_to, sq_norm


class GeometricMedian(Rule):
    """Geometric median by smoothed Weiszfeld iterations (Pillutla et al., RFA).

    ``z <- sum_i b_i x_i / sum_i b_i`` with ``b_i = w_i / max(nu, |x_i - z|)``, from the weighted
    mean, until ``|z_new - z| < tol * |z|`` (relative change) or ``max_iter`` iterations.
    ``info.scores`` holds the final normalised weights ``b_i``.
    """

    name = "geometric_median"

    def __init__(self, nu: float = 1e-6, tol: float = 1e-6, max_iter: int = 100):
        require(nu > 0, f"geometric_median needs nu > 0, got nu={nu}")
        require(tol > 0, f"geometric_median needs tol > 0, got tol={tol}")
        require(max_iter >= 1, f"geometric_median needs max_iter >= 1, got max_iter={max_iter}")
        self.nu, self.tol, self.max_iter = nu, tol, max_iter

    def aggregate(self, src, *, want_info, weights=None):
        from .coordinate import normalised_weights

        n = src.n
        bad = nonfinite_rows(src)
        w = normalised_weights(weights, n).clone()
        w[bad] = 0
        require(float(w.sum()) > 0, f"geometric_median: every client with weight > 0 sent non-finite values (clients {indices(bad)})")
        b = w / w.sum()
        z, backend = apply("weighted_mean", src, b)
        it = 0
        for it in range(1, self.max_iter + 1):  # noqa: B007  (the count goes into info)
            dist = sq_distances_to(src, z).sqrt()
            b = w / dist.clamp(min=self.nu)
            b[bad] = 0
            b /= b.sum()
            z_new, _ = apply("weighted_mean", src, b)
            change = sq_norm(src, z_new - z) ** 0.5
            scale = sq_norm(src, z) ** 0.5
            z = z_new
            if change <= self.tol * max(scale, self.nu):
                break
        scores = b.clone()
        scores[bad] = float("inf")
        info = AggregationInfo(self.name, n, scores=scores, nonfinite=indices(bad), backend=backend, iterations=it)
        return z, info


class CenteredClipping(Rule):
    """Centered clipping (Karimireddy et al. 2021): ``L`` iterations of
    ``v <- v + mean_i clip_tau(x_i - v)`` with ``clip_tau(u) = u * min(1, tau / |u|)``.

    The centre is ``center`` when given, else the previous aggregate of this rule object, else
    zero: the object keeps its last result as the next round's centre (call :meth:`reset` to
    forget it). Clients with non-finite values contribute nothing (their clipped step is 0), but
    still count in the ``1/n`` of the mean, as in the paper's definition.
    ``info.scores`` holds each client's clipping factor ``min(1, tau/|x_i - v|)`` of the last
    iteration.
    """

    name = "centered_clipping"

    def __init__(self, tau: float, iterations: int = 1, center: torch.Tensor | None = None):
        require(tau > 0, f"centered_clipping needs tau > 0, got tau={tau}")
        require(iterations >= 1, f"centered_clipping needs iterations >= 1, got {iterations}")
        self.tau, self.iterations = float(tau), iterations
        self._center = None if center is None else torch.as_tensor(center).detach().reshape(-1).to(torch.float32)

    def reset(self) -> None:
        self._center = None

    def aggregate(self, src, *, want_info, center=None):
        n, d = src.n, src.d
        v = center if center is not None else self._center
        v = (torch.zeros(d, dtype=torch.float32, device=src.device) if v is None
             else torch.as_tensor(v).reshape(-1).to(device=src.device, dtype=torch.float32))
        require(v.numel() == d, f"centered_clipping: center has {v.numel()} values, updates have d={d}")
        backend, c = None, torch.zeros(n, dtype=torch.float64)
        for _ in range(self.iterations):
            dist = sq_distances_to(src, v).sqrt()
            c = torch.where(torch.isfinite(dist), (self.tau / dist.clamp(min=1e-300)).clamp(max=1.0), torch.zeros_like(dist))
            # v + (1/n) sum_i c_i (x_i - v) = (1 - sum_i c_i / n) v + sum_i (c_i / n) x_i
            step, backend = apply("weighted_mean", src, c / n) if bool((c > 0).any()) else (torch.zeros_like(v), None)
            v = (1 - float(c.sum()) / n) * v + step
        self._center = v.detach().clone()
        info = AggregationInfo(self.name, n, scores=c, nonfinite=indices(~torch.isfinite(dist)), backend=backend,
                               iterations=self.iterations)
        return v, info


def geometric_median(updates, *, nu: float = 1e-6, tol: float = 1e-6, max_iter: int = 100, weights=None,
                     return_info: bool = False):
    """Geometric median; see :class:`GeometricMedian`."""
    return GeometricMedian(nu, tol, max_iter)(updates, weights=weights, return_info=return_info)


def centered_clipping(updates, tau: float, center=None, *, iterations: int = 1, return_info: bool = False):
    """Centered clipping from ``center`` (default zero); see :class:`CenteredClipping`."""
    return CenteredClipping(tau, iterations)(updates, center=center, return_info=return_info)
