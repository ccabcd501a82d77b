"""One client's side of a secure-sum round (see :mod:`.protocol` for the stages).

Every message from the server is size-limited before parsing and checked against this client's
state; every message to the server after ``advertise`` carries a Poly1305 tag under the key this
client shares with the server (X25519 of its ``c`` key and the server's round key). A peer whose
share box does not open, is misaddressed or does not match the dealer's commitment is not masked
with and is named in the ``complaints`` of the masked input: one hostile peer cannot stop a client.
"""

from __future__ import annotations

import os

import numpy as np

from . import shamir
from .crypto import (ProtocolError, channel_key, commit, mac_key, new_keypair, open_sealed,
                     pair_seed, private_bytes, public_bytes, seal, sign, tagger, verify)
from .fixedpoint import RING_DTYPES
from .messages import SERVER, Message, parse
from .protocol import BOX_BYTES, COMMIT_BYTES, PLAIN_BYTES, SHARE_HEAD, SLACK, check_parameters, mask_words


def u32_bytes(ids) -> bytes:
    return np.asarray(sorted(ids), dtype="<u4").tobytes()


def consistency_need(t: int, n: int) -> int:
    """Signatures needed on the survivor set: ``t``, and more than ``2n/3`` of the ``n`` invited
    clients. Honest clients sign one set per round, so certifying two different sets takes
    ``2 need - n`` clients that sign both: with fewer than ``n/3`` corrupted clients the server
    cannot show some honest holders one set of survivors and the others another."""
    return max(t, 2 * n // 3 + 1)


class Client:
    """One client's side of a round. ``value`` is its encoded update (uint32/uint64 ring elements).

    Active-adversary setting: ``identity`` (this client's long-term Ed25519 private key) and
    ``identities`` ({client id: Ed25519 public key bytes}, every invited client) are given together.
    ``max_peers`` bounds the size of any message this client accepts (its neighbours, or all
    clients without SecAgg+).
    """

    def __init__(self, cid: int, value: np.ndarray, *, round_id: int = 0, identity=None,
                 identities: dict[int, bytes] | None = None, max_peers: int = 10_000):
        self.id, self.round = int(cid), int(round_id)
        self.value = np.ascontiguousarray(value)
        if self.value.dtype not in (np.uint32, np.uint64) or self.value.ndim != 1:
            raise TypeError(f"client {cid}: value must be a 1-D uint32 or uint64 array of ring elements")
        if (identity is None) != (identities is None):
            raise ValueError(f"client {cid}: the active setting needs both identity and identities")
        self.identity, self.identities = identity, identities
        self.max_peers = int(max_peers) if identities is None else max(int(max_peers), len(identities))
        self.stage = "new"

    def _fail(self, why: str, client: int | None = None):
        raise ProtocolError(f"client {self.id}: {why}", client)

    def _expect(self, data, kind: str, stage: str, per_peer: int) -> Message:
        if self.stage != stage:
            self._fail(f"unexpected {kind} message in stage {self.stage!r} (replayed or out of order)")
        msg = parse(data, expect=kind, limit=SLACK + per_peer * self.max_peers, max_ids=self.max_peers + 1)
        if msg.round_id != self.round or msg.recipient != self.id or msg.sender != SERVER:
            self._fail(f"{kind} message for round {msg.round_id}, recipient {msg.recipient}, from {msg.sender} "
                       f"(expected round {self.round} from the server)")
        return msg

    def _out(self, kind: str, **fields) -> bytes:
        tag = tagger(self.mac, self.round) if kind != "advertise" else None
        return Message(kind, self.round, self.id, SERVER, fields).to_bytes(tag)

    def advertise(self) -> bytes:
        if self.stage != "new":
            self._fail("already advertised")
        self.c_sk, self.s_sk = new_keypair(), new_keypair()
        c_pk, s_pk = public_bytes(self.c_sk), public_bytes(self.s_sk)
        sig = sign(self.identity, b"advertise", self.round, self.id, c_pk, s_pk) if self.identity else b""
        self.stage = "advertised"
        return self._out("advertise", c_pk=c_pk, s_pk=s_pk, sig=sig)

    def share_keys(self, data) -> bytes:
        msg = self._expect(data, "roster", "advertised", 4 + 32 + 32 + 64)
        f = msg.fields
        ids, k = f["ids"], f["neighbours"] or None
        try:
            check_parameters(f["n"], f["threshold"], k)
        except (ValueError, TypeError) as exc:
            self._fail(f"roster refused: {exc}")
        if f["bits"] not in RING_DTYPES or np.dtype(RING_DTYPES[f["bits"]]) != self.value.dtype or f["d"] != self.value.size:
            self._fail(f"roster asks for a {f['bits']}-bit ring of d={f['d']}, client holds "
                       f"{self.value.dtype} x {self.value.size}")
        if (len(set(ids)) != len(ids) or self.id in ids or len(ids) > (k or f["n"] - 1)
                or not len(ids) == len(f["c_pks"]) == len(f["s_pks"])
                or len(f["sigs"]) != (len(ids) if self.identities is not None else 0)):
            self._fail(f"inconsistent roster of {len(ids)} neighbours (k={k}, n={f['n']})")
        self.t, self.n = f["threshold"], f["n"]
        keys = [bytes(x) for x in (*f["c_pks"], *f["s_pks"])]
        if any(len(x) != 32 for x in keys) or len(set(keys)) != len(keys):
            self._fail("roster has a public key that is not 32 bytes, or repeats one")
        if self.identities is not None:  # a key the server substituted would not carry the owner's signature
            for v, c, s, sig in zip(ids, f["c_pks"], f["s_pks"], f["sigs"]):
                if v not in self.identities or not verify(self.identities[v], sig, b"advertise", self.round, v, c, s):
                    self._fail(f"advertisement of client {v} in the roster is not signed by its identity key")
        if len(f["server_pk"]) != 32:
            self._fail(f"the server's round key has {len(f['server_pk'])} bytes, expected 32")
        self.mac = mac_key(self.c_sk, f["server_pk"], self.round, self.id)  # fails on a low-order key
        self.c_pk = dict(zip(ids, f["c_pks"]))
        self.s_pk = dict(zip(ids, f["s_pks"]))
        self.neighbours = sorted(ids)
        if len(ids) + 1 < self.t:
            self._fail(f"{len(ids) + 1} share holders present, fewer than t={self.t}")
        self.b = os.urandom(32)
        holders = sorted([*ids, self.id])
        xs = [v + 1 for v in holders]
        b_sh = shamir.split(self.b, self.t, xs)
        s_sh = shamir.split(private_bytes(self.s_sk), self.t, xs)
        to, boxes, commits = [], [], []
        for v in holders:
            commits.append(commit(self.round, self.id, v, b"b", b_sh[v + 1]) + commit(self.round, self.id, v, b"s", s_sh[v + 1]))
            plain = SHARE_HEAD.pack(self.id, v) + b_sh[v + 1] + s_sh[v + 1]
            if v == self.id:
                self.own_share = plain
                continue
            try:
                key = channel_key(self.c_sk, self.c_pk[v], self.round, self.id, v)
            except ProtocolError:  # a low-order key (only a dishonest server lets one through)
                self._fail(f"the key of client {v} is unusable", v)
            to.append(v)
            boxes.append(seal(key, self.round, self.id, v, plain))
        self.stage = "shared"
        return self._out("shares", holders=holders, commits=commits, to=to, boxes=boxes)

    def _open(self, u: int, box, commits) -> bytes | None:
        """The share pair dealt by ``u``, or None when the box fails to open or to match ``u``'s commitments."""
        try:
            if len(box) != BOX_BYTES or len(commits) != COMMIT_BYTES:
                return None
            plain = open_sealed(channel_key(self.c_sk, self.c_pk[u], self.round, self.id, u), self.round, u, self.id, box)
        except ProtocolError:
            return None
        lo, hi = SHARE_HEAD.size, SHARE_HEAD.size + shamir.SHARE_BYTES
        if (len(plain) != PLAIN_BYTES or SHARE_HEAD.unpack_from(plain) != (u, self.id)
                or commit(self.round, u, self.id, b"b", plain[lo:hi]) != bytes(commits[:32])
                or commit(self.round, u, self.id, b"s", plain[hi:]) != bytes(commits[32:])):
            return None
        return plain

    def masked_input(self, data) -> bytes:
        msg = self._expect(data, "forward", "shared", 4 + 4 + BOX_BYTES + COMMIT_BYTES + 24)
        f = msg.fields
        active = f["active"]
        if (len(set(active)) != len(active) or not set(active) <= set(self.neighbours) or f["frm"] != active
                or not len(f["frm"]) == len(f["boxes"]) == len(f["commits"])):
            self._fail(f"malformed forward message: active {active[:8]}..., shares from {f['frm'][:8]}...")
        self.held = {self.id: self.own_share}
        complaints = []
        for u, box, com in zip(f["frm"], f["boxes"], f["commits"]):
            plain = self._open(u, box, com)
            if plain is None:
                complaints.append(u)
            else:
                self.held[u] = plain
        seeds, signs = [self.b], [1]
        for v in active:
            if v in complaints:
                continue
            try:
                seeds.append(pair_seed(self.s_sk, self.s_pk[v], self.round, self.id, v))
            except ProtocolError:
                complaints.append(v)
                del self.held[v]
                continue
            signs.append(1 if v > self.id else -1)
        if len(seeds) < self.t:  # itself plus the peers it masks with
            self._fail(f"only {len(seeds)} of its share holders remain usable, fewer than t={self.t} "
                       f"(complaints about {sorted(complaints)})")
        self.active, self.complaints = set(active), sorted(complaints)
        y = mask_words(seeds, signs, self.value)
        self.stage = "masked"
        return self._out("masked", bits=8 * self.value.itemsize, complaints=self.complaints,
                         data=memoryview(y.astype(y.dtype.newbyteorder("<"), copy=False)).cast("B"))

    def consistency(self, data) -> bytes:
        """Active setting: sign the survivor set the server announces (once per round)."""
        if self.identity is None:
            self._fail("consistency check requested, but this client has no identity key")
        msg = self._expect(data, "consistency_request", "masked", 4)
        u3 = msg.fields["u3"]
        if len(set(u3)) != len(u3) or self.id not in u3 or len(u3) < self.t:
            self._fail(f"survivor set of {len(u3)} clients refused (must be distinct, include this client, >= t={self.t})")
        self.u3 = sorted(u3)
        self.stage = "consistent"
        return self._out("consistency_response", sig=sign(self.identity, b"consistency", self.round, self.id,
                                                          u32_bytes(self.u3)))

    def _refuse(self, why: str):
        self.stage = "refused"
        self._fail(why)

    def unmask(self, data) -> bytes:
        msg = self._expect(data, "unmask_request", "consistent" if self.identity else "masked", 4 + 4 + 64)
        f = msg.fields
        surv, drop = set(f["survivors"]), set(f["dropped"])
        both = surv & drop
        if both:
            self._refuse(f"refuses to reveal both the self-mask share and the mask-key share of client(s) {sorted(both)}")
        if self.id in drop or self.id not in surv:
            self._refuse("request lists this client as dropped, but it sent its input")
        if self.identities is not None:
            u3 = set(self.u3)
            if sorted(f["u3"]) != self.u3 or not surv <= u3 or drop & u3:
                self._refuse("unmasking request disagrees with the survivor set this client signed")
            need, good = consistency_need(self.t, len(self.identities)), set()
            body = u32_bytes(self.u3)
            for v, sig in zip(f["sig_ids"], f["sigs"]):
                if v in u3 and v in self.identities and verify(self.identities[v], sig, b"consistency", self.round, v, body):
                    good.add(v)
            if len(good) < need:
                self._refuse(f"only {len(good)} valid signatures on the survivor set, {need} needed: nothing revealed")
        self_ids, self_sh, pair_ids, pair_sh = [], [], [], []
        lo = SHARE_HEAD.size
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
