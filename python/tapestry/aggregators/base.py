"""What every rule shares: the call protocol, diagnostics and the checks of docs/spec.md's requirements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import ops
from ..updates import as_matrix
from .columns import Columns, InMemory

# Columns scanned at a time by the Python-side passes over a block (bounded temporary memory).
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
    ``bytes_sent``: bytes this process sent to others to compute it (distributed paths; else None).
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
    bytes_sent: int | None = None


def require(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition``: docs/spec.md's requirements, with numbers."""
    if not condition:
        raise ValueError(message)


def check_f(f: Any, rule: str) -> int:
    if isinstance(f, bool) or not isinstance(f, int):
        raise TypeError(f"{rule}: f must be an int, got {type(f).__name__}")
    require(f >= 0, f"{rule} needs f >= 0, got f={f}")
    return f


def _sub_chunks(src: Columns):
    """(start, stop) ranges of at most CHUNK columns covering every block of ``src``."""
    for a, b in src.blocks():
        for start in range(a, b, CHUNK):
            yield start, min(start + CHUNK, b)


# Row reductions of one chunk. On the CPU in NumPy, one thread: torch splits any op over 32K+ values
# across its threads, and on a busy machine such a team waits a scheduler slice (ms) for a
# 50-microsecond job (torch.linalg.vecdot of a 16 x 65536 chunk: 30 ms against NumPy's 1 ms).
def _numpy_ok(A: torch.Tensor) -> bool:
    return A.device.type == "cpu" and A.dtype != torch.bfloat16


def bad_rows(A: torch.Tensor) -> torch.Tensor:
    """Boolean ``(rows,)``: which rows of the chunk ``A`` hold a NaN or Inf."""
    if _numpy_ok(A):
        return torch.from_numpy(~np.isfinite(A.numpy()).all(axis=1))
    return ~torch.isfinite(A).all(dim=1)


def row_sq_norms(A: torch.Tensor) -> torch.Tensor:
    """float64 ``(rows,)``: each row of the float32 chunk ``A`` dotted with itself, the products
    summed in float32 over the chunk."""
    if _numpy_ok(A):
        a = A.numpy()
        return torch.from_numpy(np.einsum("ij,ij->i", a, a)).to(torch.float64)
    return torch.linalg.vecdot(A, A).to(torch.float64)


def nonfinite_rows(src: Columns) -> torch.Tensor:
    """Boolean ``(n,)`` CPU mask of clients holding a NaN or Inf anywhere (in any shard)."""
    bad = torch.zeros(src.n, dtype=torch.float64, device=src.device)
    for a, b in _sub_chunks(src):
        bad += bad_rows(src.read(a, b)).to(device=src.device, dtype=torch.float64)
    return src.reduce(bad).cpu() > 0


def sq_distances_to(src: Columns, z: torch.Tensor) -> torch.Tensor:
    """``|x_i - z|^2`` for every client, float64 ``(n,)`` on the CPU (``z`` is this shard's part)."""
    sq = torch.zeros(src.n, dtype=torch.float64, device=src.device)
    z64 = z.to(torch.float64)
    for a, b in _sub_chunks(src):
        sq += ((src.read(a, b).to(torch.float64) - z64[a:b]) ** 2).sum(dim=1)
    return src.reduce(sq).cpu()


def sq_norm(src: Columns, v: torch.Tensor) -> float:
    """``|v|^2`` of a vector split over the shards like the updates' columns."""
    return float(src.reduce(torch.sum(v.to(torch.float64) ** 2).reshape(1)).item())


def gram(src: Columns) -> tuple[torch.Tensor, str]:
    """float64 ``(n, n)`` Gram matrix over every block and shard (see the ``gram`` op)."""
    fused = src.fused("gram")
    if fused is not None:
        G, name = fused()
        return src.reduce(G).cpu(), name
    G, name = None, None
    for a, b in src.blocks():
        X = src.read(a, b)
        if name is None:
            name, fn = ops.resolve("gram", src.device, (X,))
        part = fn(X).to(torch.float64)
        G = part if G is None else G + part
    return src.reduce(G).cpu(), name


def apply(op: str, src: Columns, *args) -> tuple[torch.Tensor, str]:
    """Run a per-coordinate ``op`` block by block; the ``(d,)`` float32 result and the backend."""
    fused = src.fused(op)
    if fused is not None:
        return fused(*args)
    blocks = list(src.blocks())
    first = src.read(*blocks[0]) if blocks else None  # a rank's shard may hold no columns
    # every block has the first's dtype and rows: the backend is chosen once, on real inputs
    name, fn = ops.resolve(op, src.device, (first, *args) if blocks else ())
    if len(blocks) == 1:
        return fn(first, *args), name
    out = torch.empty(src.d, dtype=torch.float32, device=src.device)
    dst = out.numpy() if _numpy_ok(out) else out  # (a NumPy copy: one thread, see _numpy_ok)
    for i, (a, b) in enumerate(blocks):
        part = fn(first if i == 0 else src.read(a, b), *args)
        dst[a:b] = part.numpy() if dst is not out else part
    return out, name


def indices(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask).flatten().tolist()


class Rule:
    """A robust aggregation rule with its parameters fixed at construction.

    ``rule(updates)`` returns the aggregate in the caller's form (see :mod:`tapestry.updates`);
    ``rule(updates, return_info=True)`` returns ``(aggregate, AggregationInfo)``. Subclasses
    implement :meth:`aggregate` on a :class:`~tapestry.aggregators.columns.Columns` source, so the
    same code aggregates updates in memory, compressed, streamed from files or sharded.
    """

    name = "rule"
    deltas_only = False  # True: meaningful only on deltas (local - global), e.g. DP's norm clipping

    def aggregate(self, src: Columns, *, want_info: bool, **kwargs) -> tuple[torch.Tensor, AggregationInfo]:
        """The ``(src.d,)`` float32 aggregate of ``src`` (on ``src.device``) and its diagnostics."""
        raise NotImplementedError

    def __call__(self, updates: Any, *, return_info: bool = False, **kwargs):
        X, spec = as_matrix(updates)
        agg, info = self.aggregate(InMemory(X), want_info=return_info, **kwargs)
        out = spec.unflatten(agg)
        return (out, info) if return_info else out

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"
