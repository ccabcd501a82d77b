"""Client update files, read piece by piece, and the aggregate file, written piece by piece.

Inputs:

* ``.safetensors``: the header is parsed here with strict checks (header length within the file,
  JSON object without duplicate keys, known dtypes, offsets inside the data area, sizes matching
  the shapes, no overlaps), then values are read with ``pread`` straight into the caller's block
  buffer: only the requested bytes are read, from the page cache when cached, and no file page
  stays mapped into the process (a memory map would count every touched page in its resident set).
* ``.pt``/``.pth``: ``torch.load(weights_only=True, mmap=True)`` of a flat ``{name: tensor}`` mapping,
  only to learn where each (contiguous) tensor's bytes lie in the archive; then read like safetensors.
  Before it runs, every archive entry must be stored uncompressed (as ``torch.save`` writes them)
  and the pickle's opcodes are counted: what unpickling may allocate is bounded by the file's size
  plus ``PICKLE_SLACK`` (a few KB of deflated or repetitive pickle could otherwise ask for GBs).
* Tapestry compressed payloads (``tapestry.compression.encode`` bytes saved to a file): header and
  spec validated at open, values read with ``pread`` and decoded block by block
  (:class:`PayloadFile`), aggregated in float32 as ``tapestry.compression.aggregate`` does.

Hostile inputs (see :mod:`tapestry.input_files`): only regular files are opened (a FIFO
never blocks), nothing is memory-mapped while reading (a file that shrinks is an ``InputError``,
not a ``SIGBUS``), at most ``files.MAX_OPEN`` inputs are open at once, headers are parsed one
JSON value at a time (memory a small multiple of the header), and every key must be valid
Unicode (it is written to the output).

Every file is checked against the first: same names, shapes and dtypes, else a ``ValueError``
naming the file and the key. Only floating dtypes (F64, F32, F16, BF16) can be aggregated.

The output is a safetensors file: the header is written first, the data area preallocated, and each
rank writes its coordinates at their offsets (``pwrite``); the temporary file is renamed over the
output only when every rank succeeded (see :mod:`tapestry.distributed.job`).
"""

from __future__ import annotations

import json
import math
import os
import pickletools
import re
import struct
import zipfile
from bisect import bisect_right
from dataclasses import dataclass
from collections.abc import Sequence

import torch

from ..compression.payload_file import PayloadFile
from ..compression.wire import MAGIC as PAYLOAD_MAGIC
from ..updates import KERNEL_DTYPES
from ..input_files import (InputError, JSONWalker, Key, PreadFile, as_bytes, check_key_text, json_object_items, open_regular,
                    skip_string_map)

# safetensors dtype names <-> torch dtypes (floating types only: those are what rules aggregate)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
KNOWN_NONFLOAT = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F8_E4M3", "F8_E5M2", "F8_E8M0",
                  "F4", "F6_E2M3", "F6_E3M2", "C64"}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


class _TensorFile(PreadFile):
    """Named tensors at byte offsets of a file (``self.begin``), read with ``pread``."""

    reads_bytes = True  # read_into also takes a writable byte memoryview

    def _fail(self, why: str):
        raise InputError(f"{self.path}: not a valid {self.kind} file: {why}")

    def native_dtype(self, key: Key) -> torch.dtype:
        return key.dtype

    def read_into(self, key: Key, start: int, stop: int, out: torch.Tensor | memoryview) -> int:
        """Values ``start:stop`` of ``key`` (flattened) into the contiguous 1-D ``out`` (same dtype),
        or into the byte view ``out``."""
        view = out if isinstance(out, memoryview) else as_bytes(out)
        begin = self.begin[key.name]  # this file's own offset: files of one layout may differ in layout
        want = (stop - start) * key.itemsize
        self.pread_into(view[:want], begin + start * key.itemsize, f"key {key.name!r}")
        return want


class SafetensorsFile(_TensorFile):
    """A safetensors file opened for reading pieces of its tensors."""

    kind = "safetensors"

    def _not_an_object(self, text: str):
        """Say what a header that is not a JSON object is (parsed whole only when small)."""
        if len(text) <= 1 << 20:
            try:
                doc = json.loads(text)
            except json.JSONDecodeError as exc:
                self._fail(f"header is not UTF-8 JSON ({exc})")
            except RecursionError:
                self._fail("header JSON is nested too deeply")
            self._fail(f"header is a JSON {type(doc).__name__}, not an object")
        self._fail("header is not a JSON object")

    def __init__(self, path: str):
        size = self._open(path)
        try:
            self.keys = self._parse(size)
        except BaseException:
            self.close()
            raise

    def _parse(self, size: int) -> list[Key]:
        head = self.pread(min(8, size), 0, "the header length")
        if len(head) < 8:
            self._fail(f"{size} bytes, shorter than the 8-byte header length")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > MAX_HEADER:
            self._fail(f"header length {hlen} exceeds the {MAX_HEADER}-byte limit")
        if 8 + hlen > size:
            self._fail(f"header length {hlen} runs past the end of the {size}-byte file")
        try:
            text = self.pread(hlen, 8, "the header").decode("utf-8")
        except UnicodeDecodeError as exc:
            self._fail(f"header is not UTF-8 JSON ({exc})")
        data_start, data_size = 8 + hlen, size - 8 - hlen
        keys, self.begin, shapes = [], {}, {}
        w = JSONWalker(text, self._fail)
        if w.ws() != "{":
            self._not_an_object(text)
        for name, entry in json_object_items(w, raw_keys=("__metadata__",)):
            if name == "__metadata__":
                skip_string_map(w, "__metadata__")
                continue
            check_key_text(self.path, name)
            if name in self.begin:
                self._fail(f"key {name[:60]!r} appears twice in the header")
            if not isinstance(entry, dict) or set(entry) - {"dtype", "shape", "data_offsets"} or len(entry) != 3:
                self._fail(f"key {name!r}: entry must hold exactly dtype, shape and data_offsets")
            dtype, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not isinstance(shape, list) or not all(type(x) is int and x >= 0 for x in shape):
                self._fail(f"key {name!r}: shape {str(shape)[:80]} is not a list of non-negative integers")
            if (not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)
                    or not 0 <= offs[0] <= offs[1] <= data_size):
                self._fail(f"key {name!r}: data_offsets {str(offs)[:80]} outside the {data_size}-byte data area")
            if not isinstance(dtype, str) or dtype not in DTYPES:
                if dtype in KNOWN_NONFLOAT:
                    raise TypeError(f"{self.path}: key {name!r} has dtype {dtype}; only floating tensors "
                                    f"({', '.join(DTYPES)}) can be aggregated")
                self._fail(f"key {name!r}: unknown dtype {str(dtype)[:20]!r}")
            numel = math.prod(shape)
            key = Key(name, DTYPES[dtype], shapes.setdefault(tuple(shape), tuple(shape)), numel, data_start + offs[0])
            if offs[1] - offs[0] != numel * key.itemsize:
                self._fail(f"key {name!r}: {offs[1] - offs[0]} bytes for shape {shape} of {dtype} "
                           f"({numel * key.itemsize} expected)")
            keys.append(key)
            self.begin[name] = key.begin
        if w.ws():
            self._fail("header has bytes after its JSON object")
        del text, w
        keys.sort(key=lambda k: k.begin)  # layout order: a pass over the coordinates reads forwards
        for k0, k1 in zip(keys, keys[1:]):
            if k1.begin < k0.begin + k0.numel * k0.itemsize:
                self._fail(f"keys {k0.name!r} and {k1.name!r} overlap (bytes {k0.begin - data_start}-"
                           f"{k0.begin - data_start + k0.numel * k0.itemsize} and {k1.begin - data_start}-...)")
        return keys


_RECORD = re.compile(r"[^/]+/data/[^/]+")
_PICKLE = re.compile(r"[^/]+/data\.pkl")
# The most the weights-only unpickler allocates for one opcode (an empty dict or list object, a memo
# entry, a pointer on the stack), besides the bytes a string argument copies; and the allowance
# beyond the file's size for the objects of a .pt file's pickle.
PICKLE_BYTES_PER_OP = 160
PICKLE_SLACK = 32 << 20
# zipfile keeps ~12 bytes per byte of central directory (a ZipInfo per >= 46-byte entry): at most
# 4 MiB of it (some 60,000 entries; torch.save writes one per storage).
MAX_ZIP_DIRECTORY = 4 << 20


class TorchFile(_TensorFile):
    """A ``.pt`` file of a flat ``{name: tensor}`` mapping (``weights_only=True``). The file is
    loaded memory-mapped only to learn each tensor's dtype, shape and byte offset inside the zip
    archive (its storage records are stored uncompressed); the mapping is dropped at once and
    values are read with ``pread`` like a safetensors file. Tensors must be contiguous: a view
    with zero or other strides (``expand``) would take far more memory than the file's bytes."""

    kind = ".pt"

    def __init__(self, path: str):
        size = self._open(path)
        try:
            self.keys, self.begin = self._parse(size)
        except BaseException:
            self.close()
            raise

    def _records(self, size: int) -> dict[int, int]:
        """Each data record's ``{data offset: size}`` in the archive, once every entry is known to be
        stored uncompressed and the pickle to unpickle within the file's size + ``PICKLE_SLACK``."""
        try:
            with open(self.path, "rb") as fp:  # the directory size ZipFile is about to read (private helper)
                end = zipfile._EndRecData(fp)
        except OSError as exc:
            self._fail(f"cannot read ({exc.strerror})")
        if end is None:
            self._fail("not a zip archive (no end-of-directory record)")
        if end[zipfile._ECD_SIZE] > MAX_ZIP_DIRECTORY:
            self._fail(f"its zip directory is {end[zipfile._ECD_SIZE]} bytes (at most {MAX_ZIP_DIRECTORY} for a .pt "
                       "input); save the update as safetensors")
        try:
            with zipfile.ZipFile(self.path) as zf:
                infos = zf.infolist()
                packed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED]
                pickles = [i for i in infos if _PICKLE.fullmatch(i.filename)]
                pickle = zf.read(pickles[0]) if len(pickles) == 1 and not packed else b""
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            self._fail(f"not a zip archive ({exc})")
        if packed:
            self._fail(f"entry {packed[0]!r} is compressed; torch.save stores every entry uncompressed")
        if len(pickles) != 1:
            self._fail(f"expected one <archive>/data.pkl entry, found {len(pickles)}")
        self._check_pickle(pickle, size)
        records = {}
        for info in infos:
            if not _RECORD.fullmatch(info.filename):
                continue
            local = self.pread(30, info.header_offset, "a zip entry") if info.header_offset + 30 <= size else b""
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                self._fail(f"record {info.filename!r}: bad local zip header")
            n_name, n_extra = struct.unpack_from("<HH", local, 26)
            start = info.header_offset + 30 + n_name + n_extra
            if start + info.file_size > size:
                self._fail(f"record {info.filename!r} runs past the end of the file")
            if info.file_size:
                records[start] = info.file_size
        return records

    def _check_pickle(self, pickle: bytes, size: int) -> None:
        """Refuse a pickle whose opcodes could allocate more than ``size + PICKLE_SLACK`` bytes."""
        limit, cost = size + PICKLE_SLACK, 0
        ops = pickletools.genops(pickle)
        while cost <= limit:
            try:
                _, arg, _ = next(ops)
            except StopIteration:
                return
            except (ValueError, EOFError) as exc:
                self._fail(f"data.pkl is not a pickle ({exc})")
            cost += PICKLE_BYTES_PER_OP + (len(arg) if isinstance(arg, (str, bytes)) else 0)
        self._fail(f"its pickle (data.pkl, {len(pickle)} bytes) may allocate more than {limit >> 20} MiB (the "
                   f"file's size + {PICKLE_SLACK >> 20} MiB) to unpickle; save the update as safetensors")

    def _parse(self, size: int) -> tuple[list[Key], dict[str, int]]:
        records = self._records(size)
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # pickle errors, refused globals, not a zip archive...
            raise InputError(f"{self.path}: not a loadable .pt file with weights_only=True "
                             f"({type(exc).__name__}: {str(exc)[:200]})") from None
        if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            raise InputError(f"{self.path}: expected a flat {{name: tensor}} mapping (a state_dict), got {type(obj).__name__}")
        storages = {}
        keys, begin = [], {}
        for name, t in obj.items():
            check_key_text(self.path, name)
            if t.dtype not in DTYPE_NAMES:
                raise TypeError(f"{self.path}: key {name!r} has dtype {t.dtype}; only floating tensors "
                                f"({', '.join(map(str, DTYPE_NAMES))}) can be aggregated")
            if t.numel() and not t.is_contiguous():
                raise InputError(f"{self.path}: key {name!r} is not contiguous (shape {list(t.shape)}, stride "
                                 f"{list(t.stride())}): save it with .contiguous(); a strided or expanded view "
                                 f"would be materialised outside the memory budget")
            st = t.untyped_storage()
            nbytes = t.numel() * t.element_size()
            if t.numel():
                if t.storage_offset() * t.element_size() + nbytes > st.nbytes():
                    self._fail(f"key {name!r} reaches past the end of its storage")
                storages[st.data_ptr()] = st.nbytes()
            keys.append((name, t.dtype, tuple(t.shape), t.numel(), t.data_ptr() if t.numel() else None))
        del obj
        # the mapping's base: storages and records in the same order, at the same distances
        ptrs, offs = sorted(storages), sorted(records)
        if len(ptrs) > len(offs) or (ptrs and any(storages[q] > records.get(q - ptrs[0] + offs[0], -1) for q in ptrs)):
            self._fail("its storages do not match its data records (an unusual torch.save layout)")
        base = ptrs[0] - offs[0] if ptrs else 0
        out = []
        for name, dtype, shape, numel, ptr in keys:
            key = Key(name, dtype, shape, numel, 0 if ptr is None else ptr - base)
            out.append(key)
            begin[name] = key.begin
        return out, begin


def open_input(path: str):
    """Open one client file by its format (sniffed from its first bytes, not from its name)."""
    fd = open_regular(path)
    try:
        magic = os.pread(fd, 8, 0)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    finally:
        os.close(fd)
    if magic[:4] == b"PK\x03\x04":  # torch.save's zip archive
        return TorchFile(path)
    if magic.startswith(PAYLOAD_MAGIC):
        return PayloadFile(path)
    return SafetensorsFile(path)


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
            view, off = as_bytes(part), self.starts[i] + a * key.itemsize
            done = 0
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], off + done)

    def close(self, sync: bool = True) -> None:
        if self.fd >= 0:
            if sync:
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
