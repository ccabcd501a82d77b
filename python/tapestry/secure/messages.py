"""Protocol messages as bytes, without pickle: any transport (Flower, gRPC, files) can carry them.

Layout (little-endian)::

    magic "TPSA" | version u8 | kind u8 | reserved u16 (0) | round u64 | sender u32 | recipient u32
    | header length u32 | blob count u32 | header (UTF-8 JSON object) | blob lengths (u64 each) | blobs

Byte strings in the fields are stored as blobs and referenced from the JSON as ``{"$b": i}``.
:func:`parse` checks every length against the real size before it slices, and every field
against the schema of the message's kind; anything else raises :class:`ProtocolError`.
Server-to-client messages use sender ``SERVER``. Blobs of at least :data:`ZERO_COPY` bytes come back
from :func:`parse` as read-only memoryviews into the message (the masked input: no copy).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

from .crypto import ProtocolError

MAGIC = b"TPSA"
VERSION = 1
SERVER = 0xFFFFFFFF
_HEAD = struct.Struct("<4sBBHQIIII")
ZERO_COPY = 1 << 20

# kind -> (name, {field: type}); type is int, bytes, "ints" or "blobs"
KINDS: dict[int, tuple[str, dict]] = {
    1: ("advertise", {"c_pk": bytes, "s_pk": bytes}),
    2: ("roster", {"ids": "ints", "population": "ints", "c_pks": "blobs", "s_pks": "blobs", "threshold": int, "neighbours": int,
                   "graph_seed": int, "bits": int, "d": int}),
    3: ("shares", {"to": "ints", "boxes": "blobs"}),
    4: ("forward", {"active": "ints", "frm": "ints", "boxes": "blobs"}),
    5: ("masked", {"bits": int, "data": bytes}),
    6: ("unmask_request", {"survivors": "ints", "dropped": "ints"}),
    7: ("unmask_response", {"self_ids": "ints", "self_shares": "blobs", "pair_ids": "ints", "pair_shares": "blobs"}),
}
KIND_OF = {name: k for k, (name, _) in KINDS.items()}


@dataclass
class Message:
    kind: str
    round_id: int
    sender: int
    recipient: int
    fields: dict = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        blobs: list[bytes] = []

        def enc(v):
            if isinstance(v, (bytes, bytearray, memoryview)):
                blobs.append(v)  # joined once below, without an intermediate copy
                return {"$b": len(blobs) - 1}
            if isinstance(v, (list, tuple)):
                return [enc(x) for x in v]
            return int(v)

        _check_fields(self.kind, self.fields, lambda v: v)
        header = json.dumps({k: enc(v) for k, v in self.fields.items()}, separators=(",", ":")).encode()
        return b"".join([
            _HEAD.pack(MAGIC, VERSION, KIND_OF[self.kind], 0, self.round_id, self.sender, self.recipient,
                       len(header), len(blobs)),
            header, struct.pack(f"<{len(blobs)}Q", *(memoryview(b).nbytes for b in blobs)), *blobs])


def _check_fields(kind: str, fields: dict, blob) -> dict:
    schema = KINDS[KIND_OF[kind]][1]
    if set(fields) != set(schema):
        raise ProtocolError(f"{kind} message has fields {sorted(fields)}, expected {sorted(schema)}")
    out = {}
    for name, typ in schema.items():
        v = fields[name]
        if typ is int:
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ProtocolError(f"{kind}.{name} must be a non-negative int")
            out[name] = v
        elif typ is bytes:
            out[name] = blob(v)
        elif typ == "ints":
            if not isinstance(v, list) or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in v):
                raise ProtocolError(f"{kind}.{name} must be a list of non-negative ints")
            out[name] = v
        else:
            if not isinstance(v, list):
                raise ProtocolError(f"{kind}.{name} must be a list of byte strings")
            out[name] = [blob(x) for x in v]
    return out


def parse(data: bytes, *, expect: str | None = None) -> Message:
    """A :class:`Message` from bytes, every length and field validated."""
    if not isinstance(data, bytes):
        data = bytes(data)
    if len(data) < _HEAD.size:
        raise ProtocolError(f"message of {len(data)} bytes is shorter than the {_HEAD.size}-byte header")
    magic, version, kind, reserved, round_id, sender, recipient, hlen, nblobs = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise ProtocolError(f"unsupported message version {version} (this code reads {VERSION})")
    if kind not in KINDS or reserved != 0:
        raise ProtocolError(f"unknown message kind {kind}")
    name = KINDS[kind][0]
    if expect is not None and name != expect:
        raise ProtocolError(f"expected a {expect} message, got {name}")
    pos = _HEAD.size
    if hlen > len(data) - pos or nblobs > (len(data) - pos - hlen) // 8:
        raise ProtocolError(f"{name} message truncated: header {hlen} bytes and {nblobs} blobs do not fit "
                            f"in {len(data)} bytes")
    try:
        header = json.loads(data[pos : pos + hlen].decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, absurd integers, deep nesting
        raise ProtocolError(f"{name} message header is not valid JSON: {exc}") from None
    pos += hlen
    lens = struct.unpack_from(f"<{nblobs}Q", data, pos)
    pos += 8 * nblobs
    if sum(lens) != len(data) - pos:
        raise ProtocolError(f"{name} message blobs declare {sum(lens)} bytes, {len(data) - pos} present")
    blobs, used, view = [], set(), memoryview(data)
    for n in lens:
        blobs.append(view[pos : pos + n] if n >= ZERO_COPY else data[pos : pos + n])
        pos += n
    if not isinstance(header, dict):
        raise ProtocolError(f"{name} message header must be a JSON object")

    def blob(v):
        if not (isinstance(v, dict) and set(v) == {"$b"} and isinstance(v["$b"], int) and 0 <= v["$b"] < len(blobs)):
            raise ProtocolError(f"{name} message refers to a missing blob")
        if v["$b"] in used:
            raise ProtocolError(f"{name} message uses blob {v['$b']} twice")
        used.add(v["$b"])
        return blobs[v["$b"]]

    fields = _check_fields(name, header, blob)
    if len(used) != len(blobs):
        raise ProtocolError(f"{name} message carries {len(blobs) - len(used)} unreferenced blobs")
    return Message(name, round_id, sender, recipient, fields)
