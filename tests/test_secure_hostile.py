"""Hostile participants in a secure-sum round: one client at a time misbehaves in a
round of 20; the round completes with the exact sum of the others (or, for misbehaviour after
its masked input was accepted, of the survivors) and names the offender. Every case failed on
the code before this suite (the round aborted, or the sum came out wrong with no error)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tapestry.secure import ProtocolError, Server, simulate_round
from tapestry.secure.crypto import channel_key, commit, new_keypair, public_bytes, seal, tagger
from tapestry.secure.messages import Message, parse
from tapestry.secure.protocol import SHARE_HEAD

N, D, BAD = 20, 257, 7


def ring_inputs(n=N, d=D, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 2**32, size=d, dtype=np.uint64).astype(np.uint32) for _ in range(n)]


def ring_sum(vals, ids):
    total = np.zeros_like(vals[0])
    for i in ids:
        total += vals[i]
    return total


def signed(client, msg: Message) -> bytes:
    """What a hostile client can do: send any message under its own key (advertisements carry none)."""
    return msg.to_bytes(tagger(client.mac, client.round) if msg.kind != "advertise" else None)


def at(phase, cid, fn):
    """An intercept hook: client ``cid`` at ``phase`` sends ``fn(client, message)`` instead."""
    def hook(ph, c, data):
        return fn(c, parse(data)) if ph == phase and c.id == cid else [data]
    return hook


def edit(**changes):
    def fn(c, m):
        for k, v in changes.items():
            m.fields[k] = v(m.fields) if callable(v) else v
        return [signed(c, m)]
    return fn


def _short(f):
    return bytes(f["data"])[:-4]


def _dup(f):  # the first id twice, in place of the last (a longer list is refused before parsing)
    return f["self_ids"][:-1] + f["self_ids"][:1]


def _bad_box(c, m):  # a flipped byte in the box to the first holder: that holder cannot open it
    boxes = list(m.fields["boxes"])
    boxes[0] = boxes[0][:-1] + bytes([boxes[0][-1] ^ 1])
    m.fields["boxes"] = boxes
    return [signed(c, m)]


def _wrong_share(c, m):  # a well-formed 66-byte share that is not the one it was dealt
    shares = list(m.fields["self_shares"])
    shares[0] = os.urandom(65) + b"\0"
    m.fields["self_shares"] = shares
    return [signed(c, m)]


def _unrequested(c, m):  # also hands over a mask-key share of a survivor
    m.fields["pair_ids"] = m.fields["pair_ids"] + [m.fields["self_ids"][0]]
    m.fields["pair_shares"] = m.fields["pair_shares"] + [m.fields["self_shares"][0]]
    return [signed(c, m)]


def _twice_different(c, m):
    first = signed(c, m)
    m.fields["data"] = bytes(len(m.fields["data"]))
    return [first, signed(c, m)]


def _replayed(c, m):
    b = signed(c, m)
    return [b, b]


def _wrong_round(c, m):
    m.round_id += 1
    return [signed(c, m)]


# name -> (phase, hostile behaviour, is its input in the sum, where it is named)
CASES = {
    "short masked input": ("mask", edit(data=_short), False, "excluded"),
    "wrong ring width": ("mask", edit(bits=64), False, "excluded"),
    "complaint about a non-neighbour": ("mask", edit(complaints=lambda f: [BAD]), False, "excluded"),
    "two different masked inputs": ("mask", _twice_different, False, "excluded"),
    "message for another round": ("mask", _wrong_round, False, "rejected"),
    "malformed key": ("advertise", edit(c_pk=lambda f: f["c_pk"][:31]), False, "rejected"),
    "low-order key": ("advertise", edit(s_pk=bytes(32)), False, "rejected"),
    "low-order channel key": ("advertise", edit(c_pk=bytes([1]) + bytes(31)), False, "rejected"),
    "shares to the wrong holders": ("share", edit(to=lambda f: f["to"][::-1]), False, "excluded"),
    "share box that does not open": ("share", _bad_box, False, "accused"),
    "duplicate shares": ("unmask", edit(self_ids=_dup, self_shares=lambda f: f["self_shares"][:-1] + f["self_shares"][:1]),
                         True, "excluded"),
    "unrequested share": ("unmask", _unrequested, True, "excluded"),
    "wrong Shamir share": ("unmask", _wrong_share, True, "excluded"),
    "replayed message": ("mask", _replayed, True, None),
}


@pytest.mark.parametrize("k", [None, 8])
@pytest.mark.parametrize("case", list(CASES))
def test_one_hostile_client_of_20(case, k):
    phase, fn, counted, where = CASES[case]
    vals = ring_inputs(seed=len(case))
    t = N // 2 + 1 if k is None else 5
    total, info = simulate_round(vals, threshold=t, neighbours=k, seed=1, return_info=True,
                                 intercept=at(phase, BAD, fn))
    want = [u for u in range(N) if counted or u != BAD]
    assert info.survivors == want
    assert np.array_equal(total, ring_sum(vals, want))
    if where == "excluded":
        assert list(info.excluded) == [BAD]
    elif where == "rejected":
        assert info.rejected and all(f"claiming sender {BAD}" in r for r in info.rejected) and not info.excluded
    elif where == "accused":
        assert list(info.accused) == [BAD] and len(info.accused[BAD]) == 1
    else:
        assert not info.excluded and not info.rejected and not info.accused


def _forge_as(victim, phase):
    """Client 3 sends, before the victim's own message, one under the victim's id."""
    def hook(ph, c, data):
        if ph != phase or c.id != 3:
            return [data]
        m = parse(data)
        m.sender = victim
        if phase == "advertise":  # fresh keys of its own for the victim's slot
            m.fields.update(c_pk=public_bytes(new_keypair()), s_pk=public_bytes(new_keypair()))
        return [m.to_bytes(tagger(c.mac, c.round)) if phase != "advertise" else m.to_bytes(), data]
    return hook


@pytest.mark.parametrize("phase", ["share", "mask", "unmask"])
def test_forged_sender_is_discarded_and_the_real_message_counts(phase):
    vals = ring_inputs(seed=3)
    total, info = simulate_round(vals, threshold=11, return_info=True, intercept=_forge_as(5, phase))
    assert info.survivors == list(range(N)) and not info.excluded
    assert np.array_equal(total, ring_sum(vals, range(N)))
    assert len(info.rejected) == 1 and "claiming sender 5" in info.rejected[0] and "tag" in info.rejected[0]


def test_forged_advertisement():
    """Without identity keys the advertise stage is as good as the transport: two different
    advertisements for one id exclude that id (no wrong sum). With them, the forgery is discarded."""
    vals = ring_inputs(seed=4)
    total, info = simulate_round(vals, threshold=11, return_info=True, intercept=_forge_as(5, "advertise"))
    assert list(info.excluded) == [5] and "two different advertise" in info.excluded[5]
    assert info.survivors == [u for u in range(N) if u != 5]
    assert np.array_equal(total, ring_sum(vals, info.survivors))
    total, info = simulate_round(vals, threshold=5, neighbours=8, active=True, return_info=True,
                                 intercept=_forge_as(5, "advertise"))
    assert info.survivors == list(range(N)) and not info.excluded and "not signed" in info.rejected[0]
    assert np.array_equal(total, ring_sum(vals, range(N)))


def test_dealer_with_one_inconsistent_share_is_named():
    """Client 7 re-deals one holder a self-mask share off its polynomial (with a matching
    commitment, so the holder cannot tell): the server decodes with all shares, uses the
    polynomial most of them lie on and names client 7."""
    def deal(c, m):
        f = m.fields
        v = f["to"][0]
        share = os.urandom(65) + b"\0"
        plain = SHARE_HEAD.pack(c.id, v) + share + bytes(66)
        i = f["holders"].index(v)
        commits = list(f["commits"])
        commits[i] = commit(c.round, c.id, v, b"b", share) + commit(c.round, c.id, v, b"s", bytes(66))
        boxes = list(f["boxes"])
        boxes[0] = seal(channel_key(c.c_sk, c.c_pk[v], c.round, c.id, v), c.round, c.id, v, plain)
        f["commits"], f["boxes"] = commits, boxes
        return [signed(c, m)]
    vals = ring_inputs(seed=5)
    total, info = simulate_round(vals, threshold=11, return_info=True, intercept=at("share", BAD, deal))
    assert np.array_equal(total, ring_sum(vals, range(N)))
    assert list(info.excluded) == [BAD] and "off its polynomial" in info.excluded[BAD]


def test_roster_is_o_k():
    """SecAgg+ rosters list the k neighbours only: the same size at n = 20 and n = 400."""
    def roster_sizes(n, k=6):
        from tapestry.secure import Client
        server = Server(threshold=4, d=8, neighbours=k, clients=range(n))
        for i in range(n):
            server.receive(Client(i, np.zeros(8, np.uint32)).advertise())
        return {len(r) for r in server.close_advertise().values()}
    small, large = roster_sizes(20), roster_sizes(400)
    assert len(small) == len(large) == 1 and max(large) <= max(small) + 1  # "n": 400 is one digit longer


def test_oversized_message_is_refused_before_parsing():
    server = Server(threshold=3, d=16, neighbours=2, clients=range(4))
    junk = Message("advertise", 0, 1, 0xFFFFFFFF, {"c_pk": bytes(10**6), "s_pk": bytes(32), "sig": b""}).to_bytes()
    with pytest.raises(ProtocolError, match="more than the 4096 this stage allows"):
        server.receive(junk)
    many = Message("masked", 0, 1, 0xFFFFFFFF, {"bits": 32, "data": bytes(64), "complaints": list(range(50_000))})
    with pytest.raises(ProtocolError, match="at most 3 ids"):
        parse(many.to_bytes(), max_ids=3)


def test_hostile_errors_are_protocol_errors():
    """Every refusal is a ProtocolError naming the claimed sender, never a plain ValueError."""
    server = Server(threshold=3, d=16, clients=range(4))
    for fields in ({"c_pk": b"x" * 32, "s_pk": bytes(31), "sig": b""}, {"c_pk": bytes(32), "s_pk": bytes(32), "sig": b""}):
        with pytest.raises(ProtocolError) as exc:
            server.receive(Message("advertise", 0, 2, 0xFFFFFFFF, fields).to_bytes())
        assert type(exc.value) is ProtocolError and "claiming sender 2" in str(exc.value)
    server = Server(threshold=3, d=16, identities={i: os.urandom(32) for i in range(4)})
    with pytest.raises(ProtocolError, match="not signed"):
        server.receive(Message("advertise", 0, 2, 0xFFFFFFFF,
                               {"c_pk": public_bytes(new_keypair()),
                                "s_pk": bytes(32), "sig": bytes(64)}).to_bytes())


def test_parsing_memory_is_bounded():
    """A shares message a server of 1000 clients accepts, packed with the most ids and blobs
    allowed, the blobs empty: parsing it allocates at most 4x its size plus 1 MiB (tracemalloc).
    More blobs are refused before any is sliced."""
    import tracemalloc
    h = 1000
    ids = list(range(1000, 1000 + h))
    def shares(nboxes):
        return Message("shares", 0, 1, 0xFFFFFFFF, {"holders": ids, "commits": [b""] * h, "to": ids,
                                                    "boxes": [b""] * nboxes}).to_bytes()
    with pytest.raises(ProtocolError, match="3008"):
        parse(shares(40 * h), limit=4096 + h * 400, max_ids=h)
    msg = shares(2 * h + 6)
    tracemalloc.start()
    try:
        m = parse(msg, limit=4096 + h * 400, max_ids=h)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(m.fields["boxes"]) == 2 * h + 6
    assert peak <= 4 * len(msg) + (1 << 20), (peak, len(msg))
