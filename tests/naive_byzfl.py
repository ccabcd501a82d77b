"""Exact float64 NumPy transcriptions of the rules whose ByzFL versions are randomised (CAF, SMEA)
or absent (DnC, FLTrust), written from the papers' definitions without the Gram-matrix trick:
eigenpairs from an SVD of the (weighted, centred) update matrix, subsets by enumeration."""

import itertools

import numpy as np


def top_right_singular(Y):
    """Top eigenvalue of ``Y^T Y`` and its unit eigenvector, by SVD of ``Y`` (never ``Y Y^T``)."""
    _, s, Vt = np.linalg.svd(Y, full_matrices=False)
    return s[0] ** 2, Vt[0]


def caf(X, f):
    X = np.asarray(X, np.float64)
    n = len(X)
    c = np.ones(n)
    best, best_mu = np.inf, None
    while c.sum() > n - 2 * f:
        mu = (c[:, None] * X).sum(0) / c.sum()
        diffs = X - mu
        lam, v = top_right_singular(np.sqrt(c / c.sum())[:, None] * diffs)
        if lam < best:
            best, best_mu = lam, mu
        tau = (diffs @ v) ** 2
        c = c * (1 - tau / tau.max())
    return best_mu


def smea(X, f):
    X = np.asarray(X, np.float64)
    n = len(X)
    best, best_set = np.inf, None
    for S in itertools.combinations(range(n), n - f):
        Y = X[list(S)] - X[list(S)].mean(0)
        lam = top_right_singular(Y)[0] if len(S) > 1 else 0.0
        if lam < best:
            best, best_set = lam, S
    return X[list(best_set)].mean(0), sorted(best_set), best


def mda(X, f):
    X = np.asarray(X, np.float64)
    n = len(X)
    best, best_set = np.inf, None
    for S in itertools.combinations(range(n), n - f):
        diam = max((np.sum((X[i] - X[j]) ** 2) for i, j in itertools.combinations(S, 2)), default=0.0)
        if diam < best:
            best, best_set = diam, S
    return X[list(best_set)].mean(0), sorted(best_set)


def dnc(X, f, coordinate_sets, c=1.0):
    """DnC (Shejwalkar and Houmansadr 2021, Algorithm 2) with the sampled coordinates given."""
    X = np.asarray(X, np.float64)
    n = len(X)
    kept = set(range(n))
    for cols in coordinate_sets:
        sub = X[:, cols]
        centred = sub - sub.mean(0)
        _, v = top_right_singular(centred)
        s = (centred @ v) ** 2
        kept &= set(np.argsort(s, kind="stable")[: n - int(np.floor(c * f))].tolist())
    chosen = sorted(kept)
    return X[chosen].mean(0), chosen


def fltrust(X, g0):
    X = np.asarray(X, np.float64)
    g0 = np.asarray(g0, np.float64)
    num = np.zeros(X.shape[1])
    total = 0.0
    for x in X:
        ts = max(0.0, float(x @ g0) / (np.linalg.norm(x) * np.linalg.norm(g0)))
        num += ts * x * np.linalg.norm(g0) / np.linalg.norm(x)
        total += ts
    return num / total if total > 0 else num
