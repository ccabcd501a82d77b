"""Where a rule reads the ``(n, d)`` updates from: blocks of columns.

Every rule is written against :class:`Columns`, so one implementation serves

* updates in memory (:class:`InMemory`: one block, a view, no copy),
* compressed payloads decoded block by block (``tapestry.compression``),
* files streamed block by block under a memory budget, and coordinate shards spread over
  ``torch.distributed`` ranks (``tapestry.distributed``): a shard's ``reduce`` sums the small
  per-client partial results (Gram matrices, squared distances, flags) over all ranks, so that
  every rank selects the same clients.

Per-coordinate ops are independent per coordinate, so any blocking gives bit-identical results.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class Columns:
    """Base class: ``n`` clients, ``d`` coordinates (this shard's), read ``(n, stop-start)`` blocks."""

    n: int
    d: int
    device: torch.device

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Columns ``start:stop`` of every client: ``(n, stop - start)`` float32/float16/bfloat16,
        unit stride along columns."""
        raise NotImplementedError

    def blocks(self) -> Iterator[tuple[int, int]]:
        """The ``(start, stop)`` column ranges a pass over the data visits, in order."""
        yield 0, self.d

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum a small per-client partial result over every shard (identity for one shard)."""
        return partial

    def fused(self, op: str):
        """A kernel that runs ``op`` (a per-coordinate op, or ``gram``) over the whole source at
        once, as ``fn(*args) -> (the op's result, backend name)``, or None: read it block by block."""
        return None


class InMemory(Columns):
    """A stacked ``(n, d)`` tensor: one block, read as a view."""

    def __init__(self, X: torch.Tensor, block: int | None = None):
        self.X = X
        self.n, self.d = X.shape
        self.device = X.device
        self.block = block

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.X[:, start:stop]

    def blocks(self) -> Iterator[tuple[int, int]]:
        step = self.block or max(self.d, 1)
        for start in range(0, self.d, step):
            yield start, min(start + step, self.d)
        if self.d == 0:
            yield 0, 0


class Derived(Columns):
    """Columns computed block by block from another source ``src`` (NNM's mixed updates, bucket
    means, rescaled updates): the same columns and shards, ``reduce`` sums over ``src``'s shards.
    ``max_block`` splits ``src``'s blocks so a read's temporaries stay bounded."""

    max_block: int | None = None

    def __init__(self, src: Columns, n: int):
        self.src, self.n, self.d, self.device = src, n, src.d, src.device

    def blocks(self) -> Iterator[tuple[int, int]]:
        if self.max_block is None:
            yield from self.src.blocks()
            return
        for a, b in self.src.blocks():
            for start in range(a, b, self.max_block):
                yield start, min(start + self.max_block, b)

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        return self.src.reduce(partial)
