"""Test-wide settings.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors: TRITON_INTERPRET must be
set before triton is first imported, so it is set here, at collection start.
"""

import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
