"""Fused decode-and-aggregate: rules read ``n`` compressed payloads without ``n`` dense updates.

:class:`Compressed` is a :class:`~tapestry.aggregators.columns.Columns` source over the parsed
payloads, so every rule (mean, trimmed mean, median, Krum, Bulyan, ...) aggregates them unchanged:

* over int8/int4/fp16/bf16 payloads (one codec and block size for all), the ops behind the rules
  (weighted means, trimmed mean, median, Bulyan's coordinate stage, the Gram matrix behind Krum,
  Multi-Krum, Bulyan and NNM) run the ``*_encoded`` kernels: a tile of every payload is decoded
  into cache inside the op, one parallel pass over the payloads, no decoded block in memory;
* everything else (distances to a point, topk or mixed payloads) reads blocks of columns decoded
  into one reused float32 buffer of ``n * cols * 4`` bytes (16 MiB default).

Peak extra memory is therefore the ``(d,)`` result plus at most that buffer, never ``n`` dense
float32 updates. Per-coordinate results and Krum-family selections equal aggregating the decoded
updates bit for bit; the iterative rules and NNM agree with it to float64 rounding (some of their
sums are taken block by block).
"""

from __future__ import annotations

import inspect
import threading
from math import gcd
from typing import Any
from collections.abc import Iterator

import torch

from .. import _pages, ops
from ..aggregators import RULES, Rule, make_rule
from ..aggregators.columns import Columns
from .codecs import decode_rows, unflatten
from .wire import Payload, PayloadError, parse

_local = threading.local()  # the decode buffer of this thread's Compressed sources
FUSED_OPS = ("weighted_mean", "trimmed_mean", "coord_median", "mean_around_median", "gram")
FUSED_CODECS = ("int8", "int4", "fp16", "bf16")
DEFAULT_BLOCK_BYTES = 16 << 20  # n=32: 131072 columns a block; few blocks, few OpenMP wake-ups (slow on VMs)
MAX_ALIGN = 4096  # the largest quantisation block
RETAIN_BYTES = DEFAULT_BLOCK_BYTES  # a decode buffer kept for the next call is at most this large


def _lcm(a: int, b: int) -> int:
    return a * b // gcd(a, b)


class Compressed(Columns):
    """``n`` parsed payloads of the same ``d`` and spec, decoded block by block on read.

    ``read(start, stop)`` returns a view of a per-thread buffer that the next ``read`` in this
    thread overwrites (rules consume each block before reading the next); the buffer outlives the
    call, so that aggregating round after round does not fault in fresh pages each time (they cost
    as much as the decoding on some VMs). ``blocks()`` yields column ranges aligned to every
    payload's quantisation block, ``block_bytes`` of decoded float32 per range at most.
    """

    def __init__(self, payloads: list[Payload], block_bytes: int = DEFAULT_BLOCK_BYTES):
        if not payloads:
            raise ValueError("no payloads to aggregate")
        self.payloads = payloads
        self.n, self.d = len(payloads), payloads[0].d
        self.device = torch.device("cpu")
        align = 2
        for p in payloads:
            if p.block:
                align = _lcm(align, p.block)
        # payloads of different block sizes: their common multiple can reach 2^24 columns (n dense
        # updates in the buffer); read at any even column instead, decode_rows handles the rest
        self.align = align = align if align <= MAX_ALIGN else 2
        cols = max(align, (block_bytes // (4 * self.n)) // align * align)
        self.cols = cols
        self._rows: dict = {}

    def _buffer(self, width: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        buf = getattr(_local, "buf", None)
        if buf is None or buf.numel() < self.n * width:
            buf = _local.buf = _pages.empty(self.n * width)
        key = (width, buf.data_ptr())
        if key not in self._rows:  # row views, reused while the width repeats (every full block)
            out = buf[: self.n * width].view(self.n, width)
            self._rows = {key: (out, list(out.unbind(0)))}
        return self._rows[key]

    def read(self, start: int, stop: int) -> torch.Tensor:
        a = start - start % self.align  # decode from an aligned start, return the requested view
        out, rows = self._buffer(stop - a)
        if stop > a:
            decode_rows(self.payloads, rows, a, stop)
        return out[:, start - a :]

    def fused(self, op: str):
        """The ops of FUSED_OPS on int8/int4/fp16/bf16 payloads (one codec and block for all): a
        kernel that decodes a tile at a time inside the op, where a backend other than the
        reference (which would materialise every row) has one."""
        kinds = {(p.codec, p.block) for p in self.payloads}
        if op not in FUSED_OPS or len(kinds) != 1:
            return None
        codec, block = kinds.pop()
        if codec not in FUSED_CODECS:
            return None
        qs, scales = [p.values for p in self.payloads], [p.scales for p in self.payloads]
        try:
            name, fn = ops.resolve(op + "_encoded", self.device, (qs, scales, codec, block, self.d))
        except ops.BackendError:
            return None
        if name == "reference":
            return None
        return lambda *args: (fn(qs, scales, codec, block, self.d, *args), name)

    def blocks(self) -> Iterator[tuple[int, int]]:
        for start in range(0, self.d, self.cols):
            yield start, min(start + self.cols, self.d)
        if self.d == 0:
            yield 0, 0


def release_buffer(keep: int = RETAIN_BYTES) -> None:
    """Free this thread's decode buffer if it is larger than ``keep`` bytes (a call with many
    clients or a large ``block_bytes`` must not leave its buffer behind)."""
    buf = getattr(_local, "buf", None)
    if buf is not None and buf.numel() * 4 > keep:
        _local.buf = None


def open_payloads(payloads: list, *, max_values: int | None = None) -> list[Payload]:
    """Parse and cross-check payloads: same ``d`` and spec as payload 0 (PayloadError naming the client)."""
    if isinstance(payloads, (bytes, bytearray, memoryview)) or not hasattr(payloads, "__len__"):
        raise TypeError(f"payloads must be a list of payloads, got {type(payloads).__name__}")
    parsed = []
    for i, raw in enumerate(payloads):
        try:
            p = parse(raw, max_values=max_values)
        except PayloadError as exc:
            raise PayloadError(f"client {i}: {exc}") from None
        if parsed:
            p0 = parsed[0]
            if p.d != p0.d:
                raise PayloadError(f"client {i}: payload holds d={p.d} values, client 0 has d={p0.d}")
            if p.spec != p0.spec:
                raise PayloadError(f"client {i}: {_spec_difference(p.spec, p0.spec)}")
        parsed.append(p)
    return parsed


def _spec_difference(s, s0) -> str:
    if s.form != s0.form:
        return f"form {s.form!r}, client 0 has {s0.form!r}"
    for e, e0 in zip(s.entries, s0.entries):
        if e[0] != e0[0]:
            return f"key {e[0]!r} where client 0 has {e0[0]!r}"
        if e[1] != e0[1]:
            return f"key {e[0]!r}: shape {e[1]}, client 0 has {e0[1]}"
        if e[2] != e0[2]:
            return f"key {e[0]!r}: dtype {e[2]}, client 0 has {e0[2]}"
    if len(s.entries) != len(s0.entries):
        return f"{len(s.entries)} entries, client 0 has {len(s0.entries)}"
    return f"shape/dtype {s.shape} {s.dtype}, client 0 has {s0.shape} {s0.dtype}"


def aggregate(payloads: list, rule: Rule | str, *, return_info: bool = False, block_bytes: int = DEFAULT_BLOCK_BYTES,
              max_values: int | None = None, **kwargs) -> Any:
    """Aggregate ``n`` compressed payloads with ``rule`` without materialising ``n`` dense updates.

    ``rule`` is a tapestry rule object (``tp.TrimmedMean(f=2)``) or a rule name with its
    parameters in ``kwargs`` (``aggregate(payloads, "trimmed_mean", f=2)``); call-time keyword
    arguments of the rule (``weights=`` for mean) go in ``kwargs`` too. The result has the form
    the payloads describe (tensor shape, or parameter set), cast to the update's dtype.
    """
    if isinstance(rule, str):  # constructor parameters to the rule, the rest to its call
        cls_params = {}
        base = RULES.get(rule.split("+")[-1])
        if base is not None:
            names = set(inspect.signature(base.__init__).parameters)
            cls_params = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        rule = make_rule(rule, **cls_params)
    if not isinstance(rule, Rule):
        raise TypeError(f"rule must be a tapestry rule object or name, got {type(rule).__name__}")
    parsed = open_payloads(payloads, max_values=max_values)
    src = Compressed(parsed, block_bytes)
    try:
        agg, info = rule.aggregate(src, want_info=return_info, **kwargs)
    finally:
        release_buffer()
    out = unflatten(agg, parsed[0].spec)
    return (out, info) if return_info else out
