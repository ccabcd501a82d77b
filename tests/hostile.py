"""Helpers for the hostile-input tests: hand-built payloads and a child process's peak memory."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


def with_spec(payload: bytes, spec: bytes | dict, data: bytes | None = None) -> bytes:
    """``payload`` (a valid one) with its spec replaced (and optionally its data), CRC fixed."""
    from tapestry.compression.wire import HEADER, _pad8

    spec_len = struct.unpack_from("<I", payload, 20)[0]
    old_data = payload[HEADER.size + spec_len + _pad8(spec_len):]
    raw = spec if isinstance(spec, bytes) else json.dumps(spec, separators=(",", ":")).encode()
    head = bytearray(payload[:HEADER.size])
    struct.pack_into("<I", head, 20, len(raw))
    struct.pack_into("<I", head, 32, zlib.crc32(raw, zlib.crc32(bytes(head[:32]))))
    return bytes(head) + raw + bytes(_pad8(len(raw))) + (old_data if data is None else data)


def with_d(payload: bytes, d: int) -> bytes:
    head = bytearray(payload)
    struct.pack_into("<Q", head, 8, d)
    return with_spec(bytes(head), payload[40:40 + struct.unpack_from("<I", payload, 20)[0]])


def peak_growth(setup: str, hostile: str, timeout: float = 120) -> dict:
    """Run ``setup`` then ``hostile`` in a fresh Python; return the peak resident set growth
    (bytes) that ``hostile`` caused over the peak after ``setup``, what it raised, and its output.
    ``hostile`` may set ``result``; any exception it raises is reported by type and message."""
    code = textwrap.dedent('''
        import json, resource, sys
        def peak():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ''') + textwrap.dedent(setup) + textwrap.dedent('''
        base = peak()
        result, error = None, None
        try:
    ''') + textwrap.indent(textwrap.dedent(hostile), "    ") + textwrap.dedent('''
        except BaseException as exc:
            error = [type(exc).__name__, str(exc)[:300]]
        print(json.dumps({"growth": peak() - base, "base": base, "error": error, "result": result}))
    ''')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "python"), ROOT]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"child died (status {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])
