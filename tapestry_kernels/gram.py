"""Centred Gram matrix: ``G = C C^T`` with ``C[i, j] = X[i, j] - s_j``, float64 result.

Any per-coordinate shift ``s`` leaves the distances ``|x_i - x_k|^2 = G_ii + G_kk - 2 G_ik``
unchanged; centring keeps them accurate when the updates share a large common component. Here
``s_j`` is the mean of the finite values of column ``j``, computed from the tile already in
registers, so the centring costs no extra pass over the data (the reference uses the mean of the
finite rows instead: a different shift, the same distances). A NaN/Inf entry stays non-finite
after centring, so it reaches only its own row and column of ``G``.

Each program walks a fixed set of column tiles (so the result is deterministic), multiplies each
centred ``(NP, BLOCK_D)`` tile by its transpose into a float32 block product over ``BLOCK_D``
columns, and adds that partial sum into a float64 accumulator: float32 rounding never spans more
than ``BLOCK_D`` products. The per-program ``(n, n)`` partials are summed in float64.

On a GPU the float32 tile product uses ``tf32x3`` (three TF32 tensor-core products recovering
float32 accuracy); the interpreter computes it in IEEE float32. Rows are processed in blocks of
``BN`` (at most 64), so any ``n`` works; for ``n <= 64`` the tile is loaded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode import Encoded, load_values, plain

_PROGRAMS = 1024  # fixed, so the summation order depends on n and d only, never on the device


@triton.jit
def _column_shift(X, S, n, d, stride, sstride, block, cols, BN: tl.constexpr, ROW_BLOCKS: tl.constexpr,
                  CODEC: tl.constexpr):
    """Mean of the finite values of each column in ``cols`` over all n rows (0 if none)."""
    total = tl.zeros([cols.shape[0]], dtype=tl.float32)
    count = tl.zeros([cols.shape[0]], dtype=tl.float32)
    for b in range(ROW_BLOCKS):
        r = b * BN + tl.arange(0, BN)
        inside = (r[:, None] < n) & (cols[None, :] < d)
        x = load_values(X, S, r.to(tl.int64)[:, None], cols[None, :], stride, sstride, block, inside, CODEC)
        ok = inside & (x == x) & (tl.abs(x) < float("inf"))
        total += tl.sum(tl.where(ok, x, 0.0), axis=0)
        count += tl.sum(ok.to(tl.float32), axis=0)
    return tl.where(count > 0, total / tl.maximum(count, 1.0), 0.0)


@triton.jit
def _centred(X, S, n, d, stride, sstride, block, cols, rb, shift, BN: tl.constexpr, CODEC: tl.constexpr):
    r = rb * BN + tl.arange(0, BN)
    inside = (r[:, None] < n) & (cols[None, :] < d)
    x = load_values(X, S, r.to(tl.int64)[:, None], cols[None, :], stride, sstride, block, inside, CODEC)
    return tl.where(inside, x - shift[None, :], 0.0)


@triton.jit
def _gram_kernel(X, S, partial, n, d, stride, sstride, block, tiles, BN: tl.constexpr, BLOCK_D: tl.constexpr,
                 ROW_BLOCKS: tl.constexpr, PRECISION: tl.constexpr, CODEC: tl.constexpr):
    """partial[p, rb*BN + a, cb*BN + b] = sum over this program's tiles of C[rb*BN+a] . C[cb*BN+b]."""
    pid = tl.program_id(0)
    rb = tl.program_id(1)
    cb = tl.program_id(2)
    acc = tl.zeros([BN, BN], dtype=tl.float64)
    for t in range(pid, tiles, tl.num_programs(0)):
        cols = tl.arange(0, BLOCK_D) + t * BLOCK_D  # d < 2^31 columns per block
        if ROW_BLOCKS == 1:
            # one load: shift from the tile itself
            r = tl.arange(0, BN)
            inside = (r[:, None] < n) & (cols[None, :] < d)
            x = load_values(X, S, r.to(tl.int64)[:, None], cols[None, :], stride, sstride, block, inside, CODEC)
            ok = inside & (x == x) & (tl.abs(x) < float("inf"))
            count = tl.sum(ok.to(tl.float32), axis=0)
            shift = tl.where(count > 0, tl.sum(tl.where(ok, x, 0.0), axis=0) / tl.maximum(count, 1.0), 0.0)
            a = tl.where(inside, x - shift[None, :], 0.0)
            b = a
        else:
            shift = _column_shift(X, S, n, d, stride, sstride, block, cols, BN, ROW_BLOCKS, CODEC)
            a = _centred(X, S, n, d, stride, sstride, block, cols, rb, shift, BN, CODEC)
            b = _centred(X, S, n, d, stride, sstride, block, cols, cb, shift, BN, CODEC)
        acc += tl.dot(a, tl.trans(b), input_precision=PRECISION).to(tl.float64)
    i = rb * BN + tl.arange(0, BN)
    j = cb * BN + tl.arange(0, BN)
    base = partial + pid.to(tl.int64) * n * n
    tl.store(base + i[:, None] * n + j[None, :], acc, mask=(i[:, None] < n) & (j[None, :] < n))


def gram(X) -> torch.Tensor:
    """float64 ``(n, n)`` Gram matrix of the rows of ``X`` (a tensor or stacked payload rows,
    decode.Encoded) after the per-column finite-mean shift."""
    E = X if isinstance(X, Encoded) else plain(X)
    n, d = E.n, E.d
    if d == 0 or n == 0:
        return torch.zeros(n, n, dtype=torch.float64, device=E.X.device)
    BN = max(16, min(64, triton.next_power_of_2(n)))  # tl.dot needs >= 16 rows
    row_blocks = triton.cdiv(n, BN)
    # 64 columns per tile: no register spills on sm_90 (128 spills), and for BN <= 32 two
    # programs per SM with three cp.async stages each keep ~48 KiB of loads in flight
    BLOCK_D = 64
    tiles = triton.cdiv(d, BLOCK_D)
    programs = min(_PROGRAMS, tiles, max(1, (1 << 23) // (n * n)))  # partials <= 64 MiB of float64
    partial = torch.empty(programs, n, n, dtype=torch.float64, device=E.X.device)
    precision = "tf32x3" if E.X.is_cuda else "ieee"
    _gram_kernel[(programs, row_blocks, row_blocks)](E.X, E.S, partial, n, d, E.stride, E.sstride, E.block, tiles,
                                                      BN=BN, BLOCK_D=BLOCK_D, ROW_BLOCKS=row_blocks,
                                                      PRECISION=precision, CODEC=E.codec,
                                                      num_warps=8 if BN == 64 else 4, num_stages=3)
    return partial.sum(0)
