"""What the kernel and rule tests share: test data and the one tolerance policy.

Tolerance (docs/spec.md, "Numerics"), per output coordinate ``j``::

    |got_j - want_j| <= rel * range_j + 2^-24 * |want_j|

``want`` is the reference evaluated in float64, ``range_j`` the spread of the finite inputs in
column ``j`` (``rel`` = 1e-6 unless a test states why it needs more), and ``2^-24 |want_j|`` the
half unit in the last place that rounding the exact value to a float32 output costs, which
nothing can avoid when the inputs share a component far larger than their spread. Non-finite expectations must match exactly (NaN for NaN, the same infinity).
Distances derived from a Gram matrix are checked against the direct float64 computation
(:func:`assert_distances`).
"""

from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HALF_ULP32 = 2.0**-24


def make(n, d, *, seed=0, dtype=torch.float32, common=0.0, ties=True, nonfinite=0, device=DEVICE):
    """(n, d) updates: normal noise around a common component, a few columns with heavy ties,
    and ``nonfinite`` clients holding NaN / +Inf / -Inf in the first columns."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) + common * torch.randn(1, d, generator=g, dtype=torch.float64)
    if ties and d >= 3:
        X[:, 0] = 1.0
        X[:, 1] = torch.randint(0, 3, (n,), generator=g).to(torch.float64)
    specials = [float("nan"), float("inf"), -float("inf")]
    for i in range(nonfinite):
        X[i, (i % max(d, 1)) :: max(1, d // 3 or 1)] = specials[i % 3]
    return X.to(dtype).to(device)


def finite_range(X: torch.Tensor) -> torch.Tensor:
    """Per column, the spread of the finite values (0 where a column has none)."""
    X = X.detach().double().cpu()
    fin = torch.isfinite(X)
    hi = torch.where(fin, X, -float("inf")).amax(0)
    lo = torch.where(fin, X, float("inf")).amin(0)
    return torch.where(fin.any(0), hi - lo, torch.zeros_like(hi))


def assert_close(actual, expected, X, *, rel=1e-6, what=""):
    """The policy above; the first mismatches are printed."""
    actual = torch.as_tensor(actual).detach().double().cpu()
    expected = torch.as_tensor(expected).detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    rng = finite_range(X)
    tol = rel * rng + HALF_ULP32 * expected.abs()
    same_special = ~torch.isfinite(expected) & ((actual == expected) | (actual.isnan() & expected.isnan()))
    ok = ((actual - expected).abs() <= tol) | same_special
    if not bool(ok.all()):
        idx = torch.nonzero(~ok).flatten()[:5].tolist()
        rows = ", ".join(f"[{j}] got {actual[j].item()!r} want {expected[j].item()!r} (range {rng[j].item():.3g})" for j in idx)
        raise AssertionError(f"{what}: {int((~ok).sum())} of {ok.numel()} coordinates off: {rows}")


def distances(G: torch.Tensor) -> torch.Tensor:
    """Squared distances from a (possibly centred) Gram matrix."""
    g = G.diagonal()
    return g[:, None] + g[None, :] - 2 * G


def direct_distances(X: torch.Tensor) -> torch.Tensor:
    """Squared distances computed directly in float64 (no Gram cancellation)."""
    X64 = X.detach().double().cpu()
    return torch.cdist(X64, X64, compute_mode="donot_use_mm_for_euclid_dist") ** 2


def assert_distances(G: torch.Tensor, X: torch.Tensor, what: str, rtol: float = 1e-4) -> None:
    """Distances from ``G`` against :func:`direct_distances`: relative ``rtol`` per entry, or, for
    pairs far closer than their rows are to the mean (where any float32 Gram method cancels),
    ``1e-6`` of ``|x_a - mean|^2 + |x_b - mean|^2``."""
    X64 = X.detach().double().cpu()
    D, D0 = distances(G.detach().double().cpu()), direct_distances(X)
    r = ((X64 - X64.mean(0)) ** 2).sum(1)
    tol = torch.maximum(rtol * D0, 1e-6 * (r[:, None] + r[None, :]))
    bad = (D - D0).abs() > tol
    if bool(bad.any()):
        a, b = torch.nonzero(bad)[0].tolist()
        raise AssertionError(f"{what}: D[{a},{b}] = {D[a, b].item()!r}, direct {D0[a, b].item()!r}, tol {tol[a, b].item():.3g}")


def infinite_median_columns() -> tuple[torch.Tensor, dict[int, list[float]]]:
    """Columns whose median is infinite, and mean_around_median's result for k = 3 and 4: the
    equal infinities are at distance 0 from it (not NaN), then the window grows as usual."""
    inf, nan = float("inf"), float("nan")
    X = torch.tensor([[-inf, -inf, inf, 0.0], [-inf, -inf, inf, 1.0], [-inf, -inf, inf, 2.0],
                      [1.0, inf, 0.0, 3.0], [2.0, inf, nan, 4.0]])
    return X, {3: [-inf, -inf, inf, 2.0], 4: [-inf, nan, inf, 1.5]}
