"""The aggregator's side of a secure-sum round (see :mod:`.protocol` for the stages).

:meth:`Server.receive` takes one message at a time. A message that cannot be authenticated (too
long, unparseable, wrong round, unknown sender, bad tag or signature) is discarded and listed in
``rejected``: it could be a forgery, so nobody is blamed and the real sender's message still
counts. An authenticated message that fails a check excludes its sender (``excluded``, with the
reason); either way ``receive`` raises :class:`ProtocolError` (``.client`` names the offender, or
is None) and the round goes on while at least ``t`` clients remain.
"""

from __future__ import annotations

import numpy as np

from . import shamir
from .client import consistency_need, u32_bytes
from .crypto import (ProtocolError, check_public_key, commit, mac_key, new_keypair, pair_seed, public_bytes, tag_ok,
                     verify)
from .fixedpoint import RING_DTYPES
from .graph import regular_graph
from .messages import SERVER, Message, parse, peek
from .protocol import BOX_BYTES, COMMIT_BYTES, SLACK, check_parameters, mask_words, ring_view

_KIND = {"advertise": "advertise", "share": "shares", "masked": "masked", "consistency": "consistency_response",
         "unmask": "unmask_response"}


class Server:
    """The aggregator's side: collects each stage's messages, then ``close_*`` moves on.

    ``clients``: the ids invited (the population the SecAgg+ graph is drawn over, fixed before
    anyone drops out); default: whoever advertises keys. ``identities`` ({id: Ed25519 public key
    bytes}) turns on the active-adversary setting: signed advertisements and the consistency round
    (:meth:`close_masked` then returns consistency requests and :meth:`close_consistency` the
    unmasking requests).
    """

    def __init__(self, *, threshold: int, d: int, bits: int = 32, neighbours: int | None = None,
                 round_id: int = 0, graph_seed: int = 0, clients=None, identities: dict[int, bytes] | None = None):
        if bits not in RING_DTYPES:
            raise ValueError(f"ring bits must be 32 or 64, got {bits}")
        if identities is not None:
            identities = {int(u): bytes(pk) for u, pk in identities.items()}
            if clients is None:
                clients = list(identities)
            elif not set(clients) <= set(identities):
                raise ValueError(f"clients {sorted(set(clients) - set(identities))[:8]} have no identity key")
        self.population = None if clients is None else sorted(int(c) for c in clients)
        if self.population is not None:
            check_parameters(len(self.population), threshold, neighbours)
        self.t, self.d, self.bits, self.k = threshold, d, bits, neighbours
        self.round, self.graph_seed, self.identities = round_id, graph_seed, identities
        self.stage = "advertise"
        self.inbox: dict[int, Message] = {}
        self.seen: dict[int, bytes] = {}
        self.excluded: dict[int, str] = {}
        self.rejected: list[str] = []
        self.accused: dict[int, list[int]] = {}  # client -> peers that complained about it
        self.sk = new_keypair()
        self.mac: dict[int, bytes] = {}
        self.keys_seen: dict[bytes, int] = {}

    # -- arrival -------------------------------------------------------------------------------

    def _limit(self) -> tuple[int, int]:
        h = (self.k + 1) if self.k else len(getattr(self, "u1", ()))
        itemsize = np.dtype(RING_DTYPES[self.bits]).itemsize
        per = {"advertise": 0, "share": 4 + COMMIT_BYTES + 4 + BOX_BYTES + 24, "masked": 4,
               "consistency": 0, "unmask": 2 * (4 + shamir.SHARE_BYTES + 8)}[self.stage]
        return SLACK + per * h + (self.d * itemsize if self.stage == "masked" else 0), h

    def _reject(self, data, why: str):
        kind, _, sender = peek(data)
        self.rejected.append(f"{kind} message claiming sender {sender}: {why}")
        raise ProtocolError(f"server: discarded a {kind} message claiming sender {sender}: {why}")

    def _exclude(self, u: int, why: str):
        self.excluded[u] = why
        self.inbox.pop(u, None)
        raise ProtocolError(f"server: client {u} excluded: {why}", u)

    def receive(self, data) -> None:
        kind = _KIND.get(self.stage)
        if kind is None:
            raise ProtocolError(f"server: no message expected in stage {self.stage!r}")
        limit, max_ids = self._limit()
        try:
            msg = parse(data, expect=kind, limit=limit, max_ids=max_ids)
        except ProtocolError as exc:
            self._reject(data, str(exc))
        u = msg.sender
        if msg.round_id != self.round or msg.recipient != SERVER or u == SERVER:
            self._reject(data, f"for round {msg.round_id}, recipient {msg.recipient} (this is round {self.round})")
        if u in self.excluded:
            raise ProtocolError(f"server: client {u} is excluded from this round ({self.excluded[u]})", u)
        if kind == "advertise":
            if self.population is not None and u not in self.population:
                self._reject(data, "not invited to this round")
            f = msg.fields
            if self.identities is not None and not verify(self.identities[u], f["sig"], b"advertise", self.round, u,
                                                          f["c_pk"], f["s_pk"]):
                self._reject(data, "advertisement not signed by the client's identity key (forged)")
            fingerprint = bytes(f["c_pk"]) + bytes(f["s_pk"])
        else:
            if u not in self.expected:
                self._reject(data, f"not expected in stage {self.stage!r}")
            if not tag_ok(self.mac[u], self.round, kind, msg.body, msg.tag):
                self._reject(data, "authentication tag does not verify (forged, corrupted or misrouted)")
            fingerprint = bytes(msg.tag)
        if u in self.seen:
            if self.seen[u] == fingerprint:
                raise ProtocolError(f"server: second {kind} message from client {u} (replayed)", None)
            self._exclude(u, f"sent two different {kind} messages")
        self.seen[u] = fingerprint
        try:
            getattr(self, "_check_" + self.stage)(u, msg.fields)
        except ProtocolError as exc:
            if kind == "advertise" and self.identities is None:  # unauthenticated: could be a forgery
                del self.seen[u]
                self._reject(data, str(exc))
            self._exclude(u, str(exc))
        self.inbox[u] = msg

    def _check_advertise(self, u, f):
        check_public_key(f["s_pk"], f"s_pk of client {u}", self.sk)
        if len(f["c_pk"]) != 32:
            raise ProtocolError(f"c_pk of client {u} has {len(f['c_pk'])} bytes, expected 32")
        self.mac[u] = mac_key(self.sk, f["c_pk"], self.round, u)  # fails on a low-order c_pk
        for name in ("c_pk", "s_pk"):
            owner = self.keys_seen.setdefault(bytes(f[name]), u)
            if owner != u:
                raise ProtocolError(f"advertised the public key of client {owner}")

    def _check_share(self, u, f):
        holders = sorted([*self.neighbours[u], u])
        to = [v for v in holders if v != u]
        if f["holders"] != holders or f["to"] != to:
            raise ProtocolError(f"shares for {f['to'][:8]}... (holders {f['holders'][:8]}...), expected its "
                                f"neighbourhood {holders[:8]}...")
        if len(f["boxes"]) != len(to) or len(f["commits"]) != len(holders):
            raise ProtocolError(f"{len(f['boxes'])} boxes and {len(f['commits'])} commitments for {len(to)} holders")
        if any(len(b) != BOX_BYTES for b in f["boxes"]) or any(len(c) != COMMIT_BYTES for c in f["commits"]):
            raise ProtocolError(f"a share box is not {BOX_BYTES} bytes or a commitment not {COMMIT_BYTES}")

    def _check_masked(self, u, f):
        if f["bits"] != self.bits:
            raise ProtocolError(f"{f['bits']}-bit masked input, expected {self.bits}")
        ring_view(self.bits, self.d, f["data"], "masked input")
        c, peers = f["complaints"], self.nb2[u]
        if len(set(c)) != len(c) or not set(c) <= set(peers):
            raise ProtocolError(f"complaints about {c[:8]} are not about its active neighbours")
        if len(peers) + 1 - len(c) < self.t:  # an honest client with that many bad dealers stops instead
            raise ProtocolError(f"complains about {len(c)} of its {len(peers)} peers: fewer than t={self.t} "
                                f"would remain to mask with")

    def _check_consistency(self, u, f):
        if not verify(self.identities[u], f["sig"], b"consistency", self.round, u, u32_bytes(self.u3)):
            raise ProtocolError("signature on the survivor set does not verify")

    def _check_unmask(self, u, f):
        held = self.held[u]
        want_b = [v for v in held if v in self.u3_set]
        want_s = [v for v in held if v in self.dropped_set]
        if f["self_ids"] != want_b or f["pair_ids"] != want_s:
            raise ProtocolError(f"sent shares of {f['self_ids'][:8]}... / {f['pair_ids'][:8]}..., requested "
                                f"{want_b[:8]}... / {want_s[:8]}... (duplicate, missing or unrequested shares)")
        for ids, shares, kind in ((f["self_ids"], f["self_shares"], b"b"), (f["pair_ids"], f["pair_shares"], b"s")):
            if len(shares) != len(ids):
                raise ProtocolError(f"{len(shares)} shares for {len(ids)} ids")
            for v, sh in zip(ids, shares):
                c = self.commits[v][u][:32] if kind == b"b" else self.commits[v][u][32:]
                if len(sh) != shamir.SHARE_BYTES or commit(self.round, v, u, kind, sh) != c:
                    raise ProtocolError(f"its {'self-mask' if kind == b'b' else 'mask-key'} share of client {v} "
                                        f"does not match client {v}'s commitment")

    # -- stage changes -------------------------------------------------------------------------

    def _close(self, what: str) -> dict[int, Message]:
        got, self.inbox, self.seen = self.inbox, {}, {}
        if len(got) < self.t:
            self.stage = "aborted"
            named = f"; excluded: {self.excluded}" if self.excluded else ""
            raise ProtocolError(f"round aborted at {what}: {len(got)} clients responded, fewer than t={self.t}; "
                                f"nothing was revealed{named}")
        return got

    def _send(self, kind: str, to: int, **fields) -> bytes:
        return Message(kind, self.round, SERVER, to, fields).to_bytes()

    def close_advertise(self) -> dict[int, bytes]:
        got = self._close("advertise")
        ids = sorted(got)
        pop = self.population if self.population is not None else ids
        check_parameters(len(pop), self.t, self.k)
        self.u1, present = ids, set(ids)
        self.c_pk = {u: got[u].fields["c_pk"] for u in ids}
        self.s_pk = {u: got[u].fields["s_pk"] for u in ids}
        self.sig = {u: got[u].fields["sig"] for u in ids}
        graph = regular_graph(pop, self.k, self.graph_seed) if self.k else None
        self.neighbours = {u: [v for v in (graph[u] if graph else ids) if v in present and v != u] for u in ids}
        server_pk = public_bytes(self.sk)
        self.stage, self.expected = "share", set(ids)
        sigs = self.identities is not None
        return {u: self._send("roster", u, ids=nb, c_pks=[self.c_pk[v] for v in nb], s_pks=[self.s_pk[v] for v in nb],
                              sigs=[self.sig[v] for v in nb] if sigs else [], server_pk=server_pk, n=len(pop),
                              threshold=self.t, neighbours=self.k or 0, bits=self.bits, d=self.d)
                for u, nb in self.neighbours.items()}

    def close_share(self) -> dict[int, bytes]:
        got = self._close("key sharing")
        self.u2 = sorted(got)
        self.commits = {u: dict(zip(m.fields["holders"], m.fields["commits"])) for u, m in got.items()}
        box = {u: dict(zip(m.fields["to"], m.fields["boxes"])) for u, m in got.items()}
        self.nb2 = {v: [u for u in self.neighbours[v] if u in got] for v in self.u2}
        self.stage, self.expected = "masked", set(self.u2)
        return {v: self._send("forward", v, active=frm, frm=frm, boxes=[box[u][v] for u in frm],
                              commits=[self.commits[u][v] for u in frm]) for v, frm in self.nb2.items()}

    def close_masked(self) -> dict[int, bytes]:
        got = self._close("masked input")
        self.complaints = {v: set(m.fields["complaints"]) for v, m in got.items()}
        for v, c in self.complaints.items():
            for u in c:
                self.accused.setdefault(u, []).append(v)
        # an accused client's input is left out: it is treated as dropped after sharing
        self.u3 = [u for u in sorted(got) if u not in self.accused]
        if len(self.u3) < self.t:
            self.stage = "aborted"
            raise ProtocolError(f"round aborted at masked input: {len(self.u3)} clients remain after complaints "
                                f"{self.accused}, fewer than t={self.t}; nothing was revealed")
        self.u3_set = set(self.u3)
        self.total = np.zeros(self.d, dtype=RING_DTYPES[self.bits])
        for u in self.u3:
            self.total += ring_view(self.bits, self.d, got[u].fields["data"], f"client {u}")  # wraps mod 2^bits
        self.dropped = [u for u in self.u2 if u not in self.u3_set]
        self.dropped_set = set(self.dropped)
        # v holds the shares of itself and of the neighbours that dealt to it and it did not complain about
        self.held = {v: sorted([v, *(u for u in self.nb2[v] if u not in self.complaints[v])]) for v in self.u3}
        if self.identities is not None:
            self.stage, self.expected = "consistency", set(self.u3)
            return {u: self._send("consistency_request", u, u3=self.u3) for u in self.u3}
        return self._requests([], [])

    def close_consistency(self) -> dict[int, bytes]:
        got = self._close("consistency check")
        need = consistency_need(self.t, len(self.identities))
        if len(got) < need:
            self.stage = "aborted"
            raise ProtocolError(f"round aborted at consistency check: {len(got)} signatures, {need} needed")
        ids = sorted(got)
        return self._requests(ids, [got[u].fields["sig"] for u in ids])

    def _requests(self, sig_ids, sigs) -> dict[int, bytes]:
        self.stage, self.expected = "unmask", set(self.u3)
        u3 = self.u3 if self.identities is not None else []
        return {v: self._send("unmask_request", v, survivors=[u for u in self.held[v] if u in self.u3_set],
                              dropped=[u for u in self.held[v] if u in self.dropped_set], u3=u3, sig_ids=sig_ids,
                              sigs=sigs) for v in self.u3}

    def _secret(self, shares: dict[int, bytes], u: int, kind: str) -> bytes:
        if len(shares) < self.t:
            self.stage, self.total = "aborted", None
            raise ProtocolError(f"round aborted at unmasking: {len(shares)} {kind} shares of client {u}, fewer than "
                                f"t={self.t}; nothing was revealed (excluded: {self.excluded})", u)
        try:  # every share matched its dealer's commitment: shares off the polynomial are the dealer's doing
            secret, off = shamir.combine_checked(shares, self.t)
        except ValueError as exc:
            self.stage, self.total = "aborted", None
            raise ProtocolError(f"round aborted at unmasking: client {u} dealt {kind} shares that lie on no single "
                                f"polynomial ({exc})", u) from None
        if off:
            self.excluded[u] = (f"dealt {kind} shares off its polynomial to holders {[x - 1 for x in off]} "
                                f"(the majority polynomial was used)")
        return secret

    def finish(self) -> np.ndarray:
        """The sum of the survivors' inputs in the ring, once at least ``t`` valid shares of every
        secret needed arrived; otherwise ProtocolError, and the masked total is discarded."""
        got = self._close("unmasking")
        b_sh: dict[int, dict] = {u: {} for u in self.u3}
        s_sh: dict[int, dict] = {u: {} for u in self.dropped}
        for v, msg in got.items():
            f = msg.fields
            for u, sh in zip(f["self_ids"], f["self_shares"]):
                b_sh[u][v + 1] = sh
            for u, sh in zip(f["pair_ids"], f["pair_shares"]):
                s_sh[u][v + 1] = sh
        seeds, signs = [], []
        for u in self.u3:
            seeds.append(self._secret(b_sh[u], u, "self-mask"))
            signs.append(-1)
        for u in self.dropped:
            s_sk = self._secret(s_sh[u], u, "mask-key")
            for v in self.nb2[u]:
                if v in self.u3_set and u not in self.complaints[v]:  # v masked with u
                    # y_v carries +PRG(s_uv) when u > v, -PRG(s_uv) when u < v
                    seeds.append(pair_seed(s_sk, self.s_pk[v], self.round, u, v))
                    signs.append(-1 if u > v else 1)
        total = mask_words(seeds, signs, self.total)
        self.stage = "done"
        return total
