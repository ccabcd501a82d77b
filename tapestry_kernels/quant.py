"""Blockwise symmetric absmax int8/int4 quantisation (tapestry.reference's compression section).

    scale_b = absmax_b / qmax               (qmax 127 or 7; 0 when absmax_b < 2^-96)
    q_j     = clamp(floor(x_j * (1 / scale_b) + u_j), -qmax, qmax),    decode: q_j * scale_b
    u_j     = 0.5 (nearest) or uniform(key, j) = half (j & 1) of mix32((j >> 1) ^ k0) ^ k1, * 2^-16

One program quantises one block (the absmax is a max over |x| bits, which ranks NaN above Inf
above every finite value). Divisions are correctly rounded (div_rn) and kernels are compiled
without FMA contraction, so the bytes equal the C++ and reference bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_NO_FMA = {"enable_fp_fusion": False}


@triton.jit
def _mix32(x):
    # lowbias32 (C. Wellons) on uint32 lanes
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _quantize_block(X, b, m, block, k0, k1, qmax, offs, STOCHASTIC: tl.constexpr):
    """(q as float32 lanes for the element indices offs, scale) of block b."""
    start = b.to(tl.int64) * block
    inside = (offs < block) & (start + offs < m)
    x_all = tl.load(X + start + offs, mask=inside, other=0.0).to(tl.float32)
    bits = x_all.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    mb = tl.max(bits, axis=0)
    a = mb.to(tl.float32, bitcast=True)
    bad = mb >= 0x7F800000
    tiny = a < 1.2621774483536189e-29
    zero = bad | tiny
    scale = tl.where(bad, a, tl.where(tiny, 0.0, tl.math.div_rn(a, qmax)))
    inv = tl.where(zero, 0.0, tl.math.div_rn(1.0, tl.where(zero, 1.0, scale)))
    return x_all, scale, inv, bad, start, inside


@triton.jit
def _round(x, j, inv, qmax, bad, k0, k1, STOCHASTIC: tl.constexpr):
    if STOCHASTIC:
        ju = j.to(tl.uint32)
        r = _mix32((ju >> 1) ^ k0.to(tl.uint32, bitcast=True)) ^ k1.to(tl.uint32, bitcast=True)
        u = ((r >> ((ju & 1) * 16)) & 0xFFFF).to(tl.float32) * 1.52587890625e-05
    else:
        u = 0.5
    t = tl.floor(x * inv + u)
    t = tl.minimum(tl.maximum(t, -qmax), qmax)
    return tl.where(bad, 0.0, t)


@triton.jit
def _quantize_int8_kernel(X, Q, S, m, block, k0, k1, BLOCK: tl.constexpr, STOCHASTIC: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    x, scale, inv, bad, start, inside = _quantize_block(X, b, m, block, k0, k1, 127.0, offs, STOCHASTIC)
    t = _round(x, start + offs, inv, 127.0, bad, k0, k1, STOCHASTIC)
    tl.store(Q + start + offs, t.to(tl.int32).to(tl.int8), mask=inside)
    tl.store(S + b, scale)


@triton.jit
def _quantize_int4_kernel(X, P, S, m, block, k0, k1, BLOCK: tl.constexpr, HALF: tl.constexpr,
                          STOCHASTIC: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    x, scale, inv, bad, start, inside = _quantize_block(X, b, m, block, k0, k1, 7.0, offs, STOCHASTIC)
    p = tl.arange(0, HALF)
    lo_j = start + 2 * p
    hi_j = lo_j + 1
    pair = 2 * p < block
    x_lo = tl.load(X + lo_j, mask=pair & (lo_j < m), other=0.0).to(tl.float32)
    x_hi = tl.load(X + hi_j, mask=pair & (hi_j < m), other=0.0).to(tl.float32)
    t_lo = _round(x_lo, lo_j, inv, 7.0, bad, k0, k1, STOCHASTIC)
    t_hi = tl.where(hi_j < m, _round(x_hi, hi_j, inv, 7.0, bad, k0, k1, STOCHASTIC), 0.0)  # missing last: q = 0
    byte = (t_lo.to(tl.int32) + 8) | ((t_hi.to(tl.int32) + 8) << 4)
    tl.store(P + start // 2 + p, byte.to(tl.uint8), mask=pair & (lo_j < m))
    tl.store(S + b, scale)


@triton.jit
def _dequantize_int8_kernel(Q, S, Out, m, block, BLOCK: tl.constexpr):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = j < m
    q = tl.load(Q + j, mask=inside, other=0).to(tl.float32)
    s = tl.load(S + j // block, mask=inside, other=0.0)
    tl.store(Out + j, q * s, mask=inside)


@triton.jit
def _dequantize_int4_kernel(P, S, Out, m, block, BLOCK: tl.constexpr):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = j < m
    byte = tl.load(P + j // 2, mask=inside, other=0).to(tl.int32)
    nib = tl.where(j % 2 == 0, byte & 15, byte >> 4)
    s = tl.load(S + j // block, mask=inside, other=0.0)
    tl.store(Out + j, (nib - 8).to(tl.float32) * s, mask=inside)


def _signed32(k: int) -> int:
    return k - (1 << 32) if k >= 1 << 31 else k


def _quantize(kernel, x, block, key, nbytes, qdtype, int4, out=None):
    m = x.numel()
    nb = triton.cdiv(m, block)
    if out is not None:
        q, scales = out
    else:
        q = torch.empty(nbytes, dtype=qdtype, device=x.device)
        scales = torch.empty(nb, dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scales
    k0, k1 = key if key is not None else (0, 0)
    BLOCK = triton.next_power_of_2(block)
    extra = {"HALF": max(1, BLOCK // 2)} if int4 else {}
    kernel[(nb,)](x, q, scales, m, block, _signed32(k0), _signed32(k1), BLOCK=BLOCK, STOCHASTIC=key is not None,
                  **extra, **_launch_options(x))
    return q, scales


def _launch_options(x: torch.Tensor) -> dict:
    return _NO_FMA if x.is_cuda else {}


def quantize_int8(x: torch.Tensor, block: int, key, out=None):
    """``(q int8 (m,), scales float32 (ceil(m/block),))`` of a contiguous 1-D float tensor
    (written into ``out = (q, scales)`` when given)."""
    return _quantize(_quantize_int8_kernel, x, block, key, x.numel(), torch.int8, False, out)


def quantize_int4(x: torch.Tensor, block: int, key, out=None):
    """``(packed uint8 (ceil(m/2),), scales)``: nibble q + 8, element 2p low, 2p + 1 high."""
    return _quantize(_quantize_int4_kernel, x, block, key, (x.numel() + 1) // 2, torch.uint8, True, out)


def _dequantize(kernel, qs, scales, block, outs):
    for q, s, o in zip(qs, scales, outs):
        m = o.numel()
        if m:
            BLOCK = 1024
            kernel[(triton.cdiv(m, BLOCK),)](q, s, o, m, block, BLOCK=BLOCK)
    return outs


def dequantize_int8(qs, scales, block: int, outs):
    """``outs[i][j] = qs[i][j] * scales[i][j // block]`` for every row ``i``."""
    return _dequantize(_dequantize_int8_kernel, qs, scales, block, outs)


def dequantize_int4(qs, scales, block: int, outs):
    """As :func:`dequantize_int8` for packed int4 codes."""
    return _dequantize(_dequantize_int4_kernel, qs, scales, block, outs)
