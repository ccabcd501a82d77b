"""Client update files, read piece by piece, and the aggregate file, written piece by piece.

Inputs:

* ``.safetensors``: the header is parsed here with strict checks (header length within the file,
  JSON object without duplicate keys, known dtypes, offsets inside the data area, sizes matching
  the shapes, no overlaps), then values are read with ``pread`` straight into the caller's block
  buffer: only the requested bytes are read, from the page cache when cached, and no file page
  stays mapped into the process (a memory map would count every touched page in its resident set).
* ``.pt``/``.pth``: ``torch.load(weights_only=True, mmap=True)`` of a flat ``{name: tensor}`` mapping.
* Tapestry compressed payloads (``tapestry.compression.encode`` bytes saved to a file):
  memory-mapped and decoded block by block (:class:`PayloadFile`), aggregated in float32 as
  ``tapestry.compression.aggregate`` does.

Every file is checked against the first: same names, shapes and dtypes, else a ``ValueError``
naming the file and the key. Only floating dtypes (F64, F32, F16, BF16) can be aggregated.

The output is a safetensors file: the header is written first, the data area preallocated, and each
rank writes its coordinates at their offsets (``pwrite``); the temporary file is renamed over the
output only when every rank succeeded (see :mod:`tapestry.distributed.stream`).
"""

from __future__ import annotations

import json
import os
import struct
from bisect import bisect_right
from dataclasses import dataclass
from typing import Sequence

import torch

from ..updates import KERNEL_DTYPES

# safetensors dtype names <-> torch dtypes (floating types only: those are what rules aggregate)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
KNOWN_NONFLOAT = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F8_E4M3", "F8_E5M2", "F8_E8M0",
                  "F4", "F6_E2M3", "F6_E3M2", "C64"}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


class InputError(ValueError):
    """An input file is missing, unreadable, malformed or disagrees with the others."""


@dataclass(frozen=True)
class Key:
    """One named tensor of a client file; ``begin`` is its absolute byte offset in the file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    numel: int
    begin: int = 0

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize


def _as_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous tensor (works for bfloat16, which NumPy lacks)."""
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(bytearray(0))


class SafetensorsFile:
    """A safetensors file opened for reading pieces of its tensors."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise InputError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise InputError(f"{path}: is a directory, not a safetensors file") from None
        except OSError as exc:
            raise InputError(f"{path}: cannot open ({exc.strerror})") from None
        try:
            self.keys = self._parse()
            self.begin = {k.name: k.begin for k in self.keys}
        except BaseException:
            os.close(self.fd)
            raise

    def _fail(self, why: str):
        raise InputError(f"{self.path}: not a valid safetensors file: {why}")

    def _parse(self) -> list[Key]:
        size = os.fstat(self.fd).st_size
        head = os.pread(self.fd, 8, 0)
        if len(head) < 8:
            self._fail(f"{size} bytes, shorter than the 8-byte header length")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > MAX_HEADER:
            self._fail(f"header length {hlen} exceeds the {MAX_HEADER}-byte limit")
        if 8 + hlen > size:
            self._fail(f"header length {hlen} runs past the end of the {size}-byte file")
        raw = os.pread(self.fd, hlen, 8)
        if len(raw) != hlen:
            self._fail("file shrank while reading its header")

        def no_duplicates(pairs):
            seen = {}
            for k, v in pairs:
                if k in seen:
                    self._fail(f"key {k!r} appears twice in the header")
                seen[k] = v
            return seen

        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self._fail(f"header is not UTF-8 JSON ({exc})")
        except RecursionError:
            self._fail("header JSON is nested too deeply")
        if not isinstance(header, dict):
            self._fail(f"header is a JSON {type(header).__name__}, not an object")
        data_start, data_size = 8 + hlen, size - 8 - hlen
        keys, spans = [], []
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(entry, dict) or set(entry) - {"dtype", "shape", "data_offsets"} or len(entry) != 3:
                self._fail(f"key {name!r}: entry must hold exactly dtype, shape and data_offsets")
            dtype, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
                self._fail(f"key {name!r}: shape {shape!r} is not a list of non-negative integers")
            if (not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)
                    or not 0 <= offs[0] <= offs[1] <= data_size):
                self._fail(f"key {name!r}: data_offsets {offs!r} outside the {data_size}-byte data area")
            if dtype not in DTYPES:
                if dtype in KNOWN_NONFLOAT:
                    raise TypeError(f"{self.path}: key {name!r} has dtype {dtype}; only floating tensors "
                                    f"({', '.join(DTYPES)}) can be aggregated")
                self._fail(f"key {name!r}: unknown dtype {dtype!r}")
            numel = 1
            for s in shape:
                numel *= s
            key = Key(name, DTYPES[dtype], tuple(shape), numel, data_start + offs[0])
            if offs[1] - offs[0] != numel * key.itemsize:
                self._fail(f"key {name!r}: {offs[1] - offs[0]} bytes for shape {shape} of {dtype} "
                           f"({numel * key.itemsize} expected)")
            keys.append(key)
            spans.append((offs[0], offs[1], name))
        spans.sort()
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                self._fail(f"keys {n0!r} and {n1!r} overlap (bytes {b0}-{e0} and {b1}-{e1})")
        keys.sort(key=lambda k: k.begin)  # layout order: a pass over the coordinates reads forwards
        return keys

    def native_dtype(self, key: Key) -> torch.dtype:
        return key.dtype

    reads_bytes = True  # read_into also takes a writable byte memoryview

    def read_into(self, key: Key, start: int, stop: int, out: torch.Tensor | memoryview) -> int:
        """Values ``start:stop`` of ``key`` (flattened) into the contiguous 1-D ``out`` (same dtype),
        or into the byte view ``out``."""
        view = out if isinstance(out, memoryview) else _as_bytes(out)
        begin = self.begin[key.name]  # this file's own offset: files of one layout may differ in layout
        offset, done, want = begin + start * key.itemsize, 0, (stop - start) * key.itemsize
        while done < want:  # pread may return less than asked (and at most ~2 GiB per call)
            got = os.preadv(self.fd, [view[done:want]], offset + done)
            if got == 0:
                raise InputError(f"{self.path}: file ended while reading key {key.name!r} (truncated after opening?)")
            done += got
        return want

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class TorchFile:
    """A ``.pt`` file of a flat ``{name: tensor}`` mapping, loaded with ``weights_only=True`` and
    memory-mapped (``mmap=True``), so tensors are read from the file on demand."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.exists(path):
            raise InputError(f"{path}: no such file")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # pickle errors, refused globals, not a zip archive...
            raise InputError(f"{path}: not a loadable .pt file with weights_only=True ({type(exc).__name__}: {exc})") from None
        if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            raise InputError(f"{path}: expected a flat {{name: tensor}} mapping (a state_dict), got {type(obj).__name__}")
        self.tensors, self.keys = {}, []
        for name, t in obj.items():
            if t.dtype not in DTYPE_NAMES:
                raise TypeError(f"{path}: key {name!r} has dtype {t.dtype}; only floating tensors "
                                f"({', '.join(map(str, DTYPE_NAMES))}) can be aggregated")
            self.tensors[name] = t.reshape(-1)  # a view for the contiguous tensors state_dicts hold
            self.keys.append(Key(name, t.dtype, tuple(t.shape), t.numel()))

    reads_bytes = False

    def native_dtype(self, key: Key) -> torch.dtype:
        return key.dtype

    def read_into(self, key: Key, start: int, stop: int, out: torch.Tensor) -> int:
        out.copy_(self.tensors[key.name][start:stop])
        return (stop - start) * key.itemsize

    def close(self) -> None:
        self.tensors = {}


class PayloadFile:
    """A Tapestry compressed payload (``tapestry.compression`` wire format), memory-mapped: the
    header and spec are validated by the compression package's parser, and each read decodes
    only the requested values (from the enclosing quantisation block) to float32. Pages touched
    are released from this process after every read, so a pass does not grow the resident set."""

    def __init__(self, path: str):
        import mmap

        from ..compression.wire import DTYPES as WIRE_DTYPES
        from ..compression.wire import PayloadError, parse

        self.path = path
        with open(path, "rb") as fh:
            try:
                self.mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # an empty file cannot be mapped
                raise InputError(f"{path}: empty file") from None
        try:
            self.p = parse(memoryview(self.mm))
        except PayloadError as exc:
            self.close()
            raise InputError(f"{path}: {exc}") from None
        spec = self.p.spec
        entries = ([("update", spec.shape, spec.dtype)] if spec.form == "tensor"
                   else [(str(k), shape, dt) for k, shape, dt in spec.entries])
        self.keys, self.start = [], {}
        offset = 0
        for name, shape, dt in entries:
            numel = 1
            for x in shape:
                numel *= x
            self.keys.append(Key(name, WIRE_DTYPES[dt], tuple(shape), numel))
            self.start[name] = offset
            offset += numel
        self.align = self.p.block if self.p.codec in ("int8", "int4") else 2  # decode starts here
        self.bytes_per_value = self.p.nbytes / max(self.p.d, 1)

    reads_bytes = False

    def native_dtype(self, key: Key) -> torch.dtype:
        return torch.float32  # what decoding produces; cast once, by the caller, like in memory

    def read_into(self, key: Key, start: int, stop: int, out: torch.Tensor) -> int:
        from ..compression.codecs import decode_rows

        s, e = self.start[key.name] + start, self.start[key.name] + stop
        s0 = s - s % self.align
        buf = torch.empty(e - s0, dtype=torch.float32)
        if e > s0:
            decode_rows([self.p], [buf], s0, e)
        out.copy_(buf[s - s0 :])
        try:
            self.mm.madvise(__import__("mmap").MADV_DONTNEED)  # drop the mapped pages (page cache keeps them)
        except (AttributeError, OSError):
            pass
        return int((stop - start) * self.bytes_per_value)

    def close(self) -> None:
        self.p = None
        try:
            self.mm.close()
        except BufferError:  # views still alive: the mapping closes when they are collected
            pass


def open_input(path: str):
    """Open one client file by its format (sniffed from its first bytes, not from its name)."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(8)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not an update file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot open ({exc.strerror})") from None
    if magic[:4] == b"PK\x03\x04":  # torch.save's zip archive
        return TorchFile(path)
    payload_magic = _compression_magic()
    if payload_magic and magic.startswith(payload_magic):
        return PayloadFile(path)
    return SafetensorsFile(path)


def _compression_magic() -> bytes | None:
    try:
        from ..compression.wire import MAGIC
    except ImportError:  # a build without tapestry.compression
        return None
    return MAGIC


@dataclass(frozen=True)
class Layout:
    """The flattened coordinate space of every client: keys in the first file's layout order."""

    keys: tuple[Key, ...]
    offsets: tuple[int, ...]  # offsets[i] = first coordinate of keys[i]; offsets[-1] = d
    decoded: bool = False  # some input is a compressed payload: values are decoded to float32

    @property
    def d(self) -> int:
        return self.offsets[-1]

    @property
    def stack_dtype(self) -> torch.dtype:
        """The dtype blocks are read in: the files' own when every key shares one kernel dtype,
        else float32 (the rule :func:`tapestry.updates.as_matrix` applies to parameter sets)."""
        dtypes = {k.dtype for k in self.keys}
        if self.decoded:
            return torch.float32
        if len(dtypes) == 1 and next(iter(dtypes)) in KERNEL_DTYPES:
            return next(iter(dtypes))
        return torch.float32

    def pieces(self, start: int, stop: int):
        """``(key index, key start, key stop, column offset)`` covering coordinates ``start:stop``."""
        i = bisect_right(self.offsets, start) - 1
        while start < stop:
            while self.offsets[i + 1] <= start:  # skip empty keys
                i += 1
            end = min(stop, self.offsets[i + 1])
            yield i, start - self.offsets[i], end - self.offsets[i], start
            start = end

    def signature(self) -> tuple:
        return tuple((k.name, str(k.dtype), k.shape) for k in self.keys)


def check_layouts(files: Sequence) -> Layout:
    """The common layout of ``files``; a ``ValueError`` naming the file and key that differ."""
    if not files:
        raise InputError("no input files")
    first = files[0]
    ref = {k.name: k for k in first.keys}
    for f in files[1:]:
        have = {k.name: k for k in f.keys}
        for name, k in ref.items():
            other = have.get(name)
            if other is None:
                raise InputError(f"{f.path}: key {name!r} is missing (present in {first.path})")
            if other.shape != k.shape:
                raise InputError(f"{f.path}: key {name!r} has shape {list(other.shape)}, {first.path} has {list(k.shape)}")
            if other.dtype != k.dtype:
                raise InputError(f"{f.path}: key {name!r} has dtype {DTYPE_NAMES[other.dtype]}, "
                                 f"{first.path} has {DTYPE_NAMES[k.dtype]}")
        extra = [name for name in have if name not in ref]
        if extra:
            raise InputError(f"{f.path}: key {extra[0]!r} is not in {first.path}"
                             + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    offsets, total = [0], 0
    for k in first.keys:
        total += k.numel
        offsets.append(total)
    return Layout(tuple(first.keys), tuple(offsets), any(isinstance(f, PayloadFile) for f in files))


def write_header(path: str, layout: Layout, metadata: dict[str, str]) -> tuple[int, list[int]]:
    """Create ``path`` as a safetensors file of ``layout``'s keys (contiguous, in layout order),
    data area preallocated (sparse); return the data start and each key's absolute byte offset."""
    header, begin = {}, 0
    for k in layout.keys:
        size = k.numel * k.itemsize
        header[k.name] = {"dtype": DTYPE_NAMES[k.dtype], "shape": list(k.shape), "data_offsets": [begin, begin + size]}
        begin += size
    header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data area 8-byte aligned, as the safetensors writer does
    data_start = 8 + len(raw)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, struct.pack("<Q", len(raw)) + raw)
        os.ftruncate(fd, data_start + begin)
    finally:
        os.close(fd)
    starts, pos = [], data_start
    for k in layout.keys:
        starts.append(pos)
        pos += k.numel * k.itemsize
    return data_start, starts


class OutputWriter:
    """Writes aggregated coordinates into a preallocated output file, cast to each key's dtype."""

    def __init__(self, path: str, layout: Layout, key_starts: list[int]):
        self.layout, self.starts = layout, key_starts
        self.fd = os.open(path, os.O_WRONLY)

    def write(self, start: int, values: torch.Tensor) -> None:
        """Coordinates ``start : start + len(values)`` of the flattened space (float32 values)."""
        values = values.detach().cpu()
        for i, a, b, col in self.layout.pieces(start, start + values.numel()):
            key = self.layout.keys[i]
            part = values[col - start : col - start + b - a].to(key.dtype).contiguous()
            view, off = _as_bytes(part), self.starts[i] + a * key.itemsize
            done = 0
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], off + done)

    def close(self, sync: bool = True) -> None:
        if self.fd >= 0:
            if sync:
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
