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
import struct
import warnings
import zlib
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


def _parse_spec(raw: memoryview, d: int) -> Spec:
    try:
        doc = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _err(f"spec is not valid UTF-8 JSON ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not isinstance(doc, dict):
        raise _err("spec must be a JSON object")
    form, numpy_flag = doc.get("form"), doc.get("numpy")
    if form not in FORMS:
        raise _err(f"spec form {str(form)[:40]!r} is not one of {FORMS}")
    if not isinstance(numpy_flag, bool):
        raise _err("spec field 'numpy' must be true or false")

    def shape_of(value, where: str) -> tuple[int, ...]:
        if not isinstance(value, list) or len(value) > MAX_NDIM:
            raise _err(f"{where}: shape must be a list of at most {MAX_NDIM} sizes")
        if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_D for s in value):
            raise _err(f"{where}: shape sizes must be integers in [0, {MAX_D}]")
        return tuple(value)

    def dtype_of(value, where: str) -> str:
        if value not in DTYPES:
            raise _err(f"{where}: dtype {str(value)[:20]!r} is not one of {sorted(DTYPES)}")
        return value

    if form == "tensor":
        shape = shape_of(doc.get("shape"), "spec")
        if math.prod(shape) != d:
            raise _err(f"spec shape {shape[:8]} holds {math.prod(shape)} values, header says d={d}")
        return Spec(form, numpy_flag, shape, dtype_of(doc.get("dtype"), "spec"))
    entries = doc.get("entries")
    if not isinstance(entries, list):
        raise _err("spec of a parameter set needs a list of entries")
    out, total, seen = [], 0, set()
    for i, e in enumerate(entries):
        if not (isinstance(e, list) and len(e) == 3):
            raise _err(f"spec entry {i} must be [key, shape, dtype]")
        key = e[0]
        if form == "state_dict" and not isinstance(key, str):
            raise _err(f"spec entry {i}: state_dict keys must be strings")
        if form == "arrays" and key != i:
            raise _err(f"spec entry {i}: array entries must be numbered 0, 1, ...")
        if key in seen:
            raise _err(f"spec entry {i}: duplicate key {str(key)[:40]!r}")
        seen.add(key)
        shape = shape_of(e[1], f"spec entry {i}")
        total += math.prod(shape)
        if total > d:
            raise _err(f"spec entries hold more than the header's d={d} values")
        out.append((key, shape, dtype_of(e[2], f"spec entry {i}")))
    if total != d:
        raise _err(f"spec entries hold {total} values, header says d={d}")
    return Spec(form, numpy_flag, entries=tuple(out))


def parse(payload: bytes | bytearray | memoryview, *, max_values: int | None = None) -> Payload:
    """Validate ``payload`` completely and return zero-copy views of its sections.

    Raises :class:`PayloadError` naming the first problem. ``max_values`` optionally caps ``d``
    (the number of float32 values a decode would allocate)."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"payload must be bytes, bytearray or memoryview, got {type(payload).__name__}")
    buf = memoryview(payload)
    if buf.ndim != 1 or buf.itemsize != 1:
        buf = buf.cast("B")
    if not buf.c_contiguous:
        raise TypeError("payload memoryview must be contiguous")
    size = buf.nbytes
    if size < HEADER.size:
        raise _err(f"truncated: {size} bytes, the header alone needs {HEADER.size}")
    magic, version, codec_id, flags, d, block, spec_len, k, crc, reserved = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise _err(f"bad magic {bytes(magic)!r} (expected {MAGIC!r}): not a tapestry compression payload")
    if version != VERSION:
        raise _err(f"unsupported wire-format version {version} (this build reads version {VERSION})")
    if spec_len > min(size - HEADER.size, MAX_SPEC):
        raise _err(f"spec length {spec_len} exceeds the {size - HEADER.size} bytes after the header")
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
    pad = _pad8(spec_len)
    sizes = data_sizes(codec, d, block, k)
    start = HEADER.size + spec_len + pad
    expected = start + sum(sizes)
    if size != expected:
        raise _err(f"length mismatch: header implies {expected} bytes, payload has {size}"
                   + (" (truncated)" if size < expected else " (trailing bytes)"))
    if any(buf[HEADER.size + spec_len : start]):
        raise _err("spec padding bytes must be zero")
    spec = _parse_spec(spec_raw, d)

    p = Payload(codec, d, block, k, bool(flags & FLAG_STOCHASTIC), spec, nbytes=size)
    if codec in ("fp16", "bf16"):
        p.values = _view(buf, start, d, torch.float16 if codec == "fp16" else torch.bfloat16)
    elif codec in ("int8", "int4"):
        nb = sizes[0] // 4
        p.scales = _view(buf, start, nb, torch.float32)
        if not bool(torch.isfinite(p.scales).all()) or bool((p.scales < 0).any()):
            bad = int(torch.nonzero(~torch.isfinite(p.scales) | (p.scales < 0))[0])
            raise _err(f"{codec} scale of block {bad} is {float(p.scales[bad])} (must be finite and >= 0)")
        p.values = _view(buf, start + sizes[0], sizes[1], torch.int8 if codec == "int8" else torch.uint8)
    else:
        idx = _view(buf, start, k, torch.int32)
        p.values = _view(buf, start + 4 * k, k, torch.float32)
        idx64 = idx.to(torch.int64) & 0xFFFFFFFF  # uint32 on the wire
        if k and (int(idx64[-1]) >= d or (k > 1 and not bool((idx64[1:] > idx64[:-1]).all()))):
            raise _err(f"topk indices must be strictly increasing and < d={d}")
        p.indices = idx64
    return p
