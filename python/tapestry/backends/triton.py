"""Triton backend: kernels in the top-level package ``tapestry_kernels``.

Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` (how CI tests it).
"""

from __future__ import annotations

import os

import torch


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton not importable ({exc})"
    if not _interpret() and not torch.cuda.is_available():
        return "no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
    return None


def rejects(device: torch.device) -> str | None:
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _interpret():
        return None
    return f"takes CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got {device}"


# ---------------------------------------------------------------------------------------------
# robust aggregation (tapestry_kernels/select.py, gram.py, mean.py)

# ---------------------------------------------------------------------------------------------
# compression (tapestry_kernels/quant.py)

# ---------------------------------------------------------------------------------------------
# secure sum (tapestry_kernels/chacha.py)
