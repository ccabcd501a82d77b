"""Weighted mean: ``out[j] = sum_i w_i X[i, j]`` over the rows with a non-zero weight.

Only the rows listed in ``rows`` (the clients with ``w_i != 0``) are read, so a zero-weight
client's NaN/Inf never reaches the result. Each program owns ``BLOCK_D`` coordinates and walks
the listed rows in order, accumulating in float64 (exact products of float32 by float64 weights
up to one rounding each): one pass over the bytes, 16-byte loads along the contiguous columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode import Encoded, load_values, plain


@triton.jit
def _weighted_mean_kernel(X, S, rows, weights, out, m, d, stride, sstride, block, BLOCK_D: tl.constexpr,
                          CODEC: tl.constexpr):
    """out[j] = sum_{t < m} weights[t] * X[rows[t], j], float64 accumulation, fixed order."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    inside = cols < d
    acc = tl.zeros([BLOCK_D], dtype=tl.float64)
    for t in range(m):
        r = tl.load(rows + t)
        w = tl.load(weights + t)
        x = load_values(X, S, r, cols, stride, sstride, block, inside, CODEC)
        acc += w * x.to(tl.float64)
    tl.store(out + cols, acc.to(tl.float32), mask=inside)


def weighted_mean(X, w: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i X[i]`` as float32 ``(d,)``; ``X`` a tensor or stacked payload rows
    (decode.Encoded); ``w`` is ``(n,)`` float64 (any device), already normalised; rows with
    ``w_i == 0`` are not read."""
    E = X if isinstance(X, Encoded) else plain(X)
    d = E.d
    w = w.detach().to(torch.float64).cpu()
    keep = torch.nonzero(w != 0).flatten()
    rows = keep.to(E.X.device)
    weights = w[keep].to(E.X.device)
    out = torch.empty(d, dtype=torch.float32, device=E.X.device)
    if d == 0:
        return out
    BLOCK_D = max(16, min(1024, triton.next_power_of_2(d)))
    _weighted_mean_kernel[(triton.cdiv(d, BLOCK_D),)](E.X, E.S, rows, weights, out, keep.numel(), d, E.stride,
                                                        E.sstride, E.block, BLOCK_D=BLOCK_D, CODEC=E.codec,
                                                        num_warps=4)
    return out
