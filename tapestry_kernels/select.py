"""Per-coordinate selection: trimmed mean, coordinate median, Bulyan's mean around the median.

Each program owns ``BLOCK_D`` coordinates and keeps, for each, all ``n`` client values in
registers as a ``(BLOCK_D, NP)`` tile (``NP`` = ``n`` rounded up to a power of two; the padding
ranks last). The tile is sorted along its client axis by ``tl.sort`` (a bitonic network on
registers), then a window of ranks is averaged in float64.

Ranking (docs/spec.md): -Inf < finite < +Inf < NaN, torch.sort's order. Values are mapped to an int32
key that orders like the floats (flip the magnitude bits of negatives), with every NaN
canonicalised to the largest key; padding uses that key too, so it always sorts past rank n-1.
float16/bfloat16 are read as they are and widened in registers (exactly).

The functions take a 2-D tensor with unit stride along columns and parameters already checked
by the caller; they return float32 (d,) tensors. Every coordinate is computed from its own
column only, in a fixed order, so results do not depend on blocking or position.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode import Encoded, load_values, plain

# The biggest key (bits of a positive quiet NaN): canonical NaN and padding.
_TOP = tl.constexpr(0x7FFFFFFF)
# Keys per program above 64 rows (BLOCK_D * NP).
_TILE = 4096


@triton.jit
def _float_key(x):
    """int32 key with key(a) < key(b) iff a < b for non-NaN floats; NaN -> the largest key."""
    b = x.to(tl.int32, bitcast=True)
    k = b ^ ((b >> 31) & 0x7FFFFFFF)  # negatives: reverse the order of their magnitudes
    return tl.where(x != x, 0x7FFFFFFF, k)


@triton.jit
def _key_float(k):
    """Inverse of _float_key (a NaN key comes back as a NaN)."""
    b = k ^ ((k >> 31) & 0x7FFFFFFF)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _sorted_tile(X, S, rows, n, d, stride, sstride, block, pid, BLOCK_D: tl.constexpr, NP: tl.constexpr,
                 GATHER: tl.constexpr, CODEC: tl.constexpr):
    """Column block ``pid`` as a (BLOCK_D, NP) tile of keys sorted along axis 1, its coordinates
    (values decoded on load, decode.py)."""
    cols = pid.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    r = tl.arange(0, NP)
    if GATHER:
        src = tl.load(rows + r, mask=r < n, other=0)  # int64 row numbers
    else:
        src = r.to(tl.int64)
    valid = (r[None, :] < n) & (cols[:, None] < d)
    x = load_values(X, S, src[None, :], cols[:, None], stride, sstride, block, valid, CODEC)
    keys = tl.where(r[None, :] < n, _float_key(x), _TOP)
    return tl.sort(keys, dim=1), cols


@triton.jit
def _window_mean(v, lo, count):
    """Mean of ``v[:, lo:lo+count]`` per row (lo a scalar or a (BLOCK_D, 1) column), in float64."""
    j = tl.arange(0, v.shape[1])[None, :]
    inside = (j >= lo) & (j < lo + count)
    total = tl.sum(tl.where(inside, v.to(tl.float64), 0.0), axis=1)
    return total / count


@triton.jit
def _rank_window_kernel(X, S, out, n, d, stride, sstride, block, lo, hi, BLOCK_D: tl.constexpr, NP: tl.constexpr,
                        CODEC: tl.constexpr):
    """Per coordinate, the mean of the values ranked lo .. hi-1: trimmed_mean (f .. n-f-1) and
    coord_median ((n-1)//2 .. n//2) are this one kernel with two windows."""
    pid = tl.program_id(0)
    keys, cols = _sorted_tile(X, S, X, n, d, stride, sstride, block, pid, BLOCK_D, NP, False, CODEC)
    r = _window_mean(_key_float(keys), lo, hi - lo)
    tl.store(out + cols, r.to(tl.float32), mask=cols < d)


@triton.jit
def _distance(v, med):
    """|v - med|, and 0 for a value equal to the median (an infinite one too: inf - inf is NaN)."""
    return tl.where(v == med, 0.0, tl.abs(v - med))


@triton.jit
def _mean_around_median_kernel(X, S, rows, out, m, d, stride, sstride, block, k, BLOCK_D: tl.constexpr,
                               NP: tl.constexpr, CODEC: tl.constexpr):
    """V = the m values of ``rows`` sorted, med their median. The k values closest to med (ties
    to the smaller value) are the window V[s:s+k]: sliding the window right by one swaps V[j] for
    V[j+k] and pays exactly when V[j+k] is strictly closer to med, so s = 1 + the last j where it
    pays (0 if none). NaN distances compare false: NaN is never closer."""
    pid = tl.program_id(0)
    keys, cols = _sorted_tile(X, S, rows, m, d, stride, sstride, block, pid, BLOCK_D, NP, True, CODEC)
    V = _key_float(keys).to(tl.float64)
    j = tl.arange(0, NP)[None, :]
    lower = tl.sum(tl.where(j == (m - 1) // 2, V, 0.0), axis=1)
    upper = tl.sum(tl.where(j == m // 2, V, 0.0), axis=1)
    med = ((lower + upper) * 0.5)[:, None]  # exact: float32 values in float64
    ahead = tl.gather(V, tl.minimum(j + k, NP - 1) + tl.zeros_like(keys), axis=1)
    pays = (j < m - k) & (_distance(ahead, med) < _distance(V, med))
    s = tl.max(tl.where(pays, j + 1, 0), axis=1)[:, None]
    r = _window_mean(V, s, k)
    tl.store(out + cols, r.to(tl.float32), mask=cols < d)


def _shape(n: int, d: int, around: bool = False) -> tuple[int, int, int]:
    """(BLOCK_D, NP, num_warps). Up to NP = 64 one warp per program, so that each thread holds
    whole columns and the network runs on its own registers (no shuffles or barriers; checked in
    the sm_90 SASS): ~128 keys per thread for the window kernels, 32 columns per warp for the
    median-window one. Above 64 rows, 4 warps share a 4096-key tile (the slower path)."""
    NP = triton.next_power_of_2(max(n, 1))
    if NP <= 64:
        block, warps = (32 if around else min(1024, 32 * max(1, 128 // NP))), 1
    else:
        block, warps = max(1, _TILE // NP), 4
    return max(1, min(block, triton.next_power_of_2(d))), NP, warps


def _window(E: Encoded, lo: int, hi: int) -> torch.Tensor:
    out = torch.empty(E.d, dtype=torch.float32, device=E.X.device)
    if E.d == 0:
        return out
    BLOCK_D, NP, warps = _shape(E.n, E.d)
    _rank_window_kernel[(triton.cdiv(E.d, BLOCK_D),)](E.X, E.S, out, E.n, E.d, E.stride, E.sstride, E.block, lo, hi,
                                                     BLOCK_D=BLOCK_D, NP=NP, CODEC=E.codec, num_warps=warps)
    return out


def _encoded(X) -> Encoded:
    return X if isinstance(X, Encoded) else plain(X)


def trimmed_mean(X, f: int) -> torch.Tensor:
    """Per coordinate, the mean of the values ranked ``f .. n-f-1`` (0 <= 2f < n); ``X`` a tensor
    or stacked payload rows (decode.Encoded)."""
    E = _encoded(X)
    return _window(E, f, E.n - f)


def coord_median(X) -> torch.Tensor:
    """Per coordinate median; for even ``n`` the mean of the two middle values."""
    E = _encoded(X)
    return _window(E, (E.n - 1) // 2, E.n // 2 + 1)


def mean_around_median(X, rows: torch.Tensor, k: int) -> torch.Tensor:
    """Per coordinate over ``rows``, the mean of the ``k`` values closest to their median
    (ties in distance to the smaller value); ``1 <= k <= len(rows)``."""
    E = _encoded(X)
    m = rows.numel()
    rows = rows.to(device=E.X.device, dtype=torch.int64).contiguous()
    out = torch.empty(E.d, dtype=torch.float32, device=E.X.device)
    if E.d == 0:
        return out
    BLOCK_D, NP, warps = _shape(m, E.d, around=True)
    _mean_around_median_kernel[(triton.cdiv(E.d, BLOCK_D),)](E.X, E.S, rows, out, m, E.d, E.stride, E.sstride,
                                                             E.block, k, BLOCK_D=BLOCK_D, NP=NP, CODEC=E.codec,
                                                             num_warps=warps)
    return out
