"""Fixed point into the ring Z_2^32 (default) or Z_2^64, with clipping and an overflow-free scale.

``q = round(clip(x, -c, c) * s)`` with ``|q| <= B = floor(c s) + 1`` and ``s`` the largest scale
with ``n B <= 2^(bits-1) - 1``: the sum of ``n`` encoded values, read as a signed integer, is the
exact integer sum, and the server decodes ``sum / s``. Ring elements are NumPy ``uint32`` /
``uint64`` arrays (their arithmetic wraps mod 2^bits, by definition).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

RING_DTYPES = {32: np.uint32, 64: np.uint64}
SIGNED = {32: np.int32, 64: np.int64}


@dataclass(frozen=True)
class FixedPoint:
    """Encoding for ``n`` clients, values clipped to ``[-clip, clip]``, ring of ``bits`` bits."""

    n: int
    clip: float = 1.0
    bits: int = 32
    rounding: str = "nearest"  # or "stochastic" (unbiased: E[q] = clip(x) * s)

    def __post_init__(self):
        if self.bits not in RING_DTYPES:
            raise ValueError(f"ring bits must be 32 or 64, got {self.bits}")
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be a positive int, got {self.n!r}")
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ValueError(f"clip must be finite and > 0, got {self.clip}")
        if self.rounding not in ("nearest", "stochastic"):
            raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {self.rounding!r}")
        if self.scale < 1:
            raise ValueError(f"{self.n} clients cannot share a {self.bits}-bit ring at clip={self.clip}: the "
                             f"scale would be {self.scale:g} < 1 (use bits=64 or a smaller clip)")

    @property
    def scale(self) -> float:
        """Largest power of two ``s`` with ``n (c s + 1) <= 2^(bits-1) - 1`` (a power of two keeps
        ``x * s`` exact in floating point)."""
        limit = ((2 ** (self.bits - 1) - 1) // self.n - 1) / self.clip
        return 2.0 ** math.floor(math.log2(limit)) if limit >= 1 else limit

    @property
    def bound(self) -> int:
        return math.floor(self.clip * self.scale) + 1

    @property
    def dtype(self):
        return RING_DTYPES[self.bits]

    def encode(self, x, *, seed: bytes | None = None) -> np.ndarray:
        """Ring elements of one update (a 1-D float tensor or array). Non-finite values are a
        ValueError (they cannot be clipped meaningfully); stochastic rounding draws its uniforms
        from the ChaCha20 stream of the 32-byte ``seed`` (reproducible, counter-based)."""
        # NumPy, single-threaded: torch's threaded casts stall on a busy machine for no gain here
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().reshape(-1)
            v = (x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)).numpy()
        else:
            v = np.asarray(x, dtype=np.float64).reshape(-1)
        if not np.isfinite(v).all():
            bad = int(np.flatnonzero(~np.isfinite(v))[0])
            raise ValueError(f"cannot encode a non-finite value (index {bad}: {v[bad]})")
        # float32 input with nearest rounding stays in float32: s is a power of two, so x * s is
        # exact, and a float32 of magnitude >= 2^23 is already an integer: rint is exact too.
        exact32 = v.dtype == np.float32 and self.rounding == "nearest" and self.clip * self.scale < 2**31
        v = v.astype(np.float32 if exact32 else np.float64)  # a copy: the clipping below is in place
        np.clip(v, -self.clip, self.clip, out=v)
        v *= v.dtype.type(self.scale)
        if self.rounding == "stochastic":
            if seed is None:
                raise ValueError("stochastic rounding needs a 32-byte seed")
            from .prg import NONCE_ROUNDING, chacha20_keystream

            v += chacha20_keystream(seed, NONCE_ROUNDING, 0, v.size).numpy() / 2.0**32
            np.floor(v, out=v)
        else:
            np.rint(v, out=v)
        np.clip(v, -self.bound, self.bound, out=v)
        return v.astype(SIGNED[self.bits]).view(self.dtype)

    def decode(self, total: np.ndarray) -> np.ndarray:
        """float64 values of a ring sum of at most ``n`` encoded updates: ``signed(total) / s``."""
        total = np.asarray(total)
        if total.dtype != self.dtype:
            raise TypeError(f"expected {np.dtype(self.dtype).name} ring elements, got {total.dtype}")
        return total.view(SIGNED[self.bits]).astype(np.float64) / self.scale


def clip_norm(x: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``x * min(1, max_norm / |x|_2)``: the L2 clipping a client applies before masking (the
    robustness a server can still enforce on updates it cannot see)."""
    norm = float(torch.linalg.vector_norm(x.to(torch.float64)))
    return x if norm <= max_norm else x * (max_norm / norm)
