"""Decoding inside the aggregation kernels: a tile of client values read from payload codes.

A kernel that takes ``CODEC`` reads its ``(rows, cols)`` tile through :func:`load_values`:

* ``PLAIN``: ``X`` holds the values (float32, float16 or bfloat16, widened exactly);
* ``INT8``: ``X`` holds int8 codes, ``S`` float32 scales per ``block`` columns of each row;
* ``INT4``: ``X`` holds packed int4 (nibble ``q + 8``, column ``2p`` low in byte ``p``), ``S`` as int8.

A decoded value is ``float32(q) * scale``, the one float32 product of the reference's decoder, so
a fused op gives the same bits as the op on decoded rows. The payload rows arrive stacked
(:func:`stacked`): ``(n, width)`` codes and ``(n, ceil(d / block))`` scales, 1 or 1/2 byte per value
instead of 4 on the way to the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PLAIN, INT8, INT4 = 0, 1, 2


@triton.jit
def load_values(X, S, rows, cols, stride, sstride, block, mask, CODEC: tl.constexpr):
    """float32 values at (rows, cols) (broadcast together; rows int64), 0 where ``mask`` is false."""
    if CODEC == 0:
        return tl.load(X + rows * stride + cols, mask=mask, other=0.0).to(tl.float32)
    if CODEC == 1:
        q = tl.load(X + rows * stride + cols, mask=mask, other=0).to(tl.float32)
    else:
        byte = tl.load(X + rows * stride + (cols >> 1), mask=mask, other=0x88).to(tl.int32)
        q = (((byte >> ((cols & 1) * 4).to(tl.int32)) & 15) - 8).to(tl.float32)
    return q * tl.load(S + rows * sstride + cols // block, mask=mask, other=0.0)


class Encoded:
    """Stacked payload rows for the kernels: ``X`` (codes or values), ``S`` (scales, or ``X`` as
    an unused pointer), ``block``, ``codec`` (PLAIN / INT8 / INT4), ``n`` rows of ``d`` values."""

    def __init__(self, X: torch.Tensor, S: torch.Tensor | None, block: int, codec: int, d: int):
        self.X, self.S, self.block, self.codec, self.d = X, X if S is None else S, max(1, block), codec, d
        self.n = X.shape[0]

    @property
    def stride(self) -> int:
        return self.X.stride(0)

    @property
    def sstride(self) -> int:
        return self.S.stride(0)


def plain(X: torch.Tensor) -> Encoded:
    return Encoded(X, None, 1, PLAIN, X.shape[1])


def stacked(qs: list, scales: list, codec: str, block: int, d: int) -> Encoded:
    """The rows of a checked payload list (``tapestry.backends.check_encoded``) as one tensor each
    for codes and scales; float16/bfloat16 rows are plain values."""
    if codec in ("fp16", "bf16"):
        dtype = torch.float16 if codec == "fp16" else torch.bfloat16
        return plain(torch.stack([q.view(dtype)[:d] for q in qs]))
    width = (d + 1) // 2 if codec == "int4" else d
    nb = triton.cdiv(d, block)
    X = torch.stack([q.view(torch.uint8 if codec == "int4" else torch.int8)[:width] for q in qs])
    S = torch.stack([s[:nb] for s in scales])
    return Encoded(X, S, block, INT4 if codec == "int4" else INT8, d)
