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


ROW_CODECS = ("int8", "int4", "fp16", "bf16")  # what the fused *_encoded ops decode


def check_trim(n: int, f: int) -> None:
    """The trimmed mean's own condition, checked by the kernels' entry points (the fused ops are
    called directly by the compression path, not through a rule)."""
    if not 0 <= 2 * f < n:
        raise ValueError(f"trimmed_mean needs 0 <= 2f < n, got n={n}, f={f}")


def check_encoded(op: str, qs: list, scales: list, codec: str, block: int, d: int, device: torch.device) -> None:
    """Refuse payload rows that do not hold ``d`` values of ``codec`` (and, for int8/int4, their
    scales) as contiguous tensors on ``device``: what a kernel reading them by pointer assumes."""
    if codec not in ROW_CODECS:
        raise ValueError(f"{op}: codec must be one of {list(ROW_CODECS)}, got {codec!r}")
    quantized = codec in ("int8", "int4")
    if quantized and not (2 <= block <= 4096 and block % 2 == 0):
        raise ValueError(f"{op}: block must be even and in [2, 4096], got {block}")
    if not qs or (quantized and len(qs) != len(scales)):
        raise ValueError(f"{op}: needs n >= 1 rows and, for {codec}, as many rows of scales")
    width = 1 if quantized else 2
    count = (d + 1) // 2 if codec == "int4" else d
    for i, q in enumerate(qs):
        if q.device != device or q.element_size() != width or not q.is_contiguous() or q.numel() < count:
            raise ValueError(f"{op}: row {i} needs {count} contiguous {width}-byte {codec} values on {device}, "
                             f"got {q.numel()} {q.dtype} on {q.device}")
    if quantized:
        nscales = -(-d // block)
        for i, s in enumerate(scales):
            if s.device != device or s.dtype != torch.float32 or not s.is_contiguous() or s.numel() < nscales:
                raise ValueError(f"{op}: row {i} needs {nscales} contiguous float32 scales on {device}, "
                                 f"got {s.numel()} {s.dtype} on {s.device}")
