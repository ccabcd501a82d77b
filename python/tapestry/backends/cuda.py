"""CUDA backend: ``tapestry._cuda`` (csrc/cuda, raw device pointers and the current stream).

The extension imports on machines without a GPU driver and reports itself unavailable.
"""

from __future__ import annotations

import torch

from .. import _native


def unavailable() -> str | None:
    reason = _native.missing_reason("_cuda")
    if reason is not None:
        return reason
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    return None


def rejects(device: torch.device) -> str | None:
    return None if device.type == "cuda" else f"takes CUDA tensors, got {device}"


# ---------------------------------------------------------------------------------------------
# robust aggregation (csrc/cuda/select.cu, mean.cu)

# ---------------------------------------------------------------------------------------------
# compression (csrc/cuda/quant.cu)

# ---------------------------------------------------------------------------------------------
# secure sum (csrc/cuda/chacha.cu)
