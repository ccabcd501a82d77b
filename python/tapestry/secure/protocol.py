"""Secure aggregation as message-passing state machines (Bonawitz et al. 2017, double masking;
Bell et al. 2020, SecAgg+ with ``k`` neighbours on a random regular graph).

Stages (every message is bytes, see :mod:`.messages`)::

    client                                   server
    advertise()          -- advertise -->    U1 = senders;  roster to U1 (>= t)
    share_keys(roster)   -- shares    -->    U2 = senders;  forward each client its shares (>= t)
    masked_input(fwd)    -- masked    -->    U3 = senders;  request: survivors U3, dropped U2 \\ U3 (>= t)
    unmask(request)      -- response  -->    U4 = senders;  reconstruct b_u (u in U3), s_u (u dropped)

Each client ``u`` holds two X25519 key pairs (``c`` for the share channel, ``s`` for masks) and a
self-mask seed ``b_u``; it Shamir-shares ``b_u`` and its mask private key among its holders (its
neighbours and itself; everyone in U1 without SecAgg+) with threshold ``t``, each share encrypted
with ChaCha20-Poly1305 under the (u, v) channel key, bound to the round, sender and receiver. The
masked input is ``y_u = q_u + PRG(b_u) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv)`` over the
neighbours ``v`` in U2. A client answers one unmasking request per round and refuses one that
names a peer both as survivor and as dropped, or names itself as dropped: so, with ``t`` above
half the holders, no server obtains both ``b_u`` and ``s_u`` of one client.

Requirements checked when the round is set up: ``holders/2 < t <= holders``, where holders is
``n`` (all clients) or ``k + 1`` (SecAgg+), ``1 <= k <= n - 1`` and ``n k`` even.
Not covered: signatures on advertised keys (needs a PKI; an actively malicious server could
otherwise impersonate clients) and the consistency-check round of the malicious-server variant.
"""

from __future__ import annotations

import os
import struct

import numpy as np
import torch

from . import shamir
from .crypto import (ProtocolError, channel_key, new_keypair, open_sealed, pair_seed, private_bytes, public_bytes,
                     seal)
from .fixedpoint import RING_DTYPES
from .graph import check_neighbours, regular_graph
from .messages import SERVER, Message, parse
from .prg import NONCE_MASK, chacha20_keystream, chacha20_mask

_SHARE = struct.Struct("<II")


def check_parameters(n: int, threshold: int, neighbours: int | None) -> int:
    """The number of holders of each client's shares; ValueError naming the violated inequality."""
    if n < 2:
        raise ValueError(f"secure aggregation needs n >= 2 clients, got n={n}")
    if neighbours is not None:
        check_neighbours(n, neighbours)
        holders, what = neighbours + 1, f"k+1={neighbours + 1}"
    else:
        holders, what = n, f"n={n}"
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise TypeError(f"threshold must be an int, got {type(threshold).__name__}")
    if not (2 * threshold > holders and threshold <= holders):
        raise ValueError(f"threshold needs holders/2 < t <= holders with holders = {what}, got t={threshold}")
    return holders


def mask_words(seeds: list[bytes], signs: list[int], q: np.ndarray) -> np.ndarray:
    """``q + sum_j signs_j PRG(seeds_j)`` in q's ring (uint32: one keystream word per element,
    fused kernel; uint64: two consecutive words per element, little-endian)."""
    if q.dtype == np.uint32:
        x = torch.from_numpy(q.view(np.int32))
        return chacha20_mask(x, seeds, signs, nonce=NONCE_MASK).numpy().view(np.uint32)
    acc = q.copy()
    for s, sign in zip(seeds, signs):
        ks = chacha20_keystream(s, NONCE_MASK, 0, 2 * q.size).numpy().view(np.uint64)
        acc = acc + ks if sign > 0 else acc - ks  # uint64 arithmetic wraps mod 2^64
    return acc


def _ring(bits: int, d: int, data: bytes, who: str) -> np.ndarray:
    dtype = np.dtype(RING_DTYPES[bits]).newbyteorder("<")
    if memoryview(data).nbytes != d * dtype.itemsize:
        raise ProtocolError(f"{who}: masked input has {memoryview(data).nbytes} bytes, expected {d} x {dtype.itemsize}")
    return np.frombuffer(data, dtype=dtype).astype(RING_DTYPES[bits], copy=False)


class Client:
    """One client's side of a round. ``value`` is its encoded update (uint32/uint64 ring elements)."""

    def __init__(self, cid: int, value: np.ndarray, *, round_id: int = 0):
        self.id, self.round = int(cid), int(round_id)
        self.value = np.ascontiguousarray(value)
        if self.value.dtype not in (np.uint32, np.uint64) or self.value.ndim != 1:
            raise TypeError(f"client {cid}: value must be a 1-D uint32 or uint64 array of ring elements")
        self.stage = "new"

    def _expect(self, data: bytes, kind: str, stage: str) -> Message:
        if self.stage != stage:
            raise ProtocolError(f"client {self.id}: unexpected {kind} message in stage {self.stage!r} "
                                f"(replayed or out of order)")
        msg = parse(data, expect=kind)
        if msg.round_id != self.round or msg.recipient != self.id or msg.sender != SERVER:
            raise ProtocolError(f"client {self.id}: {kind} message for round {msg.round_id}, recipient "
                                f"{msg.recipient}, from {msg.sender} (expected round {self.round} from the server)")
        return msg

    def _out(self, kind: str, **fields) -> bytes:
        return Message(kind, self.round, self.id, SERVER, fields).to_bytes()

    def advertise(self) -> bytes:
        if self.stage != "new":
            raise ProtocolError(f"client {self.id}: already advertised")
        self.c_sk, self.s_sk = new_keypair(), new_keypair()
        self.stage = "advertised"
        return self._out("advertise", c_pk=public_bytes(self.c_sk), s_pk=public_bytes(self.s_sk))

    def share_keys(self, data: bytes) -> bytes:
        msg = self._expect(data, "roster", "advertised")
        f = msg.fields
        ids = f["ids"]
        if len(set(ids)) != len(ids) or self.id not in ids or not (len(ids) == len(f["c_pks"]) == len(f["s_pks"])):
            raise ProtocolError(f"client {self.id}: inconsistent roster")
        if f["bits"] not in RING_DTYPES or np.dtype(RING_DTYPES[f["bits"]]) != self.value.dtype or f["d"] != self.value.size:
            raise ProtocolError(f"client {self.id}: roster asks for a {f['bits']}-bit ring of d={f['d']}, client "
                                f"holds {self.value.dtype} x {self.value.size}")
        k = f["neighbours"] or None
        try:
            check_parameters(len(f["population"]), f["threshold"], k)
        except (ValueError, TypeError) as exc:
            raise ProtocolError(f"client {self.id}: roster of {len(ids)} clients refused: {exc}") from None
        self.t = f["threshold"]
        self.c_pk = dict(zip(ids, f["c_pks"]))
        self.s_pk = dict(zip(ids, f["s_pks"]))
        if len(set(self.c_pk.values())) != len(ids) or len(set(self.s_pk.values())) != len(ids):
            raise ProtocolError(f"client {self.id}: roster repeats a public key")
        pop = f["population"]
        if len(set(pop)) != len(pop) or not set(ids) <= set(pop):
            raise ProtocolError(f"client {self.id}: roster clients are not part of its population")
        if k:  # the SecAgg+ graph is fixed over the whole population; absent clients are skipped
            present = set(ids)
            nb = [v for v in regular_graph(sorted(pop), k, f["graph_seed"])[self.id] if v in present]
        else:
            nb = [v for v in ids if v != self.id]
        if len(nb) + 1 < self.t:
            raise ProtocolError(f"client {self.id}: {len(nb) + 1} share holders present, fewer than t={self.t}")
        self.neighbours = nb
        self.b = os.urandom(32)
        holders = sorted([*nb, self.id])
        xs = [v + 1 for v in holders]
        b_sh = shamir.split(self.b, self.t, xs)
        s_sh = shamir.split(private_bytes(self.s_sk), self.t, xs)
        to, boxes = [], []
        for v in holders:
            plain = _SHARE.pack(self.id, v) + b_sh[v + 1] + s_sh[v + 1]
            if v == self.id:
                self.own_share = plain
                continue
            key = channel_key(self.c_sk, self.c_pk[v], self.round, self.id, v)
            to.append(v)
            boxes.append(seal(key, self.round, self.id, v, plain))
        self.stage = "shared"
        return self._out("shares", to=to, boxes=boxes)

    def masked_input(self, data: bytes) -> bytes:
        msg = self._expect(data, "forward", "shared")
        f = msg.fields
        active = set(f["active"])
        if self.id not in active:
            raise ProtocolError(f"client {self.id}: not in the server's list of clients that shared keys")
        if len(f["frm"]) != len(f["boxes"]) or len(set(f["frm"])) != len(f["frm"]):
            raise ProtocolError(f"client {self.id}: malformed forward message")
        got = dict(zip(f["frm"], f["boxes"]))
        peers = [v for v in self.neighbours if v in active]
        if set(got) != set(peers):
            raise ProtocolError(f"client {self.id}: forwarded shares from {sorted(got)}, expected exactly the "
                                f"active neighbours {peers}")
        if len(peers) + 1 < self.t:
            raise ProtocolError(f"client {self.id}: only {len(peers) + 1} of its share holders remain, "
                                f"fewer than t={self.t}")
        self.held = {self.id: self.own_share}
        for u, box in got.items():
            plain = open_sealed(channel_key(self.c_sk, self.c_pk[u], self.round, self.id, u), self.round, u, self.id, box)
            if len(plain) != _SHARE.size + 2 * shamir.SHARE_BYTES or _SHARE.unpack_from(plain) != (u, self.id):
                raise ProtocolError(f"client {self.id}: share from client {u} is malformed or misaddressed")
            self.held[u] = plain
        seeds, signs = [self.b], [1]
        for v in peers:
            seeds.append(pair_seed(self.s_sk, self.s_pk[v], self.round, self.id, v))
            signs.append(1 if v > self.id else -1)
        y = mask_words(seeds, signs, self.value)
        self.stage = "masked"
        return self._out("masked", bits=8 * self.value.itemsize, data=memoryview(y.astype(y.dtype.newbyteorder("<"), copy=False)).cast("B"))

    def unmask(self, data: bytes) -> bytes:
        msg = self._expect(data, "unmask_request", "masked")
        surv, drop = set(msg.fields["survivors"]), set(msg.fields["dropped"])
        both = surv & drop
        if both:
            self.stage = "refused"
            raise ProtocolError(f"client {self.id}: refuses to reveal both the self-mask share and the mask-key "
                                f"share of client(s) {sorted(both)}")
        if self.id in drop or self.id not in surv:
            self.stage = "refused"
            raise ProtocolError(f"client {self.id}: request lists this client as dropped, but it sent its input")
        if len(surv) < self.t:
            self.stage = "refused"
            raise ProtocolError(f"client {self.id}: only {len(surv)} survivors, fewer than t={self.t}: nothing revealed")
        self_ids, self_sh, pair_ids, pair_sh = [], [], [], []
        lo = _SHARE.size
        for u, plain in sorted(self.held.items()):
            if u in surv:
                self_ids.append(u)
                self_sh.append(plain[lo : lo + shamir.SHARE_BYTES])
            elif u in drop:
                pair_ids.append(u)
                pair_sh.append(plain[lo + shamir.SHARE_BYTES :])
        self.stage = "done"  # one answer per round: a second request is refused as a replay
        return self._out("unmask_response", self_ids=self_ids, self_shares=self_sh, pair_ids=pair_ids,
                         pair_shares=pair_sh)


class Server:
    """The aggregator's side: collects each stage's messages, then ``close_*`` moves on."""

    def __init__(self, *, threshold: int, d: int, bits: int = 32, neighbours: int | None = None,
                 round_id: int = 0, graph_seed: int = 0, clients: list[int] | None = None):
        """``clients``: the ids invited to the round (the population the SecAgg+ graph is drawn
        over, fixed before anyone drops out); default: whoever advertises keys."""
        if bits not in RING_DTYPES:
            raise ValueError(f"ring bits must be 32 or 64, got {bits}")
        self.population = None if clients is None else sorted(int(c) for c in clients)
        if self.population is not None:
            check_parameters(len(self.population), threshold, neighbours)
        self.t, self.d, self.bits, self.k = threshold, d, bits, neighbours
        self.round, self.graph_seed = round_id, graph_seed
        self.stage = "advertise"
        self.inbox: dict[int, Message] = {}

    def receive(self, data: bytes) -> None:
        kind = {"advertise": "advertise", "share": "shares", "masked": "masked", "unmask": "unmask_response"}.get(self.stage)
        if kind is None:
            raise ProtocolError(f"server: no message expected in stage {self.stage!r}")
        msg = parse(data, expect=kind)
        if msg.round_id != self.round or msg.recipient != SERVER or msg.sender == SERVER:
            raise ProtocolError(f"server: {kind} message from client {msg.sender} for round {msg.round_id} "
                                f"(this is round {self.round})")
        if msg.sender in self.inbox:
            raise ProtocolError(f"server: second {kind} message from client {msg.sender} (replayed)")
        if self.stage == "advertise" and self.population is not None and msg.sender not in self.population:
            raise ProtocolError(f"server: client {msg.sender} was not invited to this round")
        if self.stage != "advertise" and msg.sender not in self.expected:
            raise ProtocolError(f"server: {kind} message from client {msg.sender}, not part of this stage")
        self.inbox[msg.sender] = msg

    def _close(self, what: str) -> dict[int, Message]:
        got, self.inbox = self.inbox, {}
        if len(got) < self.t:
            self.stage = "aborted"
            raise ProtocolError(f"round aborted at {what}: {len(got)} clients responded, fewer than t={self.t}; "
                                f"nothing was revealed")
        return got

    def _send(self, kind: str, to: int, **fields) -> bytes:
        return Message(kind, self.round, SERVER, to, fields).to_bytes()

    def close_advertise(self) -> dict[int, bytes]:
        got = self._close("advertise")
        ids = sorted(got)
        pop = self.population if self.population is not None else ids
        check_parameters(len(pop), self.t, self.k)
        self.u1 = ids
        self.s_pk = {u: got[u].fields["s_pk"] for u in ids}
        present = set(ids)
        graph = regular_graph(pop, self.k, self.graph_seed) if self.k else {u: pop for u in pop}
        self.neighbours = {u: [v for v in graph[u] if v in present and v != u] for u in ids}
        fields = dict(ids=ids, population=pop, c_pks=[got[u].fields["c_pk"] for u in ids], s_pks=[self.s_pk[u] for u in ids],
                      threshold=self.t, neighbours=self.k or 0, graph_seed=self.graph_seed, bits=self.bits, d=self.d)
        self.stage, self.expected = "share", set(ids)
        return {u: self._send("roster", u, **fields) for u in ids}

    def close_share(self) -> dict[int, bytes]:
        got = self._close("key sharing")
        self.u2 = sorted(got)
        mail: dict[int, list] = {u: [] for u in self.u2}
        for u, msg in got.items():
            if len(msg.fields["to"]) != len(msg.fields["boxes"]):
                raise ProtocolError(f"server: shares message from client {u} is malformed")
            for v, box in zip(msg.fields["to"], msg.fields["boxes"]):
                if v in mail:
                    mail[v].append((u, box))
        self.stage, self.expected = "masked", set(self.u2)
        return {v: self._send("forward", v, active=self.u2, frm=[u for u, _ in m], boxes=[b for _, b in m])
                for v, m in mail.items()}

    def close_masked(self) -> dict[int, bytes]:
        got = self._close("masked input")
        self.u3 = sorted(got)
        self.total = np.zeros(self.d, dtype=RING_DTYPES[self.bits])
        for u, msg in got.items():
            if msg.fields["bits"] != self.bits:
                raise ProtocolError(f"server: client {u} sent a {msg.fields['bits']}-bit input, expected {self.bits}")
            self.total += _ring(self.bits, self.d, msg.fields["data"], f"client {u}")  # wraps mod 2^bits
        self.dropped = [u for u in self.u2 if u not in got]
        self.stage, self.expected = "unmask", set(self.u3)
        return {u: self._send("unmask_request", u, survivors=self.u3, dropped=self.dropped) for u in self.u3}

    def finish(self) -> np.ndarray:
        """The sum of the survivors' inputs in the ring, once at least ``t`` clients answered for
        every secret needed; otherwise ProtocolError, and the masked total is discarded."""
        got = self._close("unmasking")
        want_b, want_s = set(self.u3), set(self.dropped)
        b_sh: dict[int, dict] = {u: {} for u in want_b}
        s_sh: dict[int, dict] = {u: {} for u in want_s}
        for v, msg in got.items():
            f = msg.fields
            for ids, shares, into, kind in ((f["self_ids"], f["self_shares"], b_sh, "self-mask"),
                                            (f["pair_ids"], f["pair_shares"], s_sh, "mask-key")):
                if len(ids) != len(shares):
                    raise ProtocolError(f"server: unmasking response of client {v} is malformed")
                for u, sh in zip(ids, shares):
                    if u not in into or len(sh) != shamir.SHARE_BYTES:
                        raise ProtocolError(f"server: client {v} sent an unrequested {kind} share of client {u}")
                    into[u][v + 1] = sh
        short = [f"{k} share of client {u}: {len(sh)} < t={self.t}" for k, d in (("self-mask", b_sh), ("mask-key", s_sh))
                 for u, sh in d.items() if len(sh) < self.t]
        if short:
            self.stage, self.total = "aborted", None
            raise ProtocolError("round aborted at unmasking, too few shares (" + "; ".join(short) + "); nothing was revealed")
        seeds, signs = [], []
        for u in self.u3:
            seeds.append(shamir.combine(b_sh[u], self.t))
            signs.append(-1)
        u3 = set(self.u3)
        for u in self.dropped:
            s_sk = shamir.combine(s_sh[u], self.t)
            for v in self.neighbours[u]:
                if v in u3:  # y_v carries +PRG(s_uv) when u > v, -PRG(s_uv) when u < v
                    seeds.append(pair_seed(s_sk, self.s_pk[v], self.round, u, v))
                    signs.append(-1 if u > v else 1)
        total = mask_words(seeds, signs, self.total)
        self.stage = "done"
        return total
