"""A compressed payload file (the wire format of :mod:`.wire`) as ``tapestry aggregate`` reads it:
with ``pread``, decoding only the values asked for (:class:`PayloadFile`, beside the other input
formats' readers in :mod:`tapestry.distributed.formats`)."""

from __future__ import annotations

import math
import struct

import torch

from ..input_files import InputError, Key, PreadFile, as_bytes, check_key_text

class PayloadFile(PreadFile):
    """A Tapestry compressed payload (``tapestry.compression`` wire format), read with ``pread``:
    the header and spec are validated by the compression package's parser at open, and each read
    decodes only the requested values (from the enclosing quantisation block) to float32, checking
    the scales and codes it reads (a hostile section is an ``InputError`` naming the file)."""

    reads_bytes = False

    def __init__(self, path: str):
        from . import wire

        size = self._open(path)
        try:
            first = self.pread(min(size, wire.HEADER.size), 0, "the payload header")
            head = self.pread(min(size, wire.head_length(first)), 0, "the payload header")
            try:
                self.p, self.data, self.sizes = wire.parse_head(memoryview(head), size)
                if self.p.codec == "topk":
                    self._check_topk()
            except wire.PayloadError as exc:
                raise InputError(f"{path}: {exc}") from None
        except BaseException:
            self.close()
            raise
        del head
        spec = self.p.spec
        entries = ([("update", spec.shape, spec.dtype)] if spec.form == "tensor"
                   else [(str(k), shape, dt) for k, shape, dt in spec.entries])
        self.keys, self.start = [], {}
        offset = 0
        for name, shape, dt in entries:
            check_key_text(path, name)
            numel = math.prod(shape)
            self.keys.append(Key(name, wire.DTYPES[dt], tuple(shape), numel))
            self.start[name] = offset
            offset += numel
        self.align = self.p.block if self.p.codec in ("int8", "int4") else 2  # decode starts here
        self.bytes_per_value = self.p.nbytes / max(self.p.d, 1)

    def native_dtype(self, key: Key) -> torch.dtype:
        return torch.float32  # what decoding produces; cast once, by the caller, like in memory

    def _tensor(self, offset: int, count: int, dtype: torch.dtype, what: str) -> torch.Tensor:
        t = torch.empty(count, dtype=dtype)
        if count:
            self.pread_into(as_bytes(t), offset, what)
        return t

    def _check_topk(self) -> None:
        """topk indices strictly increasing and < d, streamed 1 MiB at a time."""
        from . import wire

        prev, k = -1, self.p.k
        for i in range(0, k, 1 << 18):
            idx = self._tensor(self.data + 4 * i, min(1 << 18, k - i), torch.int32, "topk indices").to(torch.int64) & 0xFFFFFFFF
            wire.check_indices(idx, self.p.d, prev)
            prev = int(idx[-1])

    def _index(self, j: int) -> int:
        """Position of the first kept index >= j (binary search with 4-byte preads)."""
        lo, hi = 0, self.p.k
        while lo < hi:
            mid = (lo + hi) // 2
            v = struct.unpack("<I", self.pread(4, self.data + 4 * mid, "topk indices"))[0]
            lo, hi = (mid + 1, hi) if v < j else (lo, mid)
        return lo

    def read_into(self, key: Key, start: int, stop: int, out: torch.Tensor) -> int:
        from . import wire
        from .codecs import decode_rows

        p, s, e = self.p, self.start[key.name] + start, self.start[key.name] + stop
        if e <= s:
            return 0
        s0 = s - s % self.align
        piece = wire.Payload(p.codec, e - s0, p.block, 0, p.stochastic, p.spec)
        try:
            if p.codec in ("int8", "int4"):
                b0, b1 = s0 // p.block, -(-e // p.block)
                piece.scales = self._tensor(self.data + 4 * b0, b1 - b0, torch.float32, "scales")
                wire.check_scales(p.codec, piece.scales, b0)
                if p.codec == "int8":
                    piece.values = self._tensor(self.data + self.sizes[0] + s0, e - s0, torch.int8, "codes")
                else:
                    piece.values = self._tensor(self.data + self.sizes[0] + s0 // 2, (e - s0 + 1) // 2, torch.uint8, "codes")
                wire.check_codes(p.codec, piece.values, s0 if p.codec == "int8" else s0 // 2)
            elif p.codec in ("fp16", "bf16"):
                piece.values = self._tensor(self.data + 2 * s0, e - s0, torch.float16 if p.codec == "fp16"
                                            else torch.bfloat16, "values")
            else:
                lo, hi = self._index(s0), self._index(e)
                piece.k = hi - lo
                piece.indices = self._tensor(self.data + 4 * lo, hi - lo, torch.int32, "topk indices").to(torch.int64)
                piece.indices = (piece.indices & 0xFFFFFFFF) - s0
                piece.values = self._tensor(self.data + 4 * p.k + 4 * lo, hi - lo, torch.float32, "topk values")
                wire.check_indices(piece.indices, e - s0)
        except wire.PayloadError as exc:
            raise InputError(f"{self.path}: {exc}") from None
        buf = torch.empty(e - s0, dtype=torch.float32)
        decode_rows([piece], [buf], 0, e - s0)
        out.copy_(buf[s - s0 :])
        return int((stop - start) * self.bytes_per_value)

    def close(self) -> None:
        super().close()
