"""The reference backend: readable PyTorch for every op, the executable form of ``SPEC.md``.

Every other backend is tested against these functions, evaluated on float64 copies of the inputs.
They run on any device and any float dtype, accumulate in float64 and return float32 (float64
for float64 input). Speed and memory are not their concern; clarity is.

Ranking convention shared by every per-coordinate op (SPEC.md, "Non-finite inputs"): values are
ordered -Inf < finite < +Inf < NaN, which is exactly the order of ``torch.sort`` (NaN last).
"""

from __future__ import annotations

import torch


def unavailable() -> str | None:
    return None


def rejects(device: torch.device) -> str | None:
    return None


def _result(X: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return r if X.dtype == torch.float64 else r.to(torch.float32)


def _sorted(X: torch.Tensor) -> torch.Tensor:
    """Columns sorted ascending in float64, -Inf first and NaN last."""
    return torch.sort(X.to(torch.float64), dim=0, stable=True).values


# ---------------------------------------------------------------------------------------------
# robust aggregation


def weighted_mean(X: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i x_i`` over the rows with ``w_i != 0`` (zero-weight rows are never read, so
    their non-finite values cannot reach the result). ``w`` is already normalised."""
    keep = torch.nonzero(w != 0).flatten().to(X.device)
    rows = X.index_select(0, keep).to(torch.float64)
    return _result(X, (w.to(device=X.device, dtype=torch.float64)[keep, None] * rows).sum(0))


def trimmed_mean(X: torch.Tensor, f: int) -> torch.Tensor:
    """Per coordinate: drop the ``f`` smallest and ``f`` largest values, average the rest."""
    n = X.shape[0]
    return _result(X, _sorted(X)[f : n - f].mean(0))


def coord_median(X: torch.Tensor) -> torch.Tensor:
    """Per coordinate median; for even ``n`` the mean of the two middle values (NumPy's rule)."""
    n = X.shape[0]
    S = _sorted(X)
    if n % 2:
        return _result(X, S[n // 2])
    return _result(X, (S[n // 2 - 1] + S[n // 2]) / 2)


def mean_around_median(X: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    """Bulyan's coordinate stage: per coordinate, among the values of ``rows``, the mean of the
    ``k`` values closest to their median. Ties in distance go to the smaller value, so the ``k``
    values always form a contiguous window of the sorted column."""
    sub = X.index_select(0, rows.to(X.device))
    S = _sorted(sub)
    med = coord_median(S.to(torch.float64)).to(torch.float64)
    dist = (S - med).abs()
    # stable sort on distance keeps ascending value order among equal distances
    order = torch.sort(dist, dim=0, stable=True).indices[:k]
    return _result(X, torch.gather(S, 0, order).mean(0))


def gram(X: torch.Tensor) -> torch.Tensor:
    """float64 Gram matrix of the rows after subtracting the mean of the finite rows.

    Any common per-coordinate shift leaves ``|x_i - x_j|^2 = G_ii + G_jj - 2 G_ij`` unchanged;
    centring keeps it accurate when the updates share a large common component. A row with a
    non-finite entry has non-finite entries in its own row and column of ``G`` only."""
    X64 = X.to(torch.float64)
    finite = torch.isfinite(X64).all(dim=1)
    shift = X64[finite].mean(0) if bool(finite.any()) else torch.zeros_like(X64[0])
    C = X64 - shift
    return C @ C.T


# ---------------------------------------------------------------------------------------------
# compression (see tapestry.compression)


# ---------------------------------------------------------------------------------------------
# secure sum (see tapestry.secure)
