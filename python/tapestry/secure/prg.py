"""ChaCha20 keystreams as the secure-sum PRG: validation and dispatch (kernels do arithmetic only).

A seed is a 32-byte ChaCha20 key; each purpose has a fixed 12-byte nonce (:data:`NONCE_MASK` for
masks, :data:`NONCE_ROUNDING` for stochastic rounding). Keystream word ``k`` is word ``k mod 16``
of the RFC 8439 block with counter ``k div 16`` (docs/spec.md), so any slice can be produced by any
backend and one large call equals many small calls. The 32-bit block counter never wraps: a range
reaching past block ``2^32 - 1`` raises :class:`ValueError`.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import ops

MAX_WORDS = 16 << 32  # words in one (key, nonce) stream: 2^32 blocks of 16
NONCE_MASK = b"tapestry-msk"  # 12 bytes each
NONCE_ROUNDING = b"tapestry-rnd"


def _words(data: bytes, n: int, what: str, device) -> torch.Tensor:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) != 4 * n:
        raise ValueError(f"{what} must be {4 * n} bytes, got {len(data)}")
    return torch.from_numpy(np.frombuffer(data, dtype="<u4").astype(np.uint32).view(np.int32)).to(device)


def check_range(offset, count) -> tuple[int, int]:
    """``(offset, count)`` as ints, or a ValueError naming the block counter that would wrap."""
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
        raise TypeError(f"count must be an int, got {type(count).__name__}")
    offset, count = int(offset), int(count)
    if offset < 0 or count < 0:
        raise ValueError(f"offset and count must be >= 0, got offset={offset}, count={count}")
    if offset + count > MAX_WORDS:
        last = (offset + count - 1) // 16
        raise ValueError(
            f"keystream words {offset}..{offset + count - 1} need block counter {last}, past the last "
            f"block 2^32 - 1 = {2**32 - 1}: the 32-bit ChaCha20 block counter would wrap")
    return offset, count


def chacha20_keystream(key: bytes, nonce: bytes, offset: int, count: int, *, device=None) -> torch.Tensor:
    """ChaCha20 (RFC 8439) keystream words ``offset .. offset+count-1`` as a ``torch.uint32`` tensor.

    ``key`` is 32 bytes, ``nonce`` 12 bytes. Byte ``4k + j`` of the RFC's serialised keystream is
    byte ``j`` (little-endian) of word ``k``; OpenSSL's ChaCha20 with the 16-byte IV
    ``counter (4 bytes LE) + nonce`` produces the same bytes from block ``counter`` on.
    """
    offset, count = check_range(offset, count)
    device = torch.device(device) if device is not None else torch.device("cpu")
    k, n = _words(key, 8, "key", device), _words(nonce, 3, "nonce", device)
    return ops.call("chacha20_keystream", k, n, offset, count, device=device).view(torch.uint32)


def seeds_to_keys(seeds: list[bytes], device) -> torch.Tensor:
    """(m, 8) int32 key words for a list of 32-byte seeds."""
    if not seeds:
        return torch.empty((0, 8), dtype=torch.int32, device=device)
    for i, s in enumerate(seeds):
        if len(s) != 32:
            raise ValueError(f"seed {i} must be 32 bytes, got {len(s)}")
    arr = np.frombuffer(b"".join(bytes(s) for s in seeds), dtype="<u4").astype(np.uint32).view(np.int32)
    return torch.from_numpy(arr.reshape(-1, 8).copy()).to(device)


def chacha20_mask(x: torch.Tensor, seeds: list[bytes], signs: list[int], *, nonce: bytes = NONCE_MASK, offset: int = 0,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """``x + sum_j signs[j] * PRG(seeds[j])[offset : offset + d]`` mod 2^32, fused in one pass.

    ``x`` is a 1-D ``torch.uint32`` or ``torch.int32`` tensor (ring elements; int32 is read as
    their bit pattern); the result has ``x``'s dtype. ``out=x`` masks in place.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.dtype not in (torch.uint32, torch.int32):
        raise TypeError("x must be a 1-D torch.uint32 or torch.int32 tensor of ring elements")
    if len(seeds) != len(signs):
        raise ValueError(f"{len(seeds)} seeds but {len(signs)} signs")
    if any(s not in (1, -1) for s in signs):
        raise ValueError(f"signs must be +1 or -1, got {sorted(set(signs))}")
    offset, count = check_range(offset, x.numel())
    dtype = x.dtype
    xi = x.view(torch.int32).contiguous()
    keys = seeds_to_keys(seeds, x.device)
    sg = torch.tensor(list(signs), dtype=torch.int8, device=x.device)
    n = _words(nonce, 3, "nonce", x.device)
    o = None
    if out is not None:
        if out.shape != x.shape or out.dtype not in (torch.uint32, torch.int32) or not out.is_contiguous():
            raise ValueError("out must be a contiguous uint32/int32 tensor shaped like x")
        o = out.view(torch.int32)
    r = ops.call("chacha20_mask", xi, keys, sg, n, offset, out=o, device=x.device)
    return (out if out is not None else r.view(dtype))
