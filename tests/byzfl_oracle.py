"""ByzFL 0.0.11 (the test oracle) without its training framework.

``import byzfl`` also imports its federated framework and benchmark, which need torchvision and
seaborn; those would replace this project's torch, so the oracle is installed with
``pip install --no-deps byzfl==0.0.11`` and only its NumPy/PyTorch aggregators, pre-aggregators
and attacks are loaded here: a bare ``byzfl`` package object keeps its ``__init__`` from running.

Convention mapping: ByzFL is given float64 NumPy arrays (it then computes in float64 with NumPy
and SciPy), and its result is compared with Tapestry's float32 one to 1e-5 of the largest value.
"""

import importlib
import importlib.util
import sys
import types

import pytest


def load():
    """``(aggregators, preaggregators, attacks)`` modules of ByzFL; a clear failure when it is absent."""
    if "byzfl" not in sys.modules:
        spec = importlib.util.find_spec("byzfl")
        if spec is None:
            pytest.fail("byzfl==0.0.11 is a test requirement: pip install --no-deps byzfl==0.0.11")
        pkg = types.ModuleType("byzfl")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["byzfl"] = pkg
    return (importlib.import_module("byzfl.aggregators.aggregators"),
            importlib.import_module("byzfl.aggregators.preaggregators"),
            importlib.import_module("byzfl.attacks.attacks"))
