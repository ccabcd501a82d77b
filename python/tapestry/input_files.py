"""Input files as an attacker may hand them over: regular files only, read with ``pread``, at
most a bounded number open at once, headers parsed one JSON value at a time.

* :func:`open_regular` opens without blocking (a FIFO or a device never hangs the job) and
  refuses anything that is not a regular file.
* :data:`HANDLES` keeps at most :data:`MAX_OPEN` input files open (least recently used closed
  first, reopened on the next read); a reopened file must be the same file (device, inode, size)
  that was validated, else :class:`InputError` ("changed during the run").
* :func:`pread_exact` reads with ``pread``: a file that shrinks while it is read is an
  ``InputError`` naming it, never a ``SIGBUS`` (nothing is memory-mapped).
* :func:`json_object_items` walks a JSON object field by field (``json.JSONDecoder.raw_decode``
  on each value), so a header costs a small multiple of its size, not the ~10-40x of a
  whole-document ``json.loads``; :func:`skip_string_map` checks ``__metadata__`` (an object of
  strings) without keeping any of it.
"""

from __future__ import annotations

import json
import os
import re
import resource
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from collections.abc import Iterator

import torch


class InputError(ValueError):
    """An input file is missing, unreadable, malformed or disagrees with the others."""


def _open_limit() -> int:
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        soft = 1024
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 16
    return max(4, min(256, soft // 4))  # leave most descriptors to torch, gloo and the output


MAX_OPEN = _open_limit()


def open_regular(path: str) -> int:
    """A read-only descriptor of the regular file ``path`` (``InputError`` for anything else)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not an update file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot open ({exc.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a directory" if stat.S_ISDIR(mode) else "special")
        raise InputError(f"{path}: is {kind}, not a regular file; inputs must be regular files")
    return fd


class Handles:
    """At most ``limit`` input files open at once, least recently used closed first."""

    def __init__(self, limit: int):
        self.limit = limit
        self.open: OrderedDict[int, object] = OrderedDict()
        self.lock = threading.Lock()

    def fd(self, f) -> int:
        """``f``'s descriptor (``f`` has ``path``, ``_fd`` and ``_ident``), reopened if needed."""
        with self.lock:
            if f._fd >= 0:
                self.open.move_to_end(id(f))
                return f._fd
            while len(self.open) >= self.limit:
                _, old = self.open.popitem(last=False)
                os.close(old._fd)
                old._fd = -1
            fd = open_regular(f.path)
            st = os.fstat(fd)
            ident = (st.st_dev, st.st_ino, st.st_size)
            if f._ident is None:
                f._ident = ident
            elif ident != f._ident:
                os.close(fd)
                raise InputError(f"{f.path}: changed during the run (replaced or resized since it was validated)")
            f._fd = fd
            self.open[id(f)] = f
            return fd

    def close(self, f) -> None:
        with self.lock:
            if f._fd >= 0:
                self.open.pop(id(f), None)
                os.close(f._fd)
                f._fd = -1


HANDLES = Handles(MAX_OPEN)


class PreadFile:
    """Base of the input readers: a path, a pooled descriptor, exact positional reads."""

    path: str
    _fd: int = -1
    _ident: tuple | None = None

    def _open(self, path: str) -> int:
        self.path, self._fd, self._ident = path, -1, None
        fd = HANDLES.fd(self)
        return os.fstat(fd).st_size

    def pread_into(self, view: memoryview, offset: int, what: str) -> None:
        """Fill the byte view ``view`` from ``offset`` (InputError if the file ends first)."""
        done, want = 0, len(view)
        while done < want:  # pread may return less than asked (and at most ~2 GiB per call)
            got = os.preadv(HANDLES.fd(self), [view[done:want]], offset + done)
            if got == 0:
                raise InputError(f"{self.path}: file ended while reading {what} (truncated after opening?)")
            done += got

    def pread(self, nbytes: int, offset: int, what: str) -> bytearray:
        buf = bytearray(nbytes)
        if nbytes:
            self.pread_into(memoryview(buf), offset, what)
        return buf

    def close(self) -> None:
        HANDLES.close(self)


_WS = re.compile(r"[ \t\n\r]*")


class JSONWalker:
    """One JSON text read value by value; errors are ``fail(why)`` (which must raise)."""

    def __init__(self, text: str, fail):
        self.text, self.fail, self.pos = text, fail, 0
        self.dec = json.JSONDecoder()

    def ws(self) -> str:
        self.pos = _WS.match(self.text, self.pos).end()
        return self.text[self.pos : self.pos + 1]

    def expect(self, chars: str) -> str:
        c = self.ws()
        if not c or c not in chars:
            self.fail(f"header is not a valid JSON object (expected {' or '.join(map(repr, chars))} at character {self.pos})")
        self.pos += 1
        return c

    def value(self):
        self.ws()
        try:
            v, self.pos = self.dec.raw_decode(self.text, self.pos)
        except (ValueError, RecursionError) as exc:
            self.fail(f"header is not UTF-8 JSON ({type(exc).__name__}: {str(exc)[:80]})")
        return v

    def string(self) -> str:
        if self.ws() != '"':
            self.fail(f"header is not a valid JSON object (expected a string at character {self.pos})")
        return self.value()


def json_object_items(w: JSONWalker, *, raw_keys: tuple[str, ...] = ()) -> Iterator[tuple[str, object]]:
    """``(key, value)`` of the JSON object at ``w``; for a key in ``raw_keys`` the value is left
    unread (the caller reads it from ``w``) and ``None`` is yielded. The caller checks for
    duplicate keys (it keeps a mapping anyway; a second set would cost ~50 bytes a key)."""
    if w.ws() != "{":
        w.fail("header is a JSON value that is not an object")
    w.expect("{")
    if w.ws() == "}":
        w.pos += 1
        return
    while True:
        key = w.string()
        w.expect(":")
        yield key, (None if key in raw_keys else w.value())
        if w.expect(",}") == "}":
            return


def skip_string_map(w: JSONWalker, what: str) -> None:
    """Check that the value at ``w`` is an object of strings, keeping none of it."""
    if w.ws() != "{":
        w.fail(f"{what} must be a JSON object of strings")
    w.expect("{")
    if w.ws() == "}":
        w.pos += 1
        return
    while True:
        w.string()
        w.expect(":")
        if w.ws() != '"':
            w.fail(f"{what} values must be strings")
        w.value()
        if w.expect(",}") == "}":
            return


def check_key_text(path: str, name: str) -> None:
    """Tensor names are written to the output header: they must encode as UTF-8 (a ``\\ud800``
    escape decodes to a lone surrogate, which safetensors itself refuses to read back)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{path}: key {name[:60]!r} is not valid Unicode (a lone surrogate escape); "
                         f"it could not be written to the output") from None


@dataclass(frozen=True, slots=True)
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


def as_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous tensor (works for bfloat16, which NumPy lacks)."""
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(bytearray(0))
