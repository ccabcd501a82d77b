"""Backends other than the reference: thin wrappers that hand checked tensors to native kernels.

Each module defines one function per op it implements, named as in :data:`tapestry.ops.OPS`,
plus ``unavailable()`` and ``rejects(op, device, args)``. Wrappers allocate outputs and pass raw pointers,
sizes and strides; they contain no policy.
"""

from __future__ import annotations

import torch

ROBUST_OPS = ("weighted_mean", "trimmed_mean", "coord_median", "mean_around_median", "gram")


def no_kernel_for(op: str, args: tuple) -> str | None:
    """The reason a native backend gives when a robust op's updates (its first argument) have a
    dtype its kernels do not read: float32, float16 and bfloat16 only."""
    from ..updates import KERNEL_DTYPES

    X = args[0] if op in ROBUST_OPS and args and isinstance(args[0], torch.Tensor) else None
    if X is not None and X.dtype not in KERNEL_DTYPES:
        return f"no kernel for {X.dtype} updates (float32, float16, bfloat16)"
    return None
