"""The seeded randomized Hadamard rotation ``R x = H D x / sqrt(D)`` (Kairouz et al. 2021).

``x`` (length ``d``) is zero-padded to ``D = 2^ceil(log2 d)``; ``D`` flips signs where bit ``i % 32``
of ChaCha20 word ``i // 32`` (key from ``seed``, nonce :data:`NONCE_ROTATION`) is set; ``H`` is the
Walsh-Hadamard matrix, so ``H / sqrt(D)`` is orthonormal and its own inverse. :func:`unrotate`
applies ``H / sqrt(D)`` then the same signs and drops the padding. The rotation spreads a vector's
energy evenly over coordinates, so that rounding and modular wrap-around see no large coordinate.

The transform is the op ``fwht`` (``tapestry.reference.fwht`` states it; the C++ kernel on CPU
tensors, Triton on GPU tensors), every backend running the same stages in the same order, so all
give the same floats.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from .. import ops
from ..secure.prg import chacha20_keystream
from .samplers import key_of

NONCE_ROTATION = b"tapestry-rot"


def padded(d: int) -> int:
    return 1 << max(0, math.ceil(math.log2(d))) if d > 1 else 1


def sign_words(seed, D: int, device=None) -> torch.Tensor:
    """The ``ceil(D / 32)`` keystream words whose bits are the sign flips (int32 view)."""
    return chacha20_keystream(key_of(seed), NONCE_ROTATION, 0, (D + 31) // 32, device=device).view(torch.int32)


def _scale(D: int) -> float:
    return float(np.float32(1.0 / math.sqrt(D)))


def _check(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point, got {x.dtype}")


def _backend(reference: bool):
    return ops.backend("reference") if reference else contextlib.nullcontext()


def rotate(x: torch.Tensor, *, seed, reference: bool = False) -> torch.Tensor:
    """``H D pad(x) / sqrt(D)`` as float32 on x's device, length ``D = 2^ceil(log2 len(x))``
    (``reference=True``: the reference op, the same floats)."""
    _check(x, "x")
    d = x.numel()
    D = padded(d)
    src = x.detach().to(torch.float32).contiguous()
    if d < D:
        src = torch.cat([src, src.new_zeros(D - d)])
    with _backend(reference):
        return ops.call("fwht", src, sign_words(seed, D, src.device), _scale(D))


def unrotate(y: torch.Tensor, *, seed, d: int, reference: bool = False) -> torch.Tensor:
    """The inverse of :func:`rotate`: ``(D H y / sqrt(D))[:d]`` as float32 on y's device."""
    _check(y, "y")
    D = y.numel()
    if D & (D - 1):
        raise ValueError(f"a rotated vector has a power-of-two length, got {D}")
    if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= D or padded(d) != D:
        raise ValueError(f"d={d!r} does not pad to the rotated length {D}")
    src = y.detach().to(torch.float32).contiguous()
    with _backend(reference):
        z = ops.call("fwht", src, sign_words(seed, D, src.device), _scale(D), signs_after=True)
    return z[:d].clone() if d < D else z
