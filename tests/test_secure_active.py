"""The active-adversary setting (Bonawitz et al. 2017): a malicious server, here played by the
test with one corrupted client on its side, tries to learn a client's input by substituting keys
or by the drop-then-unmask attack. In the honest-but-curious setting the attack works (the threat
model says so); with identity keys and the consistency round it fails."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tapestry.secure import Client, ProtocolError, Server, shamir, simulate_round
from tapestry.secure.crypto import identity_public, new_keypair, public_bytes
from tapestry.secure.messages import SERVER, Message, parse
from tapestry.secure.protocol import SHARE_HEAD

N, T, VICTIM, CORRUPT = 7, 4, 0, 6
A, B = [1, 2], [3, 4, 5]  # the honest holders the server tells "survived" / "dropped"


def _setup(active: bool, seed=0):
    rng = np.random.default_rng(seed)
    vals = [rng.integers(0, 2**32, size=32, dtype=np.uint64).astype(np.uint32) for _ in range(N)]
    keys = {i: Ed25519PrivateKey.generate() for i in range(N)} if active else {}
    pubs = {i: identity_public(k) for i, k in keys.items()} if active else None
    clients = [Client(i, vals[i], identity=keys.get(i), identities=pubs) for i in range(N)]
    server = Server(threshold=T, d=32, identities=pubs, clients=range(N))  # does the honest-looking part
    for c in clients:
        server.receive(c.advertise())
    rosters = server.close_advertise()
    for c in clients:
        server.receive(c.share_keys(rosters[c.id]))
    fwd = server.close_share()
    masked = {c.id: c.masked_input(fwd[c.id]) for c in clients}  # the server holds every y_u
    return vals, clients, server, rosters, masked


def _request(v, survivors, dropped, u3=(), sig_ids=(), sigs=()):
    return Message("unmask_request", 0, SERVER, v, {"survivors": survivors, "dropped": dropped, "u3": list(u3),
                                                    "sig_ids": list(sig_ids), "sigs": list(sigs)}).to_bytes()


def _collect(resp, got_b, got_s, holder):
    f = parse(resp).fields
    for ids, shares, got in ((f["self_ids"], f["self_shares"], got_b), (f["pair_ids"], f["pair_shares"], got_s)):
        got.update((holder + 1, s) for u, s in zip(ids, shares) if u == VICTIM)


def _corrupt_hands_over(clients, got_b, got_s):
    plain = clients[CORRUPT].held[VICTIM]
    lo, mid = SHARE_HEAD.size, SHARE_HEAD.size + shamir.SHARE_BYTES
    got_b[CORRUPT + 1], got_s[CORRUPT + 1] = plain[lo:mid], plain[mid:]


def test_drop_then_unmask_works_without_the_active_setting():
    """Honest-but-curious setting, one corrupted client: the attack succeeds (documented)."""
    vals, clients, _, _, _ = _setup(active=False)
    everyone = list(range(N))
    got_b, got_s = {}, {}
    for v in [VICTIM, *A]:  # "client 0 survived": self-mask shares
        _collect(clients[v].unmask(_request(v, everyone, [])), got_b, got_s, v)
    for v in B:  # "client 0 dropped": mask-key shares
        _collect(clients[v].unmask(_request(v, [u for u in everyone if u != VICTIM], [VICTIM])), got_b, got_s, v)
    _corrupt_hands_over(clients, got_b, got_s)
    assert len(got_b) >= T and len(got_s) >= T
    assert shamir.combine(got_b, T) == clients[VICTIM].b  # both secrets of client 0: its input is exposed
    assert shamir.combine(got_s, T) == clients[VICTIM].s_sk.private_bytes_raw()


def test_drop_then_unmask_fails_with_the_consistency_round():
    vals, clients, server, _, _ = _setup(active=True)
    everyone = list(range(N))
    without = [u for u in everyone if u != VICTIM]
    sigs = {}  # each honest client signs the one set the server shows it; the corrupted one signs both
    for v in [VICTIM, *A]:
        sigs[(v, 1)] = parse(clients[v].consistency(Message("consistency_request", 0, SERVER, v,
                                                                    {"u3": everyone}).to_bytes())).fields["sig"]
    for v in B:
        sigs[(v, 0)] = parse(clients[v].consistency(Message("consistency_request", 0, SERVER, v,
                                                                    {"u3": without}).to_bytes())).fields["sig"]
    for with_victim, u3 in ((1, everyone), (0, without)):
        sigs[(CORRUPT, with_victim)] = parse(Client.consistency(clients[CORRUPT], Message(
            "consistency_request", 0, SERVER, CORRUPT, {"u3": u3}).to_bytes())).fields["sig"]
        clients[CORRUPT].stage = "masked"  # a corrupted client signs whatever it is asked to
    got_b, got_s = {}, {}
    for v in [VICTIM, *A]:
        ids = [u for u in everyone if (u, 1) in sigs]
        req = _request(v, everyone, [], everyone, ids, [sigs[(u, 1)] for u in ids])
        with pytest.raises(ProtocolError, match=r"only 4 valid signatures on the survivor set, 5 needed"):
            _collect(clients[v].unmask(req), got_b, got_s, v)
    for v in B:
        ids = [u for u in everyone if (u, 0) in sigs]
        req = _request(v, without, [VICTIM], without, ids, [sigs[(u, 0)] for u in ids])
        with pytest.raises(ProtocolError, match=r"only 4 valid signatures on the survivor set, 5 needed"):
            _collect(clients[v].unmask(req), got_b, got_s, v)
    _corrupt_hands_over(clients, got_b, got_s)
    assert max(len(got_b), len(got_s)) < T  # neither secret of client 0: its input stays masked


def test_forged_signatures_do_not_count():
    _, clients, _, _, _ = _setup(active=True)
    everyone = list(range(N))
    for c in clients:
        c.consistency(Message("consistency_request", 0, SERVER, c.id, {"u3": everyone}).to_bytes())
    fake = Ed25519PrivateKey.generate()
    req = _request(1, everyone, [], everyone, everyone, [fake.sign(b"x") for _ in everyone])
    with pytest.raises(ProtocolError, match="only 0 valid signatures"):
        clients[1].unmask(req)


def test_substituted_key_is_refused():
    """The server swaps client 0's channel key in client 1's roster for its own (to read the
    shares client 1 deals to client 0): in the active setting client 1 refuses the roster."""
    for active in (False, True):
        keys = {i: Ed25519PrivateKey.generate() for i in range(N)}
        pubs = {i: identity_public(k) for i, k in keys.items()} if active else None
        clients = [Client(i, np.zeros(4, np.uint32), identity=keys[i] if active else None, identities=pubs)
                   for i in range(N)]
        server = Server(threshold=T, d=4, identities=pubs, clients=range(N))
        for c in clients:
            server.receive(c.advertise())
        roster = parse(server.close_advertise()[1])
        pks = list(roster.fields["c_pks"])
        pks[roster.fields["ids"].index(0)] = public_bytes(new_keypair())
        roster.fields["c_pks"] = pks
        if active:
            with pytest.raises(ProtocolError, match="client 0 in the roster is not signed"):
                clients[1].share_keys(roster.to_bytes())
        else:
            clients[1].share_keys(roster.to_bytes())  # accepted: the honest-but-curious model trusts the server


def test_active_round_sums_exactly():
    rng = np.random.default_rng(1)
    vals = [rng.integers(0, 2**32, size=100, dtype=np.uint64).astype(np.uint32) for _ in range(12)]
    total, info = simulate_round(vals, threshold=7, active=True, dropouts={2: "mask", 5: "unmask"}, return_info=True)
    assert info.survivors == [u for u in range(12) if u != 2]
    want = np.zeros(100, np.uint32)
    for u in info.survivors:
        want += vals[u]
    assert np.array_equal(total, want)
    with pytest.raises(ProtocolError, match="consistency check: 7 signatures, 9 needed"):
        simulate_round(vals, threshold=7, active=True, dropouts=[0, 1, 2, 3, 4])
