"""Rules that average the best subset of ``n - f`` updates: MDA (smallest diameter) and SMEA
(smallest top eigenvalue of the covariance). Both are exact minima over all subsets, found by
searches that prune instead of enumerating the ``C(n, f)`` subsets, on the float64 Gram matrix
alone: one ``gram`` pass over the data, small searches, one ``weighted_mean`` pass.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import AggregationInfo, Rule, apply, check_f, gram, indices, require
from .distance import distances_from_gram
from .spectral import top_eigpair

# Diameters within this relative margin of the minimum are ties (float64 Gram rounding is ~1e-16).
TIE_RTOL = 1e-9


# ---------------------------------------------------------------------------------------------
# MDA: the smallest diameter is a threshold t at which n - f clients have no pair farther apart
# than t, i.e. removing at most f clients covers every "conflict" edge (D_ij > t): a vertex cover
# of size <= f, decided by a bounded search tree (Downey-Fellows). Binary search over the sorted
# pairwise distances finds the least feasible t.


def _cover(adj: list[int], alive: int, k: int) -> bool:
    """Whether removing at most ``k`` vertices of the bitmask ``alive`` leaves no edge of ``adj``
    (bitmask adjacency) inside ``alive``. Branches on a vertex of largest degree ``g``: remove it,
    or keep it and remove its ``g`` neighbours; degree-1 graphs are matchings (count the edges).
    Runs in O(1.62^k n) steps: both branches spend budget, the second at least 2."""
    best_v, best_deg, edges = -1, 0, 0
    a = alive
    while a:
        v = (a & -a).bit_length() - 1
        a &= a - 1
        deg = bin(adj[v] & alive).count("1")
        edges += deg
        if deg > best_deg:
            best_v, best_deg = v, deg
    edges //= 2
    if edges == 0:
        return True
    if k <= 0:
        return False
    if best_deg == 1:
        return edges <= k
    if best_deg > k:  # keeping v would cost more than the budget: v must go
        return _cover(adj, alive & ~(1 << best_v), k - 1)
    nb = adj[best_v] & alive
    return _cover(adj, alive & ~(1 << best_v), k - 1) or _cover(adj, alive & ~nb, k - best_deg)


def _conflicts(D: np.ndarray, t: float) -> list[int]:
    far = D > t
    return [int(sum(1 << j for j in np.flatnonzero(far[i]))) for i in range(len(D))]


def _feasible(adj: list[int], n: int, f: int, keep: list[int], drop: list[int]) -> bool:
    """Whether some ``n - f`` clients containing ``keep`` and none of ``drop`` are pairwise within
    the threshold that ``adj`` encodes."""
    alive = (1 << n) - 1
    budget = f - len(drop)
    for j in drop:
        alive &= ~(1 << j)
    for i in keep:  # a kept client's conflicts must all go
        nb = adj[i] & alive
        if nb & sum(1 << j for j in keep):
            return False
        budget -= bin(nb).count("1")
        alive &= ~nb
    return budget >= 0 and _cover(adj, alive, budget)


def mda_subset(D: np.ndarray, f: int) -> tuple[list[int], float]:
    """The lexicographically first ``n - f`` clients of least diameter (squared distances ``D``;
    ties within ``TIE_RTOL``), and that squared diameter. ``inf`` rows are never within a finite
    threshold of anyone."""
    n = len(D)
    m = n - f
    if m <= 1:
        return [0], 0.0
    cand = np.unique(D[np.triu_indices(n, 1)])
    cand = cand[np.isfinite(cand)]
    lo, hi = 0, len(cand)  # least feasible index in cand; len(cand) means "only at infinity"
    while lo < hi:
        mid = (lo + hi) // 2
        if _feasible(_conflicts(D, cand[mid]), n, f, [], []):
            hi = mid
        else:
            lo = mid + 1
    t = float(cand[lo]) if lo < len(cand) else float("inf")
    adj = _conflicts(D, t * (1 + TIE_RTOL) if np.isfinite(t) else np.inf)
    keep, drop = [], []
    for i in range(n):  # the lexicographically first subset: take i whenever a completion exists
        if len(keep) == m:
            break
        if len(drop) == f or _feasible(adj, n, f, keep + [i], drop):
            keep.append(i)
        else:
            drop.append(i)
    return keep, t


class MDA(Rule):
    """Minimum-Diameter Averaging (El Mhamdi et al. 2020): the mean of the ``n - f`` updates
    whose largest pairwise distance is smallest.

    Exact: the least diameter is found by a binary search over the ``n(n-1)/2`` distances, each
    step a vertex-cover decision with budget ``f`` on the graph of pairs farther apart (bounded
    search tree), so the search costs ``O(log(n) 1.62^f n^2)`` bit operations instead of ByzFL's
    ``C(n, f) (n-f)^2``; the data is read twice (``gram``, ``weighted_mean``). Ties (diameters
    within ``1e-9`` relative) go to the lexicographically first subset, the one ByzFL's
    enumeration keeps. A client with a non-finite value is infinitely far from everyone: it is
    chosen only when fewer than ``n - f`` clients are finite (the result is then non-finite).
    Needs ``n > 2f``. ``info.scores``: each client's largest squared distance to the chosen ones.
    """

    name = "mda"

    def __init__(self, f: int):
        self.f = check_f(f, self.name)

    def aggregate(self, src, *, want_info):
        n, f = src.n, self.f
        require(n > 2 * f, f"mda needs n > 2f, got n={n}, f={f}")
        G, backend = gram(src)
        dist = distances_from_gram(G, backend)
        chosen, _ = mda_subset(dist.D.numpy(), f)
        w = torch.zeros(n, dtype=torch.float64)
        w[chosen] = 1.0 / len(chosen)
        agg, _ = apply("weighted_mean", src, w)
        scores = dist.D[:, chosen].amax(dim=1)
        info = AggregationInfo(self.name, n, f=f, selected=chosen, rejected=[i for i in range(n) if i not in chosen],
                               scores=scores, nonfinite=indices(dist.nonfinite), backend=backend)
        return agg, info


# ---------------------------------------------------------------------------------------------
# SMEA: lambda_max of the scatter matrix M_S = sum_{i in S} (x_i - mu_S)(x_i - mu_S)^T only grows
# when a client joins S (M_{S+j} = M_S + |S|/(|S|+1) a a^T with a = x_j - mu_S), so a partial
# subset's value bounds every completion from below: branch and bound over inclusions.


def _scatter_gram(G: np.ndarray, S: list[int]) -> np.ndarray:
    """``(x_i - mu_S) . (x_j - mu_S)`` for ``i, j`` in ``S``."""
    sub = G[np.ix_(S, S)]
    r = sub.mean(axis=1)
    return sub - r[:, None] - r[None, :] + r.mean()


def _lam(G: np.ndarray, S: list[int]) -> float:
    return float(np.linalg.eigvalsh(_scatter_gram(G, S))[-1]) if len(S) > 1 else 0.0


def _extension_bounds(G: np.ndarray, S: list[int], R: np.ndarray, lam: float, u: np.ndarray) -> np.ndarray:
    """Lower bounds on ``lambda_max(M_{S+j})`` for each ``j`` in ``R``: with ``a = x_j - mu_S``
    and ``v`` the top eigenvector of ``M_S``, both ``lam + c (a.v)^2`` and ``c |a|^2``
    (``c = |S| / (|S| + 1)``) are Rayleigh quotients of ``M_{S+j}``."""
    t = len(S)
    if t == 0:
        return np.zeros(len(R))
    GS = G[np.ix_(S, S)]
    GRS = G[np.ix_(R, S)]
    a2 = G[R, R] - 2 * GRS.mean(axis=1) + GS.mean()  # |x_j - mu_S|^2
    c = t / (t + 1)
    bound = c * np.maximum(a2, 0.0)
    if t > 1 and lam > 0:
        # a . v with v = sum_i u_i (x_i - mu_S) / sqrt(lam): centred cross-Gram times u
        cross = GRS - GRS.mean(axis=1, keepdims=True) - GS.mean(axis=0)[None, :] + GS.mean()
        proj = cross @ u / np.sqrt(lam)
        bound = np.maximum(bound, lam + c * proj**2)
    return np.maximum(bound, lam)


def smea_subset(G: np.ndarray, f: int, bad: np.ndarray) -> tuple[list[int], float, int]:
    """The ``n - f`` clients whose scatter matrix has the least top eigenvalue, that eigenvalue
    (of the scatter, ``|S|`` times the covariance's) and the number of search nodes visited.
    Clients in ``bad`` (non-finite) come last and are taken only when unavoidable."""
    n = len(G)
    m = n - f
    good = [i for i in range(n) if not bad[i]]
    if len(good) < m:  # no finite answer exists: the first finite clients, then the first others
        return sorted(good + [i for i in range(n) if bad[i]][: m - len(good)]), float("inf"), 0
    Gg = G[np.ix_(good, good)]
    ng, fg = len(good), len(good) - m
    # greedy start: drop, f times, the client whose removal lowers lambda_max most
    S = list(range(ng))
    for _ in range(fg):
        S = min(([s for s in S if s != j] for j in S), key=lambda T: _lam(Gg, T))
    best_val, best_set = _lam(Gg, S), sorted(S)
    order = S + [j for j in range(ng) if j not in S]  # likely members first: early leaves are good
    nodes = 0

    def search(T: list[int], p: int, drops_left: int, lam: float, u: np.ndarray) -> None:
        nonlocal best_val, best_set, nodes
        nodes += 1
        need = m - len(T)
        if need == 0:
            if lam < best_val:
                best_val, best_set = lam, sorted(T)
            return
        R = np.array(order[p:])
        bounds = _extension_bounds(Gg, T, R, lam, u)
        if np.partition(bounds, need - 1)[need - 1] >= best_val:
            return  # any completion takes `need` of R, so at least the need-th smallest bound
        j = order[p]
        if bounds[0] < best_val:
            T2 = T + [j]
            lam2, u2 = top_eigpair(_scatter_gram(Gg, T2)) if len(T2) > 1 else (0.0, np.ones(1))
            if lam2 < best_val:
                search(T2, p + 1, drops_left, lam2, u2)
        if drops_left > 0:
            search(T, p + 1, drops_left - 1, lam, u)

    search([], 0, fg, 0.0, np.zeros(0))
    return sorted(good[i] for i in best_set), best_val, nodes


class SMEA(Rule):
    """Smallest Maximum Eigenvalue Averaging (Allouah et al. 2023): the mean of the ``n - f``
    updates whose empirical covariance has the smallest top eigenvalue.

    Exact, where ByzFL estimates each eigenvalue by one power iteration from a random vector
    (a different answer each call): every eigenvalue comes from the small ``|S| x |S|`` centred
    Gram matrix of the subset, and a branch and bound over inclusions prunes with the lower bounds
    that monotonicity gives (a partial subset's top eigenvalue, and Rayleigh quotients of each
    one-client extension). Worst case ``O(C(n, f))`` eigenproblems of size ``n - f`` (nearly
    isotropic data with no outliers); with outliers the bounds cut most branches. The data is
    read twice (``gram``, ``weighted_mean``). Clients with non-finite values are excluded while
    ``n - f`` finite ones exist. Needs ``n > 2f``. ``info.iterations``: search nodes visited.
    """

    name = "smea"

    def __init__(self, f: int):
        self.f = check_f(f, self.name)

    def aggregate(self, src, *, want_info):
        n, f = src.n, self.f
        require(n > 2 * f, f"smea needs n > 2f, got n={n}, f={f}")
        G, backend = gram(src)
        bad = ~torch.isfinite(G.diagonal())
        Gn = G.numpy().copy()
        Gn[bad.numpy(), :] = 0.0
        Gn[:, bad.numpy()] = 0.0
        chosen, val, nodes = smea_subset(Gn, f, bad.numpy())
        w = torch.zeros(n, dtype=torch.float64)
        w[chosen] = 1.0 / len(chosen)
        agg, _ = apply("weighted_mean", src, w)
        info = AggregationInfo(self.name, n, f=f, selected=chosen, rejected=[i for i in range(n) if i not in chosen],
                               scores=torch.tensor([val / len(chosen)], dtype=torch.float64),
                               nonfinite=indices(bad), backend=backend, iterations=nodes)
        return agg, info


def mda(updates, f: int, *, return_info: bool = False):
    """Minimum-Diameter Averaging; see :class:`MDA`."""
    return MDA(f)(updates, return_info=return_info)


def smea(updates, f: int, *, return_info: bool = False):
    """Smallest Maximum Eigenvalue Averaging; see :class:`SMEA`."""
    return SMEA(f)(updates, return_info=return_info)
