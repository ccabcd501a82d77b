"""Shamir ``t``-of-``m`` secret sharing of 32-byte seeds over the prime field GF(2^521 - 1).

A share is ``(x, f(x))`` for a random polynomial ``f`` of degree ``t - 1`` with ``f(0)`` = the
secret; any ``t`` shares give ``f(0)`` by Lagrange interpolation, fewer reveal nothing about it.
Holders are numbered ``x = 1 .. m`` (``x = 0`` would be the secret itself). The field is larger
than every 256-bit secret, so a secret is an element as it is.
"""

from __future__ import annotations

import functools
import math
import secrets

P = 2**521 - 1  # a Mersenne prime
SHARE_BYTES = 66  # ceil(521 / 8)


def split(secret: bytes, t: int, xs: list[int]) -> dict[int, bytes]:
    """Shares of ``secret`` (at most 64 bytes) for holder points ``xs`` (distinct, 1 <= x < P)."""
    if not 1 <= t <= len(xs):
        raise ValueError(f"Shamir needs 1 <= t <= holders, got t={t}, holders={len(xs)}")
    if len(set(xs)) != len(xs) or any(not 0 < x < P for x in xs):
        raise ValueError("holder points must be distinct and in 1 .. P-1")
    s = int.from_bytes(secret, "little")
    if len(secret) > 64:
        raise ValueError(f"secret of {len(secret)} bytes is too long for the field")
    coeffs = [s] + [secrets.randbelow(P) for _ in range(t - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % P
        out[x] = y.to_bytes(SHARE_BYTES, "little")
    return out


def combine(shares: dict[int, bytes], t: int, length: int = 32) -> bytes:
    """The secret from at least ``t`` shares ``{x: y}``; uses the first ``t`` points."""
    if len(shares) < t:
        raise ValueError(f"need t={t} shares, got {len(shares)}")
    pts = sorted(shares.items())[:t]
    xs = [x for x, _ in pts]
    s = 0
    for j, (xj, yb) in enumerate(pts):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * (-xm) % P
                den = den * (xj - xm) % P
        s = (s + int.from_bytes(yb, "little") * num * pow(den, -1, P)) % P
    if s >= 1 << (8 * length):
        raise ValueError("shares do not combine to a valid secret (inconsistent or corrupted shares)")
    return s.to_bytes(length, "little")


@functools.lru_cache(maxsize=4096)
def _check_weights(xs: tuple[int, ...], x: int) -> tuple[int, tuple[int, ...]]:
    """Integers ``D, c_j`` with ``D f(x) = sum_j c_j f(xs_j)`` for every polynomial of degree
    < len(xs): the Lagrange weights over a common denominator, exact integers because the
    points are small integers, so checking a point takes no modular inverse (cached: the same
    holders answer for many secrets)."""
    nums, dens = [], []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num *= x - xm
                den *= xj - xm
        nums.append(num)
        dens.append(den)
    D = math.lcm(*(abs(d) for d in dens))
    return D, tuple(n * (D // d) for n, d in zip(nums, dens))


def _off(base: list[tuple[int, int]], rest: list[tuple[int, int]]) -> list[int]:
    xs = tuple(x for x, _ in base)
    out = []
    for x, y in rest:
        D, c = _check_weights(xs, x)
        if (sum(cj * yj for cj, (_, yj) in zip(c, base)) - D * y) % P:
            out.append(x)
    return out


def off_polynomial(shares: dict[int, bytes], t: int) -> list[int]:
    """The points among ``shares`` that do not lie on the polynomial through the ``t`` smallest
    points; empty when all lie on one polynomial of degree < t."""
    pts = sorted((x, int.from_bytes(y, "little")) for x, y in shares.items())
    return _off(pts[:t], pts[t:])


def combine_checked(shares: dict[int, bytes], t: int, length: int = 32) -> tuple[bytes, list[int]]:
    """The secret from every share given, and the points off its polynomial.

    With more than ``t`` shares all must lie on one polynomial of degree < t. When some do not, the
    polynomial through ``t`` cyclically consecutive points (each window tried) that agrees with at
    least ``(m + t) / 2`` of the ``m`` shares is the only one that can (two such polynomials would
    agree on ``t`` points); its secret is returned with the points off it. It is found whenever
    some ``t`` cyclically consecutive points are all right (always with one bad point); otherwise
    ValueError."""
    if len(shares) < t:
        raise ValueError(f"need t={t} shares, got {len(shares)}")
    pts = sorted((x, int.from_bytes(y, "little")) for x, y in shares.items())
    m = len(pts)
    for i in range(m if m > t else 1):
        window = pts[i:] + pts[:i]
        bad = _off(window[:t], window[t:])
        if 2 * (m - len(bad)) >= m + t:
            base = dict(window[:t])
            return combine({x: shares[x] for x in base}, t, length), bad
    raise ValueError(f"the {m} shares agree with no polynomial of degree < t={t} on (m + t) / 2 points")
