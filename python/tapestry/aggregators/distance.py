"""Distance-based rules: Krum, Multi-Krum, Bulyan and NNM pre-aggregation.

All of them start from the pairwise squared distances ``D_ij = |x_i - x_j|^2``, obtained from the
``gram`` op (a float64 Gram matrix of the rows after a common per-coordinate shift, so a large
common component does not cancel away the spread). The small ``(n, n)`` work (scores, selection)
is done here in float64; the ``(n, d)`` work runs in the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AggregationInfo, Rule, apply, check_f, gram, indices, require
from .columns import Columns, Derived


@dataclass
class Distances:
    """Pairwise squared distances and which rows hold non-finite values."""

    D: torch.Tensor  # (n, n) float64 on the CPU: symmetric, exact zero diagonal, >= 0, inf for bad rows
    nonfinite: torch.Tensor  # (n,) bool
    backend: str


def pairwise_distances(src: Columns) -> Distances:
    G, backend = gram(src)
    return distances_from_gram(G, backend)


def distances_from_gram(G: torch.Tensor, backend: str) -> Distances:
    g = G.diagonal()
    nonfinite = ~torch.isfinite(g)  # a NaN/Inf entry makes the row's own square non-finite
    D = (g[:, None] + g[None, :] - (G + G.T)).clamp_(min=0)  # exactly symmetric, so mutual ties stay ties
    D[nonfinite, :] = float("inf")
    D[:, nonfinite] = float("inf")
    D.fill_diagonal_(0)
    return Distances(D, nonfinite, backend)


def krum_scores(D: torch.Tensor, nonfinite: torch.Tensor, among: torch.Tensor, f: int) -> torch.Tensor:
    """Krum scores of the rows in ``among`` (a bool mask), counting only neighbours in ``among``:
    the sum of squared distances to the ``max(1, m - f - 2)`` nearest others (``m = |among|``).
    Rows outside ``among`` or with non-finite values score ``inf``."""
    m = int(among.sum())
    k = max(1, m - f - 2)
    sub = D[among][:, among].clone()
    sub.fill_diagonal_(float("inf"))  # a row is not its own neighbour
    nearest = torch.sort(sub, dim=1).values[:, : min(k, m - 1)] if m > 1 else sub[:, :0]
    scores = torch.full((D.shape[0],), float("inf"), dtype=torch.float64)
    scores[among] = nearest.sum(dim=1)
    scores[nonfinite] = float("inf")
    return scores


def ranking(scores: torch.Tensor, nonfinite: torch.Tensor) -> torch.Tensor:
    """Clients ordered by score, ties to the lowest index, non-finite clients last."""
    order = torch.sort(scores, stable=True).indices
    return torch.cat([order[~nonfinite[order]], order[nonfinite[order]]])


def _check_krum(n: int, f: int, rule: str) -> None:
    require(n >= 2 * f + 3, f"{rule} needs n >= 2f+3, got n={n}, f={f}")


def _select_mean(src: Columns, chosen: list[int], weights=None) -> torch.Tensor:
    """The mean of the rows ``chosen``, weighted by their entries of ``weights`` when given."""
    w = torch.zeros(src.n, dtype=torch.float64)
    if weights is None:
        w[chosen] = 1.0 / len(chosen)
    else:
        from .coordinate import normalised_weights

        picked = normalised_weights(weights, src.n)[chosen]
        require(float(picked.sum()) > 0, f"multi_krum: the selected clients {chosen} all have weight 0")
        w[chosen] = picked / picked.sum()
    return apply("weighted_mean", src, w)[0]


class Krum(Rule):
    """Krum (Blanchard et al. 2017): the update whose ``n - f - 2`` nearest others are closest.

    ``score(i)`` is the sum of squared distances from ``x_i`` to its ``n-f-2`` nearest other
    updates; the result is ``x_argmin`` (ties to the lowest index), as float32. A client with a
    non-finite value scores ``inf`` and is never anyone's neighbour. Needs ``n >= 2f + 3``.
    """

    name = "krum"

    def __init__(self, f: int):
        self.f = check_f(f, self.name)

    def aggregate(self, src, *, want_info):
        n = src.n
        _check_krum(n, self.f, self.name)
        dist = pairwise_distances(src)
        scores = krum_scores(dist.D, dist.nonfinite, torch.ones(n, dtype=torch.bool), self.f)
        best = int(ranking(scores, dist.nonfinite)[0])
        agg = _select_mean(src, [best])  # a float32 copy of x_best, block by block
        info = AggregationInfo(self.name, n, f=self.f, selected=[best], rejected=[i for i in range(n) if i != best],
                               scores=scores, nonfinite=indices(dist.nonfinite), backend=dist.backend)
        return agg, info


class MultiKrum(Rule):
    """Multi-Krum: Krum scores computed once; the mean of the ``m`` updates with the lowest scores
    (Flower's and ByzFL's convention). Needs ``n >= 2f + 3`` and ``1 <= m <= n``; ``m=None``
    means ``n - f``. ``weights`` (e.g. example counts, as Flower's MultiKrum uses) weight the mean
    of the selected updates; the selection itself ignores them."""

    name = "multi_krum"

    def __init__(self, f: int, m: int | None = None):
        self.f = check_f(f, self.name)
        self.m = m

    def aggregate(self, src, *, want_info, weights=None):
        n = src.n
        _check_krum(n, self.f, self.name)
        m = n - self.f if self.m is None else self.m
        require(1 <= m <= n, f"multi_krum needs 1 <= m <= n, got m={m}, n={n}")
        dist = pairwise_distances(src)
        scores = krum_scores(dist.D, dist.nonfinite, torch.ones(n, dtype=torch.bool), self.f)
        order = ranking(scores, dist.nonfinite).tolist()
        chosen = sorted(order[:m])
        agg = _select_mean(src, chosen, weights)
        info = AggregationInfo(self.name, n, f=self.f, selected=chosen, rejected=sorted(order[m:]),
                               scores=scores, nonfinite=indices(dist.nonfinite), backend=dist.backend)
        return agg, info


class Bulyan(Rule):
    """Bulyan (El Mhamdi et al. 2018) over Krum.

    Selection: ``theta = n - 2f`` rounds of Krum on the remaining updates (same ``f``,
    ``max(1, n' - f - 2)`` neighbours among the ``n'`` remaining), each winner removed.
    Aggregation: per coordinate, the mean of the ``theta - 2f`` selected values closest to their
    median (ties in distance go to the smaller value). Needs ``n >= 4f + 3``.
    """

    name = "bulyan"

    def __init__(self, f: int):
        self.f = check_f(f, self.name)

    def aggregate(self, src, *, want_info):
        n, f = src.n, self.f
        require(n >= 4 * f + 3, f"bulyan needs n >= 4f+3, got n={n}, f={f}")
        dist = pairwise_distances(src)
        remaining = torch.ones(n, dtype=torch.bool)
        chosen = []
        for _ in range(n - 2 * f):
            scores = krum_scores(dist.D, dist.nonfinite, remaining, f)
            best = int(ranking(scores, dist.nonfinite | ~remaining)[0])
            chosen.append(best)
            remaining[best] = False
        rows = torch.tensor(sorted(chosen), dtype=torch.int64)
        agg, _ = apply("mean_around_median", src, rows, n - 4 * f)
        first_scores = krum_scores(dist.D, dist.nonfinite, torch.ones(n, dtype=torch.bool), f)
        info = AggregationInfo(self.name, n, f=f, selected=sorted(chosen), rejected=indices(remaining),
                               scores=first_scores, nonfinite=indices(dist.nonfinite), backend=dist.backend)
        return agg, info


class NNM(Rule):
    """Nearest-neighbour mixing (Allouah et al. 2023), then any rule.

    Each ``x_i`` is replaced by the mean of its ``n - f`` nearest updates (itself included; ties to
    the lowest index), and ``rule`` aggregates the mixed updates. A client with non-finite values
    is nobody's neighbour; its own mixed update stays non-finite (NaN) for ``rule`` to reject.
    Needs ``n > f``. Allocates the mixed ``(n, d)`` float32 matrix.
    """

    name = "nnm"

    def __init__(self, f: int, rule: Rule):
        self.f = check_f(f, self.name)
        if not isinstance(rule, Rule):
            raise TypeError(f"nnm: rule must be a tapestry rule object (e.g. tp.TrimmedMean(f=2)), got {type(rule).__name__}")
        self.rule = rule

    def aggregate(self, src, *, want_info):
        n, f = src.n, self.f
        require(n > f, f"nnm needs n > f, got n={n}, f={f}")
        dist = pairwise_distances(src)
        nearest = torch.sort(dist.D, dim=1, stable=True).indices[:, : n - f]
        A = torch.zeros(n, n, dtype=torch.float64)
        A.scatter_(1, nearest, 1.0)
        agg, info = self.rule.aggregate(Mixed(src, A, n - f, dist.nonfinite), want_info=want_info)
        info.rule = f"nnm+{info.rule}"
        info.nonfinite = indices(dist.nonfinite)
        return agg, info


class Mixed(Derived):
    """The NNM-mixed updates: row ``i`` is the mean of its neighbours' rows, ``(A @ X) / m`` for the
    0/1 neighbour matrix ``A`` (``m`` neighbours each), produced block by block in float64.

    With 0/1 weights every product is exact and so is (almost always) every float64 sum of a few
    float32 values, so a coordinate's value does not depend on the order the BLAS product adds
    in, which changes at the edges of its tiles: any blocking or sharding of the columns gives the
    same bits. Rows of clients with non-finite values are NaN; the others never read those clients."""

    max_block = 1 << 16  # bounded float64 temporaries

    def __init__(self, src: Columns, A: torch.Tensor, m: int, nonfinite: torch.Tensor):
        super().__init__(src, src.n)
        good = ~nonfinite
        self._good = good.to(src.device)
        self._A = A[good][:, good].to(src.device)
        self._m = m

    def read(self, start, stop):
        block = self.src.read(start, stop)
        Y = torch.full((self.n, stop - start), float("nan"), dtype=torch.float32, device=self.device)
        Y[self._good] = ((self._A @ block[self._good].to(torch.float64)) / self._m).to(torch.float32)
        return Y


def krum(updates, f: int, *, return_info: bool = False):
    """Krum; see :class:`Krum`."""
    return Krum(f)(updates, return_info=return_info)


def multi_krum(updates, f: int, m: int | None = None, *, weights=None, return_info: bool = False):
    """Multi-Krum; see :class:`MultiKrum`."""
    return MultiKrum(f, m)(updates, weights=weights, return_info=return_info)


def bulyan(updates, f: int, *, return_info: bool = False):
    """Bulyan; see :class:`Bulyan`."""
    return Bulyan(f)(updates, return_info=return_info)


def nnm(updates, f: int, rule: Rule, *, return_info: bool = False):
    """NNM pre-aggregation followed by ``rule``; see :class:`NNM`."""
    return NNM(f, rule)(updates, return_info=return_info)
