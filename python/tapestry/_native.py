"""Lazy access to the compiled extensions, so that ``import tapestry`` works without them.

A missing or broken extension is reported, with a build hint, when its code is first needed
(and by ``tapestry info``), never at import time.
"""

from __future__ import annotations

import importlib
from types import ModuleType

BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (see README)"

_cache: dict[str, ModuleType | Exception] = {}


def load(name: str) -> ModuleType | Exception:
    """``tapestry._C`` or ``tapestry._cuda`` (``name`` is "_C" or "_cuda"), or the import error."""
    if name not in _cache:
        try:
            _cache[name] = importlib.import_module(f"tapestry.{name}")
        except Exception as exc:  # ImportError, or a broken shared object
            _cache[name] = exc
    return _cache[name]


def require(name: str) -> ModuleType:
    mod = load(name)
    if isinstance(mod, Exception):
        raise ImportError(f"tapestry.{name} is not available ({mod}); {BUILD_HINT}") from mod
    return mod


def missing_reason(name: str) -> str | None:
    mod = load(name)
    return None if not isinstance(mod, Exception) else f"tapestry.{name} not importable ({mod}); {BUILD_HINT}"


def set_num_threads(n: int) -> None:
    """Threads for torch's and for ``tapestry._C``'s kernels (two OpenMP runtimes: torch's
    ``set_num_threads`` does not reach ours). Processes that share a machine's cores call this."""
    import torch

    torch.set_num_threads(n)
    mod = load("_C")
    if not isinstance(mod, Exception):
        mod.set_num_threads(n)
