"""Aggregating updates that are already sharded across ranks (for example by FSDP).

Every rank holds the same ``n`` clients' values for its own coordinates: an ``(n, d_local)`` block.
Per-coordinate rules need nothing from the other ranks; distance-based and iterative rules sum
their small float64 per-client partials (the ``(n, n)`` Gram matrix, distances, flags) with an
all-reduce, so every rank selects the same clients and returns its own part of the aggregate.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..aggregators import Rule
from ..aggregators.columns import InMemory
from ..updates import as_matrix


class ShardColumns(InMemory):
    """This rank's ``(n, d_local)`` shard; ``reduce`` sums a partial over ``group`` in place."""

    def __init__(self, X: torch.Tensor, group=None, block: int | None = None):
        super().__init__(X, block)
        self.group = group

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            partial = partial.contiguous()
            dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=self.group)
        return partial


def aggregate(updates: Any, rule: Rule, *, group=None, return_info: bool = False, check: bool = True, **kwargs):
    """Aggregate this rank's shard of every client's update with ``rule``.

    ``updates`` is this rank's part in any form :func:`tapestry.as_matrix` accepts (a stacked
    ``(n, d_local)`` tensor, ``n`` 1-D tensors, ``n`` local state_dicts); the result has the same
    form and holds this rank's part of the aggregate. Every rank of ``group`` must call this with
    the same rule and the same ``n`` (``check=True`` verifies ``n`` with one tiny all-reduce and
    raises the same ``ValueError`` on every rank). Extra keyword arguments go to the rule
    (``weights=`` for mean, ``center=`` for centered clipping: this rank's part of the centre).
    """
    if not isinstance(rule, Rule):
        raise TypeError(f"rule must be a tapestry rule object (e.g. tp.Krum(f=2)), got {type(rule).__name__}")
    X, spec = as_matrix(updates)
    src = ShardColumns(X, group)
    if check and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        n = torch.tensor([X.shape[0], -X.shape[0]], dtype=torch.int64, device=X.device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX, group=group)
        hi, lo = int(n[0]), -int(n[1])
        if hi != lo:
            raise ValueError(f"ranks hold different numbers of clients (from {lo} to {hi}; this rank has {X.shape[0]})")
    agg, info = rule.aggregate(src, want_info=return_info, **kwargs)
    out = spec.unflatten(agg)
    return (out, info) if return_info else out
