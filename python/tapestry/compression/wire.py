"""The wire format: a self-describing, versioned byte payload (docs/wire-format.md).

Layout (all integers little-endian)::

    offset  size  field
    0       4     magic  b"TPZC"
    4       2     version (1)
    6       1     codec: 1 fp16, 2 bf16, 3 int8, 4 int4, 5 topk
    7       1     flags: bit 0 = stochastic rounding was used (informational); other bits 0
    8       8     d: number of values (< 2^32)
    16      4     block: values per scale (int8/int4: even, 2..4096; else 0)
    20      4     spec_len: bytes of the JSON spec that follows the header
    24      8     k: kept values (topk: 1..d; else 0)
    32      4     CRC-32 of bytes 0..31 followed by the spec
    36      4     reserved (0)
    40      ...   spec: UTF-8 JSON (form, names, shapes, dtypes), then zero padding to a multiple of 8
    ...     ...   data, by codec:
                    fp16/bf16: d x uint16
                    int8:      ceil(d/block) x float32 scales, then d x int8
                    int4:      ceil(d/block) x float32 scales, then ceil(d/2) packed bytes
                    topk:      k x uint32 strictly increasing indices, then k x float32 values

:func:`parse` checks every field against the payload's real length before anything is allocated;
the payload's total length must be exactly what the header implies. Data bytes are not covered by
the checksum (integrity of the values is the transport's job); a corrupted value byte decodes to
another value of the same codec, never to an out-of-bounds read.
"""

from __future__ import annotations

import json
import math
import re
import struct
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import _pages

MAGIC = b"TPZC"
VERSION = 1
HEADER = struct.Struct("<4sHBBQIIQII")
assert HEADER.size == 40
CODECS = {"fp16": 1, "bf16": 2, "int8": 3, "int4": 4, "topk": 5}
CODEC_NAMES = {v: k for k, v in CODECS.items()}
FLAG_STOCHASTIC = 1
MAX_D = 2**32 - 1          # element indices and topk indices are uint32
MAX_BLOCK = 4096
MAX_SPEC = 1 << 24         # 16 MiB of JSON is far more than any model's names and shapes
MAX_NDIM = 32
# Each entry decodes to a tensor object (~600 bytes of Python and torch): a payload may list
# MAX_ENTRIES entries, plus one per ENTRY_BYTES of its size, so that decoding stays under 4x its size + 64 MiB
MAX_ENTRIES = 1 << 16
ENTRY_BYTES = 160
TOPK_MAX_EXPANSION = 1 << 16  # a topk payload may describe at most 65536 values per kept value
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FORMS = ("tensor", "state_dict", "arrays")


class PayloadError(ValueError):
    """A payload that is not a valid tapestry compression payload (truncated, corrupted, wrongly
    versioned, inconsistent or hostile). The one exception type :func:`decode` raises for bad bytes."""


@dataclass(frozen=True)
class Spec:
    """What the flat ``(d,)`` vector of a payload is: one tensor (``shape``, ``dtype``) or a
    parameter set (``entries`` of ``(key, shape, dtype)``), NumPy or torch."""

    form: str
    numpy: bool
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    entries: tuple[tuple[Any, tuple[int, ...], str], ...] = ()

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {"form": self.form, "numpy": self.numpy}
        if self.form == "tensor":
            doc["shape"], doc["dtype"] = list(self.shape), self.dtype
        else:
            doc["entries"] = [[k, list(s), dt] for k, s, dt in self.entries]
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass
class Payload:
    """A parsed, validated payload: header fields and zero-copy views of the data sections."""

    codec: str
    d: int
    block: int
    k: int
    stochastic: bool
    spec: Spec
    scales: torch.Tensor | None = None   # float32 (ceil(d/block),) for int8/int4
    values: torch.Tensor | None = None   # int8 (d,), uint8 (ceil(d/2),), fp16/bf16 (d,), topk float32 (k,)
    indices: torch.Tensor | None = None  # topk: int64 (k,)
    nbytes: int = 0


def data_sizes(codec: str, d: int, block: int, k: int) -> list[int]:
    """Byte sizes of the data sections of a payload (see the module docstring)."""
    if codec in ("fp16", "bf16"):
        return [2 * d]
    if codec in ("int8", "int4"):
        nb = -(-d // block)
        return [4 * nb, d if codec == "int8" else (d + 1) // 2]
    return [4 * k, 4 * k]


def _pad8(n: int) -> int:
    return -n % 8


def _head(codec: str, d: int, block: int, k: int, stochastic: bool, spec: Spec) -> bytes:
    """The header and the padded spec of a payload."""
    spec_bytes = spec.to_json()
    head = HEADER.pack(MAGIC, VERSION, CODECS[codec], FLAG_STOCHASTIC if stochastic else 0, d, block,
                       len(spec_bytes), k, 0, 0)
    crc = zlib.crc32(spec_bytes, zlib.crc32(head[:32]))
    return head[:32] + struct.pack("<II", crc, 0) + spec_bytes + bytes(_pad8(len(spec_bytes)))


def payload_nbytes(codec: str, d: int, block: int, k: int, spec: Spec) -> int:
    """The exact length of a payload with these header fields and spec."""
    return len(_head(codec, d, block, k, False, spec)) + sum(data_sizes(codec, d, block, k))


def allocate(codec: str, d: int, block: int, k: int, stochastic: bool, spec: Spec,
             out: torch.Tensor | None = None) -> tuple[bytes | torch.Tensor, list[torch.Tensor]]:
    """A payload with its header and spec written and its data sections left for the caller to
    fill: ``(payload, [writable uint8 tensor over each data section, in wire order])``.

    Encoders write their output straight into the payload this way (no second copy). The bytes
    object is new and nobody else holds it until the caller returns it, which is how CPython's own
    C code fills a bytes object; it must not be written to after that. With ``out`` (a contiguous
    uint8 CPU tensor at least :func:`payload_nbytes` long) the payload is written into its first
    bytes instead, and ``payload`` is that slice of ``out``."""
    head = _head(codec, d, block, k, stochastic, spec)
    sizes = data_sizes(codec, d, block, k)
    if out is None:
        payload = _pages.empty_bytes(len(head) + sum(sizes))
        with warnings.catch_warnings():  # a writable view of the new bytes object (see above)
            warnings.simplefilter("ignore")
            view = torch.frombuffer(payload, dtype=torch.uint8)
    else:
        if not (out.dtype == torch.uint8 and out.device.type == "cpu" and out.dim() == 1 and out.is_contiguous()
                and out.numel() >= len(head) + sum(sizes) and out.data_ptr() % 8 == 0):
            raise ValueError(f"out must be a contiguous, 8-byte aligned 1-D uint8 CPU tensor of at least "
                             f"{len(head) + sum(sizes)} bytes, got {tuple(out.shape)} {out.dtype} on {out.device}")
        payload = view = out[: len(head) + sum(sizes)]
    view[: len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
    return payload, list(view[len(head) :].split(sizes))


def build(codec: str, d: int, block: int, k: int, stochastic: bool, spec: Spec, sections: list[np.ndarray]) -> bytes:
    """Assemble a payload from its data sections (arrays, in wire order)."""
    payload, views = allocate(codec, d, block, k, stochastic, spec)
    for view, section in zip(views, sections):
        if view.numel():
            view.copy_(torch.from_numpy(np.ascontiguousarray(section).reshape(-1).view(np.uint8)))
    return payload


def _err(msg: str) -> PayloadError:
    return PayloadError(f"invalid payload: {msg}")


def _view(buf: memoryview, offset: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """A zero-copy, read-only-in-spirit tensor over ``count`` items of ``buf`` at ``offset``."""
    if count == 0:
        return torch.empty(0, dtype=dtype)
    with warnings.catch_warnings():  # bytes are immutable; we never write through these views
        warnings.simplefilter("ignore")
        return torch.frombuffer(buf, dtype=dtype, count=count, offset=offset)


class Entries(Sequence):
    """The entries of a parsed spec, stored compactly: a decoded entry ``(key, shape, dtype)`` is
    made on access. A hostile spec of many tiny entries then costs a few bytes per JSON byte
    (one str per state_dict key, one pointer per shape, one byte per dtype), not one tuple, list
    and str object per field (about 40 times the JSON). Compares equal to the tuple of its entries."""

    __slots__ = ("_keys", "_shapes", "_dtypes")

    def __init__(self, keys: list[str] | None, shapes: list[tuple[int, ...]], dtypes: bytearray):
        self._keys, self._shapes, self._dtypes = keys, shapes, dtypes  # keys None: arrays, keys 0..n-1

    def __len__(self) -> int:
        return len(self._shapes)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(self[j] for j in range(*i.indices(len(self))))
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return (i if self._keys is None else self._keys[i], self._shapes[i], _DTYPE_ORDER[self._dtypes[i]])

    def __eq__(self, other) -> bool:
        if isinstance(other, Entries):
            return (self._keys == other._keys and self._shapes == other._shapes and self._dtypes == other._dtypes)
        if isinstance(other, (tuple, list)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"Entries({len(self)} entries)"


_DTYPE_ORDER = tuple(DTYPES)
_DTYPE_CODE = {name: i for i, name in enumerate(_DTYPE_ORDER)}
_WS = re.compile(r"[ \t\n\r]*")


def _shape_of(value, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_NDIM:
        raise _err(f"{where}: shape must be a list of at most {MAX_NDIM} sizes")
    if not all(type(s) is int and 0 <= s <= MAX_D for s in value):
        raise _err(f"{where}: shape sizes must be integers in [0, {MAX_D}]")
    # torch computes strides from the non-zero sizes even for an empty tensor: bound them too
    if math.prod(s for s in value if s) > MAX_D:
        raise _err(f"{where}: shape {value[:8]} has non-zero sizes whose product exceeds {MAX_D}")
    return tuple(value)


def _dtype_of(value, where: str) -> str:
    if not (isinstance(value, str) and value in _DTYPE_CODE):
        raise _err(f"{where}: dtype {str(value)[:20]!r} is not one of {sorted(DTYPES)}")
    return _DTYPE_ORDER[_DTYPE_CODE[value]]


def _parse_spec(raw: memoryview, d: int, size: int = 0) -> Spec:
    """The spec, parsed one JSON value at a time: the top-level object field by field and the
    ``entries`` array entry by entry, so that memory stays a small multiple of the spec's bytes."""
    try:
        text = str(raw, "utf-8")
    except UnicodeDecodeError as exc:
        raise _err(f"spec is not valid UTF-8 JSON ({str(exc)[:80]})") from None
    dec = json.JSONDecoder()

    def value_at(pos: int):
        try:
            return dec.raw_decode(text, pos)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, too many digits, nesting
            raise _err(f"spec is not valid UTF-8 JSON ({type(exc).__name__}: {str(exc)[:80]})") from None

    def expect(pos: int, chars: str) -> tuple[str, int]:
        pos = _WS.match(text, pos).end()
        if pos >= len(text) or text[pos] not in chars:
            raise _err(f"spec is not valid UTF-8 JSON (expected {' or '.join(map(repr, chars))} at character {pos})")
        return text[pos], pos + 1

    max_entries = MAX_ENTRIES + size // ENTRY_BYTES
    doc: dict = {}
    if text[_WS.match(text, 0).end():][:1] != "{":
        raise _err("spec is not valid UTF-8 JSON for a spec: it must be a JSON object")
    _, pos = expect(0, "{")
    keys: list | None = None
    shapes: list = []
    dtypes = bytearray()
    shape_cache: dict = {}
    total = 0
    c = text[_WS.match(text, pos).end():][:1]
    if c != "}":
        while True:
            _, pos = expect(pos, '"')
            name, pos = value_at(pos - 1)
            if name in doc:
                raise _err(f"spec field {name[:40]!r} appears twice")
            _, pos = expect(pos, ":")
            pos = _WS.match(text, pos).end()
            if name != "entries":
                doc[name], pos = value_at(pos)
            else:  # one entry at a time, converted to the compact form at once
                doc[name] = None
                _, pos = expect(pos, "[")
                keys = []
                if text[_WS.match(text, pos).end():][:1] == "]":
                    _, pos = expect(pos, "]")
                else:
                    while True:
                        e, pos = value_at(_WS.match(text, pos).end())
                        i = len(shapes)
                        if i >= max_entries:
                            raise _err(f"spec lists more than {max_entries} entries, the limit for a {size}-byte "
                                       f"payload ({MAX_ENTRIES} + one per {ENTRY_BYTES} bytes)")
                        if not (isinstance(e, list) and len(e) == 3):
                            raise _err(f"spec entry {i} must be [key, shape, dtype]")
                        shape = _shape_of(e[1], f"spec entry {i}")
                        shapes.append(shape_cache.setdefault(shape, shape))
                        dtypes.append(_DTYPE_CODE[_dtype_of(e[2], f"spec entry {i}")])
                        keys.append(e[0])
                        total += math.prod(shape)
                        if total > d:
                            raise _err(f"spec entries hold more than the header's d={d} values")
                        sep, pos = expect(pos, ",]")
                        if sep == "]":
                            break
            sep, pos = expect(pos, ",}")
            if sep == "}":
                break
    else:
        _, pos = expect(pos, "}")
    if _WS.match(text, pos).end() != len(text):
        raise _err("spec has bytes after its JSON object")
    form, numpy_flag = doc.get("form"), doc.get("numpy")
    if not isinstance(form, str) or form not in FORMS:
        raise _err(f"spec form {str(form)[:40]!r} is not one of {FORMS}")
    if not isinstance(numpy_flag, bool):
        raise _err("spec field 'numpy' must be true or false")
    if form == "tensor":
        shape = _shape_of(doc.get("shape"), "spec")
        if math.prod(shape) != d:
            raise _err(f"spec shape {shape[:8]} holds {math.prod(shape)} values, header says d={d}")
        return Spec(form, numpy_flag, shape, _dtype_of(doc.get("dtype"), "spec"))
    if keys is None:
        raise _err("spec of a parameter set needs a list of entries")
    if form == "arrays":
        for i, key in enumerate(keys):
            if type(key) is not int or key != i:
                raise _err(f"spec entry {i}: array entries must be numbered 0, 1, ...")
        keys = None  # implicit: 0 .. n-1
    else:
        for i, key in enumerate(keys):
            if not isinstance(key, str):
                raise _err(f"spec entry {i}: state_dict keys must be strings")
            try:
                key.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate from a \\ud800 escape
                raise _err(f"spec entry {i}: key {key[:40]!r} is not valid Unicode (lone surrogate)") from None
        ordered = sorted(keys)  # duplicates, found without a set (a set costs ~50 bytes a key)
        for a, b in zip(ordered, ordered[1:]):
            if a == b:
                raise _err(f"spec entry {keys.index(a, keys.index(a) + 1)}: duplicate key {a[:40]!r}")
        del ordered
    if total != d:
        raise _err(f"spec entries hold {total} values, header says d={d}")
    return Spec(form, numpy_flag, entries=Entries(keys, shapes, dtypes))


def parse_head(buf: memoryview, size: int, *, max_values: int | None = None) -> tuple[Payload, int, list[int]]:
    """Validate a payload's header and spec: ``buf`` holds at least its first :func:`head_length`
    bytes (all of them, or more), ``size`` is the payload's total length. Returns the payload
    without its data sections, the offset where they start and their sizes; checks that ``size``
    is exactly what the header implies. Nothing is allocated before these checks pass."""
    if size < HEADER.size or buf.nbytes < HEADER.size:
        raise _err(f"truncated: {size} bytes, the header alone needs {HEADER.size}")
    magic, version, codec_id, flags, d, block, spec_len, k, crc, reserved = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise _err(f"bad magic {bytes(magic)!r} (expected {MAGIC!r}): not a tapestry compression payload")
    if version != VERSION:
        raise _err(f"unsupported wire-format version {version} (this build reads version {VERSION})")
    if spec_len > min(size - HEADER.size, MAX_SPEC):
        raise _err(f"spec length {spec_len} exceeds the {min(size - HEADER.size, MAX_SPEC)} bytes allowed "
                   f"after the header")
    pad = _pad8(spec_len)
    start = HEADER.size + spec_len + pad
    if buf.nbytes < min(start, size):
        raise _err(f"truncated: the spec needs {start} bytes, got {buf.nbytes}")
    spec_raw = buf[HEADER.size : HEADER.size + spec_len]
    if zlib.crc32(spec_raw, zlib.crc32(buf[:32])) != crc:
        raise _err("header checksum mismatch: the header or spec is corrupted")
    if reserved != 0:
        raise _err(f"reserved header field is {reserved}, must be 0")
    if codec_id not in CODEC_NAMES:
        raise _err(f"unknown codec id {codec_id} (known: {CODECS})")
    codec = CODEC_NAMES[codec_id]
    if flags & ~FLAG_STOCHASTIC:
        raise _err(f"unknown flag bits {flags:#x}")
    if d > MAX_D:
        raise _err(f"d={d} exceeds the format's limit of {MAX_D} values")
    if max_values is not None and d > max_values:
        raise _err(f"d={d} exceeds the caller's limit max_values={max_values}")
    if codec in ("int8", "int4"):
        if not (2 <= block <= MAX_BLOCK and block % 2 == 0):
            raise _err(f"{codec} block size {block} must be even and in [2, {MAX_BLOCK}]")
    elif block != 0:
        raise _err(f"{codec} payload has block size {block}, must be 0")
    if codec == "topk":
        if not (1 <= k <= d if d else k == 0):
            raise _err(f"topk k={k} must be in [1, d={d}]")
        if d > TOPK_MAX_EXPANSION * max(k, 1):
            raise _err(f"topk payload describes d={d} values with only k={k} kept (more than {TOPK_MAX_EXPANSION}x)")
    elif k != 0:
        raise _err(f"{codec} payload has k={k}, must be 0")
    sizes = data_sizes(codec, d, block, k)
    expected = start + sum(sizes)
    if size != expected:
        raise _err(f"length mismatch: header implies {expected} bytes, payload has {size}"
                   + (" (truncated)" if size < expected else " (trailing bytes)"))
    if any(buf[HEADER.size + spec_len : start]):
        raise _err("spec padding bytes must be zero")
    spec = _parse_spec(spec_raw, d, size)
    return Payload(codec, d, block, k, bool(flags & FLAG_STOCHASTIC), spec, nbytes=size), start, sizes


def head_length(first: bytes | memoryview) -> int:
    """How many bytes :func:`parse_head` needs, from the payload's first 40 bytes (or fewer: then
    40, and parse_head names what is wrong). A reader of a file reads that many, then the rest."""
    if len(first) < HEADER.size:
        return HEADER.size
    spec_len = struct.unpack_from("<I", first, 20)[0]
    return HEADER.size + min(spec_len, MAX_SPEC) + _pad8(min(spec_len, MAX_SPEC))


CHECK_CHUNK = 1 << 20
_F32_MAX = float(torch.finfo(torch.float32).max)
MAX_SCALE = {"int8": _F32_MAX / 127, "int4": _F32_MAX / 7}  # absmax / 127 (7) of the largest float32


def check_scales(codec: str, scales: torch.Tensor, first_block: int = 0) -> None:
    """int8/int4 scales must be finite, non-negative and at most absmax/127 (absmax/7) of the
    largest float32, as an encoder writes them: no code then decodes to an infinity (PayloadError
    naming the block)."""
    limit = MAX_SCALE[codec]
    bad = ~(scales >= 0) | (scales > limit)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise _err(f"{codec} scale of block {first_block + i} is {float(scales[i])} (must be in [0, {limit:.6g}])")


def check_codes(codec: str, codes: torch.Tensor, first_byte: int = 0) -> None:
    """int8 codes lie in [-127, 127] and int4 codes in [-7, 7] (docs/wire-format.md): a code of
    -128 or -8 would decode to a value beyond the block's absmax. Checked 1 MiB at a time (NumPy:
    several GB/s, no payload-sized temporary)."""
    if codec not in ("int8", "int4") or codes.numel() == 0:
        return
    a = codes.numpy().view(np.int8 if codec == "int8" else np.uint8)
    tmp = np.empty(min(CHECK_CHUNK, a.size), np.uint8)
    for i in range(0, a.size, CHECK_CHUNK):
        c = a[i : i + CHECK_CHUNK]
        if codec == "int8":
            if int(c.min()) == -128:
                j = i + int(np.argmax(c == -128))
                raise _err(f"int8 code of value {first_byte + j} is -128 (codes lie in [-127, 127])")
            continue
        low = tmp[: c.size]
        np.bitwise_and(c, 15, out=low)
        if int(low.min()) == 0 or int(c.min()) < 16:  # nibble 0 is code -8
            j = int(np.argmax((low == 0) | (c < 16)))
            v = 2 * (first_byte + i + j) + (0 if low[j] == 0 else 1)
            raise _err(f"int4 code of value {v} is -8 (codes lie in [-7, 7])")


def check_indices(idx64: torch.Tensor, d: int, prev: int = -1) -> None:
    """topk indices strictly increasing and < d (``prev``: the index before this piece)."""
    k = idx64.numel()
    if k and (int(idx64[0]) <= prev or int(idx64[-1]) >= d
              or (k > 1 and not bool((idx64[1:] > idx64[:-1]).all()))):
        raise _err(f"topk indices must be strictly increasing and < d={d}")


def parse(payload: bytes | bytearray | memoryview, *, max_values: int | None = None) -> Payload:
    """Validate ``payload`` completely and return zero-copy views of its sections.

    Raises :class:`PayloadError` naming the first problem. ``max_values`` optionally caps ``d``
    (the number of float32 values a decode would allocate)."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"payload must be bytes, bytearray or memoryview, got {type(payload).__name__}")
    buf = memoryview(payload)
    if not buf.c_contiguous:
        raise TypeError("payload memoryview must be contiguous")
    if buf.ndim != 1 or buf.itemsize != 1:
        buf = buf.cast("B")
    p, start, sizes = parse_head(buf, buf.nbytes, max_values=max_values)
    d, k, codec = p.d, p.k, p.codec
    if codec in ("fp16", "bf16"):
        p.values = _view(buf, start, d, torch.float16 if codec == "fp16" else torch.bfloat16)
    elif codec in ("int8", "int4"):
        p.scales = _view(buf, start, sizes[0] // 4, torch.float32)
        check_scales(codec, p.scales)
        p.values = _view(buf, start + sizes[0], sizes[1], torch.int8 if codec == "int8" else torch.uint8)
        check_codes(codec, p.values)
    else:
        idx = _view(buf, start, k, torch.int32)
        p.values = _view(buf, start + 4 * k, k, torch.float32)
        p.indices = idx.to(torch.int64) & 0xFFFFFFFF  # uint32 on the wire
        check_indices(p.indices, d)
    return p
