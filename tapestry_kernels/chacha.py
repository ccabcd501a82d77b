"""ChaCha20 keystream (RFC 8439) and fused secure-sum masking as Triton kernels.

Keystream word ``k`` of (key, nonce) is word ``k mod 16`` of the block with counter ``k div 16``.
Each program computes ``BLOCKS`` consecutive blocks, one block per lane: the 16 state words are
16 vectors of ``BLOCKS`` uint32 lanes, the 20 rounds are lane-wise add/xor/rotate (no cross-lane
traffic), and word ``w`` of block ``b`` lands at output index ``16 b + w - offset``.

``chacha20_mask``: ``out = x + sum_j sign_j * keystream(key_j)[offset : offset + d]`` mod 2^32,
every key's words accumulated in registers before one load of ``x`` and one store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotl(v, c: tl.constexpr):
    return (v << c) | (v >> (32 - c))


@triton.jit
def _qr(a, b, c, d):
    a = a + b
    d = _rotl(d ^ a, 16)
    c = c + d
    b = _rotl(b ^ c, 12)
    a = a + b
    d = _rotl(d ^ a, 8)
    c = c + d
    b = _rotl(b ^ c, 7)
    return a, b, c, d


@triton.jit
def _word(ptr, i):
    return tl.load(ptr + i).to(tl.uint32, bitcast=True)


@triton.jit
def _block(key_ptr, nonce_ptr, ctr):
    """The 16 output words of the blocks with counters ``ctr`` (a uint32 vector)."""
    s0 = tl.full(ctr.shape, 0x61707865, tl.uint32)
    s1 = tl.full(ctr.shape, 0x3320646E, tl.uint32)
    s2 = tl.full(ctr.shape, 0x79622D32, tl.uint32)
    s3 = tl.full(ctr.shape, 0x6B206574, tl.uint32)
    k0, k1, k2, k3 = _word(key_ptr, 0), _word(key_ptr, 1), _word(key_ptr, 2), _word(key_ptr, 3)
    k4, k5, k6, k7 = _word(key_ptr, 4), _word(key_ptr, 5), _word(key_ptr, 6), _word(key_ptr, 7)
    n0, n1, n2 = _word(nonce_ptr, 0), _word(nonce_ptr, 1), _word(nonce_ptr, 2)
    x0, x1, x2, x3 = s0, s1, s2, s3
    x4, x5, x6, x7 = s0 * 0 + k0, s0 * 0 + k1, s0 * 0 + k2, s0 * 0 + k3
    x8, x9, x10, x11 = s0 * 0 + k4, s0 * 0 + k5, s0 * 0 + k6, s0 * 0 + k7
    x12, x13, x14, x15 = ctr, s0 * 0 + n0, s0 * 0 + n1, s0 * 0 + n2
    for _ in range(10):  # column round, then diagonal round
        x0, x4, x8, x12 = _qr(x0, x4, x8, x12)
        x1, x5, x9, x13 = _qr(x1, x5, x9, x13)
        x2, x6, x10, x14 = _qr(x2, x6, x10, x14)
        x3, x7, x11, x15 = _qr(x3, x7, x11, x15)
        x0, x5, x10, x15 = _qr(x0, x5, x10, x15)
        x1, x6, x11, x12 = _qr(x1, x6, x11, x12)
        x2, x7, x8, x13 = _qr(x2, x7, x8, x13)
        x3, x4, x9, x14 = _qr(x3, x4, x9, x14)
    return (x0 + s0, x1 + s1, x2 + s2, x3 + s3, x4 + k0, x5 + k1, x6 + k2, x7 + k3,
            x8 + k4, x9 + k5, x10 + k6, x11 + k7, x12 + ctr, x13 + n0, x14 + n1, x15 + n2)


@triton.jit
def _store_words(out_ptr, x_ptr, base, offset, count, ws, HAS_X: tl.constexpr):
    """Word w of each block to out[16 b + w - offset] (plus x there when HAS_X), inside [0, count)."""
    for w in tl.static_range(16):
        idx = base + w - offset
        inside = (idx >= 0) & (idx < count)
        v = ws[w]
        if HAS_X:
            v = v + tl.load(x_ptr + idx, mask=inside, other=0).to(tl.uint32, bitcast=True)
        tl.store(out_ptr + idx, v.to(tl.int32, bitcast=True), mask=inside)


@triton.jit
def _chacha20_keystream_kernel(out_ptr, key_ptr, nonce_ptr, offset, count, BLOCKS: tl.constexpr):
    blk = offset // 16 + tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    ws = _block(key_ptr, nonce_ptr, blk.to(tl.uint32))  # counters past 2^32 - 1 are masked lanes only
    _store_words(out_ptr, out_ptr, blk * 16, offset, count, ws, HAS_X=False)


@triton.jit
def _chacha20_mask_kernel(out_ptr, x_ptr, keys_ptr, signs_ptr, nkeys, nonce_ptr, offset, count,
                          BLOCKS: tl.constexpr):
    blk = offset // 16 + tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    ctr = blk.to(tl.uint32)
    z = tl.zeros([BLOCKS], dtype=tl.uint32)
    a0, a1, a2, a3, a4, a5, a6, a7 = z, z, z, z, z, z, z, z
    a8, a9, a10, a11, a12, a13, a14, a15 = z, z, z, z, z, z, z, z
    for j in range(nkeys):
        ws = _block(keys_ptr + 8 * j, nonce_ptr, ctr)
        # subtracting is adding the two's complement: sign -1 -> multiplier 2^32 - 1
        m = tl.load(signs_ptr + j).to(tl.int32).to(tl.uint32, bitcast=True)
        a0 += m * ws[0]; a1 += m * ws[1]; a2 += m * ws[2]; a3 += m * ws[3]
        a4 += m * ws[4]; a5 += m * ws[5]; a6 += m * ws[6]; a7 += m * ws[7]
        a8 += m * ws[8]; a9 += m * ws[9]; a10 += m * ws[10]; a11 += m * ws[11]
        a12 += m * ws[12]; a13 += m * ws[13]; a14 += m * ws[14]; a15 += m * ws[15]
    acc = (a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15)
    _store_words(out_ptr, x_ptr, blk * 16, offset, count, acc, HAS_X=True)


def _grid(offset: int, count: int, blocks: int):
    nblocks = (offset + count - 1) // 16 - offset // 16 + 1
    return (triton.cdiv(nblocks, blocks),)


def chacha20_keystream(key: torch.Tensor, nonce: torch.Tensor, offset: int, count: int, BLOCKS: int = 128) -> torch.Tensor:
    """Keystream words ``offset .. offset+count-1`` as int32 bit patterns on key's device."""
    out = torch.empty(count, dtype=torch.int32, device=key.device)
    if count:
        _chacha20_keystream_kernel[_grid(offset, count, BLOCKS)](out, key, nonce, offset, count, BLOCKS=BLOCKS)
    return out


def chacha20_mask(x: torch.Tensor, keys: torch.Tensor, signs: torch.Tensor, nonce: torch.Tensor, offset: int,
                  out: torch.Tensor | None = None, BLOCKS: int = 128) -> torch.Tensor:
    """``x + sum_j signs[j] * keystream(keys[j])[offset:offset+d]`` mod 2^32 (int32 bit patterns)."""
    if out is None:
        out = torch.empty_like(x)
    if x.numel():
        _chacha20_mask_kernel[_grid(offset, x.numel(), BLOCKS)](out, x, keys, signs, keys.shape[0], nonce, offset,
                                                                x.numel(), BLOCKS=BLOCKS)
    return out
