"""CPU backend: ``tapestry._C`` (C++17, OpenMP, AVX2/AVX-512 with a portable fallback).

Kernels receive raw data pointers (``tensor.data_ptr()``), sizes, strides and a dtype code from
:data:`DTYPE_CODES`; outputs are allocated here. The GIL is released inside every kernel.
"""

from __future__ import annotations

import torch

from .. import _native

# dtype codes shared with csrc/common.h
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def unavailable() -> str | None:
    return _native.missing_reason("_C")


def rejects(device: torch.device) -> str | None:
    return None if device.type == "cpu" else f"takes CPU tensors, got {device}"


def _C():
    return _native.require("_C")


# ---------------------------------------------------------------------------------------------
# robust aggregation (csrc/cpu/select.cpp, gram.cpp, mean.cpp)

# ---------------------------------------------------------------------------------------------
# compression (csrc/cpu/quant.cpp)

# ---------------------------------------------------------------------------------------------
# secure sum (csrc/cpu/chacha.cpp)
