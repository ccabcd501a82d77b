"""Spectral filters: CAF (covariance-bound agnostic filter) and DnC (divide and conquer).

Both need the top eigenpair of a (weighted) covariance of the updates, a ``d x d`` matrix that is
never formed: with ``Y = W^(1/2) (X - mu)``, the covariance ``Y^T Y`` and the ``n x n`` matrix
``Y Y^T`` share their nonzero eigenvalues, and the projection of every centred update on the top
eigenvector ``v = Y^T u / sqrt(lambda)`` is ``(X - mu) Y^T u / sqrt(lambda)``: entries of the
float64 Gram matrix times small vectors. So one ``gram`` pass over the data gives every
eigenpair exactly (LAPACK on ``n x n``), and one ``weighted_mean`` pass gives the result.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import CHUNK, AggregationInfo, Rule, _numpy_ok, apply, check_f, gram, require
from .columns import Columns


def centred_gram(G: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``(x_i - mu) . (x_j - mu)`` with ``mu = sum_k w_k x_k`` (``w`` sums to 1), from the Gram matrix."""
    r = G @ w
    return G - r[:, None] - r[None, :] + w @ r


def top_eigpair(K: np.ndarray) -> tuple[float, np.ndarray]:
    """Top eigenvalue and a unit eigenvector of the small symmetric PSD matrix ``K``.

    The value from ``eigvalsh``; the vector by two steps of inverse iteration shifted just above it
    (accurate to ~1e-10 of the eigengap). LAPACK's eigenvector drivers call threaded BLAS that,
    on a loaded machine, take milliseconds for a 30 x 30 matrix; these two calls take microseconds."""
    lam = float(np.linalg.eigvalsh(K)[-1])
    m = len(K)
    if lam <= 0:
        return 0.0, np.zeros(m)
    v = K[:, int(np.argmax(K.diagonal()))] + K.sum(axis=1) / m  # not orthogonal to the top eigenvector
    shifted = (lam * (1 + 1e-10) + 1e-300) * np.eye(m) - K
    try:
        for _ in range(2):
            v = np.linalg.solve(shifted, v)
            v /= np.linalg.norm(v)
    except np.linalg.LinAlgError:
        v = np.linalg.eigh(K)[1][:, -1]
    if not np.all(np.isfinite(v)):
        v = np.linalg.eigh(K)[1][:, -1]
    return lam, v


def top_direction(K: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray]:
    """Top eigenvalue ``lambda`` of the covariance ``sum_i w_i (x_i - mu)(x_i - mu)^T`` and the
    projections ``(x_j - mu) . v`` of every update on its top unit eigenvector ``v`` (``K`` is the
    centred Gram matrix). ``lambda = 0`` (all weighted updates equal) gives zero projections."""
    s = np.sqrt(w)
    lam, u = top_eigpair(s[:, None] * K * s[None, :])
    if lam <= 0:
        return 0.0, np.zeros(len(w))
    return lam, K @ (s * u) / np.sqrt(lam)


class CAF(Rule):
    """Covariance-bound Agnostic Filter (Allouah, Guerraoui and Stephan, ICML 2025).

    Weights ``c_i`` start at 1; while ``sum c > n - 2f``: ``mu_c`` is the ``c``-weighted mean,
    ``(lambda, v)`` the top eigenpair of the ``c``-weighted covariance, ``tau_i = ((x_i - mu_c) . v)^2``
    for every client, and ``c_i <- c_i (1 - tau_i / max_j tau_j)``. The result is the ``mu_c`` of
    the iteration with the smallest ``lambda``.

    Exact: ByzFL estimates each eigenpair with one power iteration from a random vector (a
    different answer each call); here every eigenpair comes from the ``n x n`` Gram matrix
    (module docstring). When the top eigenvalue is repeated, the eigenvector LAPACK returns is
    used. When the weighted updates coincide (``lambda = 0``) their mean is returned at once
    (ByzFL divides 0 by 0 there). The weights can shrink slowly (``tau_max`` is taken over every
    client, as ByzFL does, so a far client already at weight 0 keeps the steps small: thousands of
    iterations when ``n - 2f`` is small); ``max_iter`` (default 100000, each iteration an
    ``n x n`` eigenproblem) bounds the loop. A client with a non-finite value starts with weight 0 and is
    ignored. Needs ``n > 2f``. ``info.scores``: the final weights; ``info.iterations``: the loop's.
    """

    name = "caf"

    def __init__(self, f: int, max_iter: int = 100_000):
        self.f = check_f(f, self.name)
        require(isinstance(max_iter, int) and max_iter >= 1, f"caf needs max_iter >= 1, got max_iter={max_iter}")
        self.max_iter = max_iter

    def aggregate(self, src, *, want_info):
        n, f = src.n, self.f
        require(n > 2 * f, f"caf needs n > 2f, got n={n}, f={f}")
        G, backend = gram(src)
        bad = ~torch.isfinite(G.diagonal()).numpy()
        Gn = G.numpy().copy()
        Gn[bad, :] = 0.0
        Gn[:, bad] = 0.0
        c = np.where(bad, 0.0, 1.0)
        best_lam, best_w, it = np.inf, None, 0
        while c.sum() > n - 2 * f and it < self.max_iter:
            it += 1
            w = c / c.sum()
            lam, proj = top_direction(centred_gram(Gn, w), w)
            if lam < best_lam:
                best_lam, best_w = lam, w
            tau = np.where(bad, 0.0, proj**2)
            if lam <= 0 or tau.max() <= 0:
                break
            c = c * (1 - tau / tau.max())
        if best_w is None:  # more than 2f clients non-finite: nothing to filter, mean of the rest
            require(bool(c.sum() > 0), f"caf: every client sent non-finite values (clients {np.flatnonzero(bad).tolist()})")
            best_w = c / c.sum()
        agg, _ = apply("weighted_mean", src, torch.from_numpy(best_w))
        info = AggregationInfo(self.name, n, f=f, scores=torch.from_numpy(c), nonfinite=np.flatnonzero(bad).tolist(),
                               backend=backend, iterations=it)
        return agg, info


class Sampled(Columns):
    """The columns ``cols`` (sorted, of this shard) of ``src``, read block by block."""

    def __init__(self, src: Columns, cols: torch.Tensor):
        self.src, self.n, self.d, self.device = src, src.n, int(cols.numel()), src.device
        self._cols = cols

    def read(self, start, stop):
        cols = self._cols[start:stop]
        pieces, i = [], 0
        while i < cols.numel():  # one read per run of sampled columns within CHUNK of each other
            a = int(cols[i])
            j = int(torch.searchsorted(cols, a + CHUNK))
            block, at = self.src.read(a, int(cols[j - 1]) + 1), cols[i:j] - a
            # (NumPy's fancy indexing on the CPU: one thread, see base._numpy_ok)
            pieces.append(torch.from_numpy(block.numpy()[:, at.numpy()]) if _numpy_ok(block) else
                          block.index_select(1, at.to(self.device)))
            i = j
        return torch.cat(pieces, 1) if pieces else self.src.read(0, 0)

    def reduce(self, partial):
        return self.src.reduce(partial)


def dnc_coordinates(d: int, b: int, seed: int, iteration: int) -> torch.Tensor:
    """The sorted ``min(b, d)`` coordinates DnC's iteration ``iteration`` looks at (all of them
    when ``b >= d``): a uniform draw without replacement by NumPy's generator seeded with
    ``(seed, iteration)`` (O(b) work for b << d, not a permutation of all d)."""
    if b >= d:
        return torch.arange(d)
    rng = np.random.default_rng([int(seed) & (2**64 - 1), int(iteration)])
    return torch.from_numpy(np.sort(rng.choice(d, size=b, replace=False)))


class DnC(Rule):
    """Divide and Conquer (Shejwalkar and Houmansadr, NDSS 2021).

    ``niters`` times: draw ``b`` coordinates at random, centre the updates' restriction to them
    on their mean, take the top right singular vector ``v`` of the centred ``(n, b)`` matrix,
    score ``s_i = ((x_i - mu) . v)^2``, and keep the ``n - c f`` lowest scores (ties to the lowest
    index). The result is the mean of the clients kept in every iteration.

    The singular vector is exact, from the ``n x n`` Gram matrix of the sampled columns (module
    docstring). Defaults ``niters=5, b=10000, c=1.0`` follow the common reimplementations of the
    paper's algorithm; ``seed`` fixes the draws (:func:`dnc_coordinates`). Sharded, each shard draws
    from its own columns with the same seed: the result then depends on the sharding (with
    ``b >= d`` every column is used and it does not). A client with a non-finite value scores
    ``inf`` and is never kept while ``n - c f`` finite ones exist. Needs ``n > c f``; ``f < n/2``.
    """

    name = "dnc"

    def __init__(self, f: int, niters: int = 5, b: int = 10000, c: float = 1.0, seed: int = 0):
        self.f = check_f(f, self.name)
        require(isinstance(niters, int) and niters >= 1, f"dnc needs niters >= 1, got niters={niters}")
        require(isinstance(b, int) and b >= 1, f"dnc needs b >= 1, got b={b}")
        require(c > 0, f"dnc needs c > 0, got c={c}")
        self.niters, self.b, self.c, self.seed = niters, b, float(c), seed

    def keep_count(self, n: int) -> int:
        require(2 * self.f < n, f"dnc needs n > 2f, got n={n}, f={self.f}")
        k = n - int(np.floor(self.c * self.f))
        require(k >= 1, f"dnc needs n > c*f, got n={n}, c={self.c}, f={self.f}")
        return k

    def aggregate(self, src, *, want_info):
        n = src.n
        k = self.keep_count(n)
        kept = np.ones(n, bool)
        backend, scores, bad = None, None, np.zeros(n, bool)
        for it in range(self.niters):
            cols = dnc_coordinates(src.d, self.b, self.seed, it)
            G, backend = gram(src if cols.numel() == src.d else Sampled(src, cols))
            bad |= ~torch.isfinite(G.diagonal()).numpy()
            Gn = G.numpy().copy()
            Gn[bad, :] = 0.0
            Gn[:, bad] = 0.0
            good = ~bad
            w = good / max(good.sum(), 1)
            lam, proj = top_direction(centred_gram(Gn, w), w)
            s = np.where(bad, np.inf, proj**2)
            order = np.argsort(s, kind="stable")
            mask = np.zeros(n, bool)
            mask[order[:k]] = True
            kept &= mask
            scores = s
            if cols.numel() == src.d:  # every column: each iteration would repeat this one
                break
        chosen = np.flatnonzero(kept).tolist()
        require(len(chosen) > 0, "dnc: no client was kept in every iteration")
        w = torch.zeros(n, dtype=torch.float64)
        w[chosen] = 1.0 / len(chosen)
        agg, _ = apply("weighted_mean", src, w)
        info = AggregationInfo(self.name, n, f=self.f, selected=chosen, rejected=[i for i in range(n) if i not in chosen],
                               scores=torch.from_numpy(scores), nonfinite=np.flatnonzero(bad).tolist(), backend=backend)
        return agg, info


def caf(updates, f: int, *, return_info: bool = False):
    """Covariance-bound Agnostic Filter; see :class:`CAF`."""
    return CAF(f)(updates, return_info=return_info)


def dnc(updates, f: int, *, niters: int = 5, b: int = 10000, c: float = 1.0, seed: int = 0, return_info: bool = False):
    """Divide and Conquer; see :class:`DnC`."""
    return DnC(f, niters, b, c, seed)(updates, return_info=return_info)
