"""SecAgg+ communication graphs (Bell et al. 2020): a Harary graph H(k, n) with its nodes randomly
relabelled, so each client masks with ``k`` neighbours instead of ``n - 1``."""

from __future__ import annotations

import numpy as np


def check_neighbours(n: int, k: int) -> None:
    if not 1 <= k <= n - 1:
        raise ValueError(f"SecAgg+ needs 1 <= k <= n - 1 neighbours, got k={k}, n={n}")
    if (n * k) % 2:
        raise ValueError(f"a k-regular graph needs n*k even, got n={n}, k={k} (n*k={n * k})")


def regular_graph(ids: list[int], k: int, seed: int) -> dict[int, list[int]]:
    """``{id: sorted neighbour ids}``: every id has exactly ``k`` neighbours. Positions on a ring
    connect to the ``k // 2`` nearest on each side (and to the opposite one when ``k`` is odd);
    a seeded permutation assigns ids to positions."""
    n = len(ids)
    check_neighbours(n, k)
    perm = np.random.default_rng(seed).permutation(n)
    at = [ids[i] for i in perm]  # id at ring position p
    nb: dict[int, set[int]] = {u: set() for u in ids}
    for p in range(n):
        offs = list(range(1, k // 2 + 1)) + ([n // 2] if k % 2 else [])
        for o in offs:
            a, b = at[p], at[(p + o) % n]
            nb[a].add(b)
            nb[b].add(a)
    return {u: sorted(v) for u, v in nb.items()}
