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


@triton.jit
def _weighted_mean_kernel(X, rows, weights, out, m, d, stride, BLOCK_D: tl.constexpr):
    """out[j] = sum_{t < m} weights[t] * X[rows[t], j], float64 accumulation, fixed order."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    inside = cols < d
    acc = tl.zeros([BLOCK_D], dtype=tl.float64)
    for t in range(m):
        r = tl.load(rows + t)
        w = tl.load(weights + t)
        x = tl.load(X + r * stride + cols, mask=inside, other=0.0)
        acc += w * x.to(tl.float64)
    tl.store(out + cols, acc.to(tl.float32), mask=inside)


def weighted_mean(X: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i X[i]`` as float32 ``(d,)``; ``w`` is ``(n,)`` float64 (any device), already
    normalised; rows with ``w_i == 0`` are not read."""
    d = X.shape[1]
    w = w.detach().to(torch.float64).cpu()
    keep = torch.nonzero(w != 0).flatten()
    rows = keep.to(X.device)
    weights = w[keep].to(X.device)
    out = torch.empty(d, dtype=torch.float32, device=X.device)
    if d == 0:
        return out
    BLOCK_D = max(16, min(1024, triton.next_power_of_2(d)))
    _weighted_mean_kernel[(triton.cdiv(d, BLOCK_D),)](X, rows, weights, out, keep.numel(), d, X.stride(0),
                                                        BLOCK_D=BLOCK_D, num_warps=4)
    return out
