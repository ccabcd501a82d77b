"""What every rule shares: the call protocol, diagnostics and the checks of SPEC.md's requirements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .. import ops
from ..updates import as_matrix

# Columns scanned at a time by the Python-side passes over X (bounded temporary memory).
CHUNK = 1 << 16


@dataclass
class AggregationInfo:
    """Diagnostics of one aggregation.

    ``selected``/``rejected``: clients whose updates form (or were kept out of) the aggregate, for
    rules that select whole updates (Krum, Multi-Krum, Bulyan); None for per-coordinate rules.
    ``scores``: per-client float64 scores where the rule has them (Krum scores, geometric-median
    weights, clipping factors); ``inf`` for clients with non-finite values.
    ``nonfinite``: clients whose update holds a NaN or an Inf.
    ``backend``: the backend that ran the heaviest op.
    """

    rule: str
    n: int
    f: int | None = None
    selected: list[int] | None = None
    rejected: list[int] | None = None
    scores: torch.Tensor | None = None
    nonfinite: list[int] = field(default_factory=list)
    backend: str | None = None
    iterations: int | None = None


def require(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition``: SPEC.md's requirements, with numbers."""
    if not condition:
        raise ValueError(message)


def check_f(f: Any, rule: str) -> int:
    if isinstance(f, bool) or not isinstance(f, int):
        raise TypeError(f"{rule}: f must be an int, got {type(f).__name__}")
    require(f >= 0, f"{rule} needs f >= 0, got f={f}")
    return f


def nonfinite_rows(X: torch.Tensor) -> torch.Tensor:
    """Boolean ``(n,)`` mask of rows holding a NaN or Inf, scanned in column chunks."""
    bad = torch.zeros(X.shape[0], dtype=torch.bool, device=X.device)
    for start in range(0, X.shape[1], CHUNK):
        bad |= ~torch.isfinite(X[:, start : start + CHUNK]).all(dim=1)
    return bad


def indices(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask).flatten().tolist()


def run(op: str, X: torch.Tensor, *args) -> tuple[torch.Tensor, str]:
    """Run ``op`` on the backend chosen for ``X``; return the result and the backend's name."""
    name, fn = ops.resolve(op, X.device)
    return fn(X, *args), name


class Rule:
    """A robust aggregation rule with its parameters fixed at construction.

    ``rule(updates)`` returns the aggregate in the caller's form (see :mod:`tapestry.updates`);
    ``rule(updates, return_info=True)`` returns ``(aggregate, AggregationInfo)``. Subclasses
    implement :meth:`aggregate` on the stacked ``(n, d)`` matrix.
    """

    name = "rule"

    def aggregate(self, X: torch.Tensor, *, want_info: bool, **kwargs) -> tuple[torch.Tensor, AggregationInfo]:
        raise NotImplementedError

    def __call__(self, updates: Any, *, return_info: bool = False, **kwargs):
        X, spec = as_matrix(updates)
        agg, info = self.aggregate(X, want_info=return_info, **kwargs)
        out = spec.unflatten(agg)
        return (out, info) if return_info else out

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"
