"""Direct float64 NumPy transcriptions of docs/spec.md's definitions, written independently of
tapestry.reference (loops and explicit distances, no Gram trick), to check the rules end to end."""

import numpy as np


def rank_key(v):
    """Sort key for docs/spec.md's ranking: -Inf < finite < +Inf < NaN."""
    return np.where(np.isnan(v), np.inf, v), np.isnan(v)


def sort_columns(X):
    X = np.asarray(X, np.float64)
    out = np.empty_like(X)
    for j in range(X.shape[1]):
        col = X[:, j]
        out[:, j] = np.concatenate([np.sort(col[~np.isnan(col)]), col[np.isnan(col)]])
    return out


def trimmed_mean(X, f):
    S = sort_columns(X)
    return S[f : X.shape[0] - f].mean(axis=0)


def median(X):
    S = sort_columns(X)
    n = X.shape[0]
    return S[n // 2] if n % 2 else (S[n // 2 - 1] + S[n // 2]) / 2


def sq_dists(X):
    X = np.asarray(X, np.float64)
    n = X.shape[0]
    bad = ~np.isfinite(X).all(axis=1)
    D = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                D[i, j] = np.inf if bad[i] or bad[j] else np.sum((X[i] - X[j]) ** 2)
    return D, bad


def krum_scores(D, bad, among, f):
    idx = [i for i in range(len(D)) if among[i]]
    k = max(1, len(idx) - f - 2)
    scores = np.full(len(D), np.inf)
    for i in idx:
        if bad[i]:
            continue
        others = sorted(D[i, j] for j in idx if j != i)
        scores[i] = sum(others[:k])
    return scores


def krum_select(X, f):
    D, bad = sq_dists(X)
    s = krum_scores(D, bad, np.ones(len(D), bool), f)
    return int(np.argmin(s)), s


def bulyan(X, f):
    X = np.asarray(X, np.float64)
    n = X.shape[0]
    D, bad = sq_dists(X)
    remaining = np.ones(n, bool)
    chosen = []
    for _ in range(n - 2 * f):
        s = krum_scores(D, bad, remaining, f)
        s[~remaining] = np.inf
        best = int(np.argmin(s))
        chosen.append(best)
        remaining[best] = False
    sel = X[sorted(chosen)]
    k = n - 4 * f
    out = np.empty(X.shape[1])
    for j in range(X.shape[1]):
        col = np.sort(sel[:, j])
        med = median(col[:, None])[0]
        order = np.argsort(np.abs(col - med), kind="stable")
        out[j] = col[order[:k]].mean()
    return out, sorted(chosen)
