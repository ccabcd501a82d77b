"""Pre-aggregators that wrap any rule, like NNM: Bucketing, static Clipping and ARC.

Each transforms the updates (bucket means, or a per-client rescaling) into a new
:class:`~tapestry.aggregators.columns.Columns` source, produced block by block, and hands it to
the inner rule, so they compose with every rule and every source (in memory, compressed, from
files, sharded: the norms are partial sums reduced over shards). A client with a non-finite value
is never rescaled and spoils only its own bucket; the inner rule then rejects it as it rejects any
non-finite update, and ``info.nonfinite`` names the original clients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .base import AggregationInfo, Rule, _numpy_ok, _sub_chunks, bad_rows, check_f, indices, nonfinite_rows, require, row_sq_norms
from .columns import Columns, Derived


def _check_rule(rule, name: str) -> Rule:
    if not isinstance(rule, Rule):
        raise TypeError(f"{name}: rule must be a tapestry rule object (e.g. tp.TrimmedMean(f=2)), got {type(rule).__name__}")
    return rule


def row_norms(src: Columns) -> torch.Tensor:
    """``|x_i|`` of every client, float64 on the CPU (NaN or inf for non-finite clients)."""
    sq = torch.zeros(src.n, dtype=torch.float64, device=src.device)
    for a, b in _sub_chunks(src):
        X = src.read(a, b).to(torch.float32)  # float32 products over a chunk, float64 across chunks
        sq += row_sq_norms(X).to(src.device)
    return src.reduce(sq).cpu().sqrt()


class Scaled(Derived):
    """``scale_i * x_i`` for every client, as float32."""

    max_block = 1 << 16  # bounded temporaries (an in-memory source is one block of every column)

    def __init__(self, src: Columns, scale: torch.Tensor):
        super().__init__(src, src.n)
        self._scale = scale.to(device=src.device, dtype=torch.float32)[:, None]
        self._trivial = bool((scale == 1).all())

    def read(self, start, stop):
        block = self.src.read(start, stop)
        if self._trivial:
            return block
        if _numpy_ok(block):  # one thread (see base._numpy_ok)
            return torch.from_numpy(block.to(torch.float32).numpy() * self._scale.numpy())
        return block.to(torch.float32) * self._scale


class Buckets(Derived):
    """The means of the buckets ``groups`` (lists of client indices) as float32: one float32
    matrix product ``A @ block`` per block (``A`` holds ``1/|bucket|``), as ByzFL's float32 means.
    Where a block holds a non-finite value (``0 * inf`` would spoil other buckets), those buckets
    are recomputed from their own members only."""

    max_block = 1 << 16  # bounded temporaries

    def __init__(self, src: Columns, groups: list[list[int]]):
        super().__init__(src, len(groups))
        A = torch.zeros(len(groups), src.n, dtype=torch.float32)
        for b, g in enumerate(groups):
            A[b, g] = 1.0 / len(g)
        self._A = A.to(src.device)
        self._groups = [torch.tensor(g, dtype=torch.int64, device=src.device) for g in groups]

    def read(self, start, stop):
        block = self.src.read(start, stop).to(torch.float32)
        out = self._A @ block
        bad = bad_rows(out)
        for b in torch.nonzero(bad).flatten().tolist():
            out[b] = block.index_select(0, self._groups[b]).to(torch.float64).mean(0).to(torch.float32)
        return out


def _wrap(info: AggregationInfo, prefix: str, n: int, nonfinite: list[int]) -> AggregationInfo:
    info.rule = f"{prefix}+{info.rule}"
    info.n = n
    info.nonfinite = nonfinite
    return info


class Bucketing(Rule):
    """Bucketing (Karimireddy, He and Jaggi, ICLR 2022), then any rule.

    The clients are shuffled, split into ``floor(n / s)`` buckets of ``s`` (and one last bucket
    of the ``n mod s`` left over, as ByzFL does), and ``rule`` aggregates the bucket means. The
    shuffle comes from a generator seeded with ``seed`` at construction, advanced at every call
    (a rule object used over many rounds draws a new permutation each round, reproducibly);
    ``order`` fixes the permutation instead (to replay another implementation's draw). The inner
    rule sees ``ceil(n / s)`` updates: its requirements apply to that number (with its own ``f``:
    each Byzantine client spoils at most one bucket). ``info.selected`` etc. refer to buckets.
    Needs ``1 <= s <= n``.
    """

    name = "bucketing"

    def __init__(self, s: int, rule: Rule, seed: int = 0, order: Sequence[int] | None = None):
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"bucketing: s must be an int, got {type(s).__name__}")
        require(s >= 1, f"bucketing needs s >= 1, got s={s}")
        self.s, self.rule, self.seed = s, _check_rule(rule, self.name), seed
        self._order = None if order is None else [int(i) for i in order]
        self._gen = torch.Generator().manual_seed(int(seed))

    def permutation(self, n: int) -> list[int]:
        if self._order is not None:
            require(sorted(self._order) == list(range(n)), f"bucketing: order must be a permutation of range({n})")
            return list(self._order)
        return torch.randperm(n, generator=self._gen).tolist()

    def aggregate(self, src, *, want_info, **kwargs):
        n, s = src.n, self.s
        require(s <= n, f"bucketing needs s <= n, got s={s}, n={n} (one bucket would average every client)")
        perm = self.permutation(n)
        groups = [perm[i : i + s] for i in range(0, n, s)]
        try:
            agg, info = self.rule.aggregate(Buckets(src, groups), want_info=want_info, **kwargs)
        except ValueError as exc:
            last = f", the last of {n % s}" if n % s else ""
            raise ValueError(f"bucketing: s={s} turns n={n} clients into {len(groups)} buckets{last}, too few for "
                             f"the inner rule: {exc}") from None
        return agg, _wrap(info, self.name, n, indices(nonfinite_rows(src)) if want_info else [])


class Clipping(Rule):
    """Static clipping, then any rule: every update longer than ``c`` is scaled to norm ``c``
    (ByzFL's ``Clipping``). Needs ``c > 0``. One pass for the norms."""

    name = "clipping"

    def __init__(self, c: float, rule: Rule):
        require(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) and c > 0,
                f"clipping needs c > 0, got c={c}")
        self.c, self.rule = float(c), _check_rule(rule, self.name)

    def aggregate(self, src, *, want_info, **kwargs):
        norms = row_norms(src)
        bad = ~torch.isfinite(norms)
        scale = torch.where(~bad & (norms > self.c), self.c / norms, torch.ones_like(norms))
        agg, info = self.rule.aggregate(Scaled(src, scale), want_info=want_info, **kwargs)
        return agg, _wrap(info, self.name, src.n, indices(bad))


class ARC(Rule):
    """Adaptive Robust Clipping (Allouah et al., 2024), then any rule: the
    ``k = floor(2 f (n - f) / n)`` longest updates are scaled down to the norm of the longest of
    the others (ties in norm to the lowest index; ByzFL's rule). Non-finite clients count as the
    longest (they are never rescaled). Needs ``n > 2f``. One pass for the norms.
    """

    name = "arc"

    def __init__(self, f: int, rule: Rule):
        self.f, self.rule = check_f(f, self.name), _check_rule(rule, self.name)

    def aggregate(self, src, *, want_info, **kwargs):
        n, f = src.n, self.f
        require(n > 2 * f, f"arc needs n > 2f, got n={n}, f={f}")
        norms = row_norms(src)
        bad = ~torch.isfinite(norms)
        k = 2 * f * (n - f) // n
        scale = torch.ones(n, dtype=torch.float64)
        if k > 0:
            order = torch.sort(torch.where(bad, torch.inf, norms), stable=True).indices
            threshold = norms[order[n - k - 1]]
            if bool(torch.isfinite(threshold)):
                top = order[n - k:]
                top = top[~bad[top] & (norms[top] > threshold)]
                scale[top] = threshold / norms[top]
        agg, info = self.rule.aggregate(Scaled(src, scale), want_info=want_info, **kwargs)
        return agg, _wrap(info, self.name, n, indices(bad))


def bucketing(updates, s: int, rule: Rule, seed: int = 0, *, return_info: bool = False):
    """Bucketing with bucket size ``s`` before ``rule``; see :class:`Bucketing`."""
    return Bucketing(s, rule, seed)(updates, return_info=return_info)


def clipping(updates, c: float, rule: Rule, *, return_info: bool = False):
    """Static clipping to norm ``c`` before ``rule``; see :class:`Clipping`."""
    return Clipping(c, rule)(updates, return_info=return_info)


def arc(updates, f: int, rule: Rule, *, return_info: bool = False):
    """Adaptive robust clipping before ``rule``; see :class:`ARC`."""
    return ARC(f, rule)(updates, return_info=return_info)
