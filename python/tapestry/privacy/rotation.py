"""The seeded randomized Hadamard rotation ``R x = H D x / sqrt(D)`` (Kairouz et al. 2021).

``x`` (length ``d``) is zero-padded to ``D = 2^ceil(log2 d)``; ``D`` flips signs where bit ``i % 32``
of ChaCha20 word ``i // 32`` (key from ``seed``, nonce :data:`NONCE_ROTATION`) is set; ``H`` is the
Walsh-Hadamard matrix, so ``H / sqrt(D)`` is orthonormal and its own inverse. :func:`unrotate`
applies ``H / sqrt(D)`` then the same signs and drops the padding. The rotation spreads a vector's
energy evenly over coordinates, so that rounding and modular wrap-around see no large coordinate.

The C++ kernel (``dp_fwht``) runs the stages in the same ascending order as the reference below,
with the same butterflies, so both give the same floats.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import _native
from ..secure.prg import chacha20_keystream
from .samplers import key_of

NONCE_ROTATION = b"tapestry-rot"


def padded(d: int) -> int:
    return 1 << max(0, math.ceil(math.log2(d))) if d > 1 else 1


def sign_words(seed, D: int) -> torch.Tensor:
    """The ``ceil(D / 32)`` keystream words whose bits are the sign flips (int32 view)."""
    return chacha20_keystream(key_of(seed), NONCE_ROTATION, 0, (D + 31) // 32).view(torch.int32)


def _signs(words: torch.Tensor, D: int) -> torch.Tensor:
    w = words.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    bits = (w.unsqueeze(1) >> torch.arange(32)) & 1
    return 1.0 - 2.0 * bits.reshape(-1)[:D].to(torch.float32)


def fwht_reference(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Orthonormal-up-to-``scale`` Walsh-Hadamard transform of float32 ``x`` (length a power of
    two), stage by stage with ``h = 1, 2, 4, ...``: the executable statement of the kernel."""
    D = x.numel()
    y = x.clone()
    h = 1
    while h < D:
        v = y.view(-1, 2, h)
        a, b = v[:, 0, :].clone(), v[:, 1, :].clone()
        v[:, 0, :] = a + b
        v[:, 1, :] = a - b
        h *= 2
    return y * torch.tensor(scale, dtype=torch.float32) if scale != 1.0 else y


def _kernel():
    C = _native.load("_C")
    return None if isinstance(C, Exception) or not hasattr(C, "dp_fwht") else C


def _check(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point, got {x.dtype}")


def rotate(x: torch.Tensor, *, seed, reference: bool = False) -> torch.Tensor:
    """``H D pad(x) / sqrt(D)`` as float32, length ``D = 2^ceil(log2 len(x))``."""
    _check(x, "x")
    d = x.numel()
    D = padded(d)
    words = sign_words(seed, D)
    scale = float(np.float32(1.0 / math.sqrt(D)))
    C = None if reference else _kernel()
    src = x.detach().to("cpu", torch.float32).contiguous()
    if d < D:
        src = torch.cat([src, src.new_zeros(D - d)])
    if C is None:
        return fwht_reference(src * _signs(words, D), scale)
    y = torch.empty(D, dtype=torch.float32)
    C.dp_fwht(y.data_ptr(), src.data_ptr(), D, words.data_ptr(), scale)  # reads src, writes y
    return y


def unrotate(y: torch.Tensor, *, seed, d: int, reference: bool = False) -> torch.Tensor:
    """The inverse of :func:`rotate`: ``(D H y / sqrt(D))[:d]`` as float32."""
    _check(y, "y")
    D = y.numel()
    if D & (D - 1):
        raise ValueError(f"a rotated vector has a power-of-two length, got {D}")
    if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= D or padded(d) != D:
        raise ValueError(f"d={d!r} does not pad to the rotated length {D}")
    src = y.detach().to("cpu", torch.float32).contiguous()
    words = sign_words(seed, D)
    scale = float(np.float32(1.0 / math.sqrt(D)))
    C = None if reference else _kernel()
    if C is None:
        return (fwht_reference(src, scale) * _signs(words, D))[:d].clone()
    z = torch.empty(D, dtype=torch.float32)
    C.dp_fwht(z.data_ptr(), src.data_ptr(), D, 0, scale)
    C.dp_apply_signs(z.data_ptr(), D, words.data_ptr())
    return z[:d].clone()
