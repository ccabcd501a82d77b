"""Protocol messages as bytes, without pickle: any transport (Flower, gRPC, files) can carry them.

Layout (little-endian)::

    magic "TPSA" | version u8 | kind u8 | tag length u16 (0 or 16) | round u64 | sender u32
    | recipient u32 | header length u32 | blob count u32 | header (UTF-8 JSON object)
    | blob lengths (u64 each) | blobs | tag

The JSON header holds only small ints and blob references (``{"$b": i}``, or ``{"$b": i, "$n": m}``
for a list of byte strings: blobs i .. i+m-1): byte strings and int lists are blobs (an int list is a packed ``<u4`` array), so the header is at most
:data:`MAX_HEADER` bytes and nothing expands much when parsed. :func:`parse` refuses a message
longer than the caller's ``limit`` before reading it, checks every length against the real size
before slicing, and every field against its kind's schema (:class:`ProtocolError` otherwise).
The tag (Poly1305, see :mod:`.crypto`) covers everything before it; checking it is the caller's job
(only the caller knows the sender's key). Server-to-client messages use sender ``SERVER``. Blobs of
at least :data:`ZERO_COPY` bytes come back as read-only memoryviews into the message (no copy).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import numpy as np

from .crypto import ProtocolError

MAGIC = b"TPSA"
VERSION = 2
SERVER = 0xFFFFFFFF
_HEAD = struct.Struct("<4sBBHQIIII")
ZERO_COPY = 1 << 20
MAX_HEADER = 1024  # scalars and blob references only
MAX_BLOBS = 1 << 20
TAG_BYTES = 16

# kind -> (name, {field: type}); type is int, bytes, "ints" (u32 list) or "blobs" (list of bytes)
KINDS: dict[int, tuple[str, dict]] = {
    1: ("advertise", {"c_pk": bytes, "s_pk": bytes, "sig": bytes}),
    2: ("roster", {"ids": "ints", "c_pks": "blobs", "s_pks": "blobs", "sigs": "blobs", "server_pk": bytes,
                   "n": int, "threshold": int, "neighbours": int, "bits": int, "d": int}),
    3: ("shares", {"holders": "ints", "commits": "blobs", "to": "ints", "boxes": "blobs"}),
    4: ("forward", {"active": "ints", "frm": "ints", "boxes": "blobs", "commits": "blobs"}),
    5: ("masked", {"bits": int, "data": bytes, "complaints": "ints"}),
    6: ("unmask_request", {"survivors": "ints", "dropped": "ints", "u3": "ints", "sig_ids": "ints",
                           "sigs": "blobs"}),
    7: ("unmask_response", {"self_ids": "ints", "self_shares": "blobs", "pair_ids": "ints", "pair_shares": "blobs"}),
    8: ("consistency_request", {"u3": "ints"}),
    9: ("consistency_response", {"sig": bytes}),
}
KIND_OF = {name: k for k, (name, _) in KINDS.items()}


@dataclass
class Message:
    kind: str
    round_id: int
    sender: int
    recipient: int
    fields: dict = field(default_factory=dict)
    tag: bytes | None = None        # set by parse() on a tagged message
    body: memoryview | None = None  # the bytes the tag covers (set by parse())

    def to_bytes(self, tagger=None) -> bytes:
        """The frame; ``tagger(kind, body) -> 16 bytes`` appends an authentication tag."""
        blobs: list = []

        def enc(v, typ):
            if typ == "ints":
                a = np.asarray(list(v), dtype=np.int64)
                if a.size and (a.min() < 0 or a.max() > 0xFFFFFFFF):
                    raise ProtocolError(f"{self.kind}: ids must fit in u32")
                v = a.astype("<u4").tobytes()
            elif typ == "blobs":  # consecutive blobs: the header stays small for any count
                first = len(blobs)
                blobs.extend(v)
                return {"$b": first, "$n": len(blobs) - first}
            elif typ is int:
                return int(v)
            blobs.append(v)  # joined once below, without an intermediate copy
            return {"$b": len(blobs) - 1}

        schema = KINDS[KIND_OF[self.kind]][1]
        if set(self.fields) != set(schema):
            raise ProtocolError(f"{self.kind} message has fields {sorted(self.fields)}, expected {sorted(schema)}")
        header = json.dumps({k: enc(self.fields[k], typ) for k, typ in schema.items()}, separators=(",", ":")).encode()
        tlen = TAG_BYTES if tagger is not None else 0
        parts = [_HEAD.pack(MAGIC, VERSION, KIND_OF[self.kind], tlen, self.round_id, self.sender, self.recipient,
                            len(header), len(blobs)),
                 header, struct.pack(f"<{len(blobs)}Q", *(memoryview(b).nbytes for b in blobs)), *blobs]
        if tagger is None:
            return b"".join(parts)
        body = b"".join(parts)
        return body + tagger(self.kind, body)


def peek(data) -> tuple[str, int, int]:
    """(kind name or '?', round, sender) from the fixed header, unverified: for naming who a
    refused message claims to come from."""
    if len(data) < _HEAD.size:
        return "?", -1, -1
    _, _, kind, _, round_id, sender, _, _, _ = _HEAD.unpack_from(data)
    return KINDS.get(kind, ("?",))[0], round_id, sender


def parse(data, *, expect: str | None = None, limit: int | None = None, max_ids: int | None = None) -> Message:
    """A :class:`Message` from bytes, every length and field validated; ``limit``: the most bytes
    accepted (checked first, before anything is read); ``max_ids``: the longest id list accepted
    (checked before the list is built; it also caps the blob count at ``3 max_ids + 8``)."""
    if limit is not None and len(data) > limit:
        kind, _, sender = peek(data)
        raise ProtocolError(f"{kind} message claiming sender {sender} has {len(data)} bytes, more than the "
                            f"{limit} this stage allows")
    if not isinstance(data, bytes):
        data = bytes(data)
    if len(data) < _HEAD.size:
        raise ProtocolError(f"message of {len(data)} bytes is shorter than the {_HEAD.size}-byte header")
    magic, version, kind, tlen, round_id, sender, recipient, hlen, nblobs = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise ProtocolError(f"unsupported message version {version} (this code reads {VERSION})")
    if kind not in KINDS or tlen not in (0, TAG_BYTES):
        raise ProtocolError(f"unknown message kind {kind} or tag length {tlen}")
    name = KINDS[kind][0]
    if expect is not None and name != expect:
        raise ProtocolError(f"expected a {expect} message, got {name}")
    pos, end = _HEAD.size, len(data) - tlen
    max_blobs = MAX_BLOBS if max_ids is None else 3 * max_ids + 8  # a kind has at most 3 lists of blobs
    if hlen > MAX_HEADER or nblobs > max_blobs or hlen > end - pos or nblobs > (end - pos - hlen) // 8:
        raise ProtocolError(f"{name} message from {sender}: header {hlen} bytes and {nblobs} blobs do not fit in "
                            f"{len(data)} bytes (or exceed {MAX_HEADER} / {max_blobs})")
    try:
        header = json.loads(data[pos : pos + hlen].decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, absurd integers, deep nesting
        raise ProtocolError(f"{name} message header is not valid JSON: {exc}") from None
    pos += hlen
    lens = struct.unpack_from(f"<{nblobs}Q", data, pos)
    pos += 8 * nblobs
    if sum(lens) != end - pos:
        raise ProtocolError(f"{name} message blobs declare {sum(lens)} bytes, {end - pos} present")
    blobs, used, view = [], set(), memoryview(data)
    for n in lens:
        blobs.append(view[pos : pos + n] if n >= ZERO_COPY else data[pos : pos + n])
        pos += n
    if not isinstance(header, dict):
        raise ProtocolError(f"{name} message header must be a JSON object")

    def blob(v):
        if not (isinstance(v, dict) and set(v) == {"$b"} and type(v["$b"]) is int and 0 <= v["$b"] < len(blobs)):
            raise ProtocolError(f"{name} message refers to a missing blob")
        if v["$b"] in used:
            raise ProtocolError(f"{name} message uses blob {v['$b']} twice")
        used.add(v["$b"])
        return blobs[v["$b"]]

    schema = KINDS[kind][1]
    if set(header) != set(schema):
        raise ProtocolError(f"{name} message has fields {sorted(header)}, expected {sorted(schema)}")
    fields = {}
    for key, typ in schema.items():
        v = header[key]
        if typ is int:
            if type(v) is not int or not 0 <= v < 1 << 64:
                raise ProtocolError(f"{name}.{key} must be an int in [0, 2^64)")
            fields[key] = v
        elif typ is bytes:
            fields[key] = blob(v)
        elif typ == "ints":
            b = blob(v)
            if len(b) % 4 or (max_ids is not None and len(b) > 4 * max_ids):
                raise ProtocolError(f"{name}.{key}: {len(b)} bytes is not a u32 list of at most {max_ids} ids")
            fields[key] = np.frombuffer(b, dtype="<u4").tolist()
        else:
            if not (isinstance(v, dict) and set(v) == {"$b", "$n"} and type(v["$n"]) is int
                    and 0 <= v["$n"] <= len(blobs)):
                raise ProtocolError(f"{name}.{key} must be a run of blobs")
            first = v["$b"]
            fields[key] = [blob({"$b": first + i}) if type(first) is int else blob(None) for i in range(v["$n"])]
    if len(used) != len(blobs):
        raise ProtocolError(f"{name} message carries {len(blobs) - len(used)} unreferenced blobs")
    msg = Message(name, round_id, sender, recipient, fields)
    if tlen:
        msg.tag, msg.body = data[end:], view[:end]
    return msg
