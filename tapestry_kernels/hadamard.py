"""The Walsh-Hadamard transform of the randomized rotation (docs/privacy.md) as Triton kernels.

``fwht(x, signs, scale)``: every stage ``h = 1, 2, 4, ...`` in ascending order with the butterflies
``(a + b, a - b)`` of ``tapestry.reference.fwht``, so the floats are the reference's, bit for bit.
One launch runs the stages inside blocks of ``BLOCK`` values (one block per program, held in
registers: a stage is a reshape that pairs ``a`` with ``b`` on a last axis of 2); each further launch
runs up to four stages between rows ``h`` apart (``R = 16`` rows x ``W`` contiguous columns per
program, so loads stay coalesced). A transform of ``2^24`` values is three passes over memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048  # values per program in the first launch
R, W = 16, 64  # rows x columns per program in the later launches (four stages each)


@triton.jit
def _stages(x, N: tl.constexpr, H0: tl.constexpr, COUNT: tl.constexpr):
    """Stages H0, 2 H0, ..., H0 2^(COUNT-1) of the flat tile x (N values)."""
    for s in tl.static_range(COUNT):  # stage h = H0 << s
        y = tl.permute(tl.reshape(x, [N // (2 * (H0 << s)), 2, H0 << s]), [0, 2, 1])  # (group, j, {a, b})
        a, b = tl.split(y)
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), [0, 2, 1]), [N])
    return x


@triton.jit
def _finish(x, idx, signs, scale, SCALE: tl.constexpr, SIGNS_AFTER: tl.constexpr):
    if SCALE:
        x = x * scale
    if SIGNS_AFTER:
        x = _flip(x, idx, signs)
    return x


@triton.jit
def _flip(x, idx, signs):
    """x negated where bit idx % 32 of sign word idx // 32 is set."""
    w = tl.load(signs + (idx >> 5)).to(tl.uint32, bitcast=True)
    return tl.where(((w >> (idx & 31).to(tl.uint32)) & 1) != 0, -x, x)


@triton.jit
def _block_kernel(X, Y, signs, scale, B: tl.constexpr, LOG_B: tl.constexpr, SIGNS_FIRST: tl.constexpr,
                  SCALE: tl.constexpr, SIGNS_AFTER: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * B + tl.arange(0, B)
    x = tl.load(X + idx)
    if SIGNS_FIRST:
        x = _flip(x, idx, signs)
    x = _stages(x, B, 1, LOG_B)
    tl.store(Y + idx, _finish(x, idx, signs, scale, SCALE, SIGNS_AFTER))


@triton.jit
def _rows_kernel(Y, signs, scale, h, RR: tl.constexpr, LOG_RR: tl.constexpr, WW: tl.constexpr, SCALE: tl.constexpr,
                 SIGNS_AFTER: tl.constexpr):
    """Stages h, 2h, ..., (RR/2) h between RR rows h apart, WW contiguous columns per program."""
    t = tl.program_id(0).to(tl.int64)
    per = h // WW  # programs per group of RR rows
    base = (t // per) * (RR * h) + (t % per) * WW
    idx = tl.reshape(base + tl.arange(0, RR)[:, None] * h + tl.arange(0, WW)[None, :], [RR * WW])
    x = _stages(tl.load(Y + idx), RR * WW, WW, LOG_RR)
    tl.store(Y + idx, _finish(x, idx, signs, scale, SCALE, SIGNS_AFTER))


def fwht(x: torch.Tensor, signs: torch.Tensor | None, scale: float, out: torch.Tensor | None = None, *,
         signs_after: bool = False) -> torch.Tensor:
    """``out = scale * H diag(signs) x`` (``signs_after``: ``diag(signs) scale H x``); x float32
    contiguous of a power-of-two length, signs the sign words as int32 (None: none)."""
    D = x.numel()
    out = torch.empty_like(x) if out is None else out
    b = min(D, BLOCK)
    rows = D // b
    dummy = x if signs is None else signs
    first = signs is not None and not signs_after
    last = rows == 1
    _block_kernel[(rows,)](x, out, dummy, scale, B=b, LOG_B=b.bit_length() - 1, SIGNS_FIRST=first,
                           SCALE=last and scale != 1.0, SIGNS_AFTER=last and signs_after, num_warps=4)
    h = b
    while h < D:
        rr = min(R, D // h)
        ww = min(W, h)
        last = h * rr == D
        _rows_kernel[(D // (rr * ww),)](out, dummy, scale, h, RR=rr, LOG_RR=rr.bit_length() - 1, WW=ww,
                                        SCALE=last and scale != 1.0, SIGNS_AFTER=last and signs_after,
                                        num_warps=4)
        h *= rr
    return out
