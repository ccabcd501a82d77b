"""The secure-sum protocol: exact sums with dropouts at every stage, aborts below the threshold,
refusals, tampering and replays, parameter edges, fixed point and the uniformity of masked inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tapestry.secure import (Client, FixedPoint, ProtocolError, Server, check_parameters, parse, secure_sum,
                             simulate_round)
from tapestry.secure import shamir
from tapestry.secure.messages import Message
from tapestry.secure.protocol import mask_words


def ring_inputs(n, d, bits=32, seed=0):
    rng = np.random.default_rng(seed)
    dt = np.uint32 if bits == 32 else np.uint64
    return [rng.integers(0, np.iinfo(dt).max, size=d, dtype=dt, endpoint=True) for _ in range(n)]


def ring_sum(vals, ids):
    total = np.zeros_like(vals[0])
    for i in ids:
        total += vals[i]  # NumPy unsigned arithmetic wraps mod 2^bits
    return total


CASES = [  # n, t, k, dropouts
    (5, 3, None, ()),
    (5, 5, None, ()),                                                  # t = n
    (7, 4, None, {0: "advertise", 3: "share", 5: "mask"}),             # t just above n/2
    (8, 5, None, {1: "mask", 2: "unmask", 6: "unmask"}),
    (10, 4, 6, {2: "advertise", 4: "mask", 9: "unmask"}),              # SecAgg+
    (12, 7, 11, {0: "mask", 11: "mask", 5: "unmask"}),                 # k = n - 1
    (16, 4, 6, {3: "share", 8: "mask", 12: "unmask"}),
    (16, 3, 4, {8: "mask"}),
]


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("n,t,k,drop", CASES)
def test_ring_sum_is_exact(n, t, k, drop, bits):
    d = 37 if bits == 64 else 1001
    vals = ring_inputs(n, d, bits, seed=n + t)
    total, info = simulate_round(vals, threshold=t, neighbours=k, dropouts=drop, seed=3, return_info=True)
    dropped_before_input = {u for u, s in dict(drop).items() if s != "unmask"}
    assert info.survivors == [u for u in range(n) if u not in dropped_before_input]
    assert total.dtype == vals[0].dtype
    assert np.array_equal(total, ring_sum(vals, info.survivors))


def test_dropouts_default_to_after_masking():
    vals = ring_inputs(6, 50)
    total, info = simulate_round(vals, threshold=4, dropouts=[1, 4], return_info=True)
    assert info.dropped == {1: "mask", 4: "mask"} and info.survivors == [0, 2, 3, 5]
    assert np.array_equal(total, ring_sum(vals, [0, 2, 3, 5]))


@pytest.mark.parametrize("bits,dtype", [(32, torch.float32), (64, torch.float32), (32, torch.bfloat16),
                                        (64, torch.float64)])
def test_float_sum_decodes_exact_fixed_point_sum(bits, dtype):
    n, d = 9, 513
    X = (torch.randn(n, d, generator=torch.Generator().manual_seed(0)) * 0.4).to(dtype)
    X[0, :5] = torch.tensor([5.0, -5.0, 1.0, -1.0, 0.0]).to(dtype)  # clipped
    got, info = simulate_round(X, threshold=5, dropouts=[3], clip=1.0, bits=bits, return_info=True)
    fp = info.fixed_point
    signed = np.int32 if bits == 32 else np.int64
    enc = [fp.encode(X[i]).view(signed).astype(object if bits == 64 else np.int64) for i in info.survivors]
    want = (np.sum(enc, axis=0) / fp.scale).astype(np.float64)
    assert np.array_equal(got.numpy(), want.astype(np.float32))
    plain = X[info.survivors].double().clamp(-1, 1).sum(0)
    assert float((got.double() - plain).abs().max()) <= len(info.survivors) * 0.5 / fp.scale + 1e-6


def test_fixed_point_cannot_overflow():
    for bits, n in ((32, 1), (32, 100), (32, 1000), (64, 100000)):
        fp = FixedPoint(n=n, clip=3.0, bits=bits)
        assert n * fp.bound <= 2 ** (bits - 1) - 1
        for v in (3.0, -3.0, 1e9):
            q = fp.encode(torch.full((4,), v, dtype=torch.float64))
            total = np.zeros(4, dtype=fp.dtype)
            for _ in range(n if n <= 1000 else 1):
                total += q
            if n <= 1000:
                assert np.allclose(fp.decode(total), n * float(np.clip(v, -3, 3)), rtol=1e-6)
    with pytest.raises(ValueError, match="scale"):
        FixedPoint(n=2**31, clip=1.0)
    with pytest.raises(ValueError, match="non-finite"):
        FixedPoint(n=2).encode(torch.tensor([0.0, float("nan")]))


def test_stochastic_rounding_is_unbiased():
    fp = FixedPoint(n=2**20, clip=1.0, rounding="stochastic")  # a coarse scale: 2^10
    x = torch.full((4096,), 0.3 / fp.scale + 7 / fp.scale, dtype=torch.float64)  # 7.3 steps
    q = fp.encode(x, seed=bytes(32)).view(np.int32)
    assert set(np.unique(q)) == {7, 8}
    frac = float((q == 8).mean())
    assert abs(frac - 0.3) < 5 * np.sqrt(0.3 * 0.7 / q.size)  # 5 sigma
    assert np.array_equal(q, fp.encode(x, seed=bytes(32)).view(np.int32))  # reproducible from the seed
    with pytest.raises(ValueError, match="seed"):
        fp.encode(x)


def _chi2_bytes_uniform(a: np.ndarray) -> bool:
    """Chi-square test of the byte histogram against uniform at p = 1e-4 (255 degrees of freedom;
    critical value by the Wilson-Hilferty approximation, z = 3.719)."""
    counts = np.bincount(a.view(np.uint8), minlength=256)
    expected = counts.sum() / 256
    stat = ((counts - expected) ** 2 / expected).sum()
    df, z = 255, 3.719
    critical = df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3
    return bool(stat < critical)


def test_masked_input_is_uniform():
    """A client's masked, mostly-zero update: its bytes pass a chi-square test, the plain input and
    a slightly biased stream fail it (the test can fail)."""
    q = np.zeros(8192, dtype=np.uint32)
    q[::3] = 7
    y = mask_words([bytes(range(32)), bytes(32)], [1, -1], q)
    assert _chi2_bytes_uniform(y)
    assert not _chi2_bytes_uniform(q)
    biased = y.copy()
    biased[: y.size // 8] &= 0xFEFEFEFE  # one bit forced to 0 in an eighth of the bytes
    assert not _chi2_bytes_uniform(biased)


def test_fewer_than_t_aborts_and_reveals_nothing():
    vals = ring_inputs(6, 20)
    with pytest.raises(ProtocolError, match="masked input: 3 clients responded, fewer than t=4"):
        simulate_round(vals, threshold=4, dropouts=[0, 1, 2])
    with pytest.raises(ProtocolError, match="advertise: 3 clients responded"):
        simulate_round(vals, threshold=4, dropouts={0: "advertise", 1: "advertise", 2: "advertise"})
    with pytest.raises(ProtocolError, match="unmasking: 3 clients responded"):
        simulate_round(vals, threshold=4, dropouts={0: "unmask", 1: "unmask", 2: "unmask"})


def _run_to_unmask(n=6, t=4, k=None, d=16):
    vals = ring_inputs(n, d)
    clients = [Client(i, vals[i]) for i in range(n)]
    server = Server(threshold=t, d=d, neighbours=k)
    for c in clients:
        server.receive(c.advertise())
    rosters = server.close_advertise()
    for c in clients:
        server.receive(c.share_keys(rosters[c.id]))
    fwd = server.close_share()
    return vals, clients, server, fwd


NOSIG = {"u3": [], "sig_ids": [], "sigs": []}


def test_client_refuses_both_secrets_of_one_peer():
    _, clients, server, fwd = _run_to_unmask()
    for c in clients:
        c.masked_input(fwd[c.id])
    bad = Message("unmask_request", 0, 0xFFFFFFFF, 1, {"survivors": [0, 1, 2, 3, 4], "dropped": [4, 5], **NOSIG}).to_bytes()
    with pytest.raises(ProtocolError, match=r"refuses to reveal both .* client\(s\) \[4\]"):
        clients[1].unmask(bad)
    lying = Message("unmask_request", 0, 0xFFFFFFFF, 2, {"survivors": [0, 1, 3, 4], "dropped": [2, 5], **NOSIG}).to_bytes()
    with pytest.raises(ProtocolError, match="lists this client as dropped"):
        clients[2].unmask(lying)


def test_server_splitting_requests_cannot_get_both_secrets():
    """A server telling some clients that client 0 survived and others that it dropped collects
    fewer than t shares of at least one of client 0's secrets, because t > holders / 2 and each
    client answers one request per round."""
    n, t = 7, 4
    _, clients, server, fwd = _run_to_unmask(n, t)
    for c in clients:
        c.masked_input(fwd[c.id])
    b_shares, s_shares = {}, {}
    for c in clients:
        survivors = list(range(n)) if c.id < 4 else list(range(1, n))
        dropped = [] if c.id < 4 else [0]
        req = Message("unmask_request", 0, 0xFFFFFFFF, c.id, {"survivors": survivors, "dropped": dropped,
                                                               **NOSIG}).to_bytes()
        resp = parse(c.unmask(req))
        flipped = Message("unmask_request", 0, 0xFFFFFFFF, c.id, {"survivors": list(range(1, n)) if c.id < 4
                          else list(range(n)), "dropped": [0] if c.id < 4 else [], **NOSIG}).to_bytes()
        with pytest.raises(ProtocolError, match="unexpected"):
            c.unmask(flipped)  # a second request (to flip the answer) is refused
        f = resp.fields
        b_shares.update((c.id + 1, s) for u, s in zip(f["self_ids"], f["self_shares"]) if u == 0)
        s_shares.update((c.id + 1, s) for u, s in zip(f["pair_ids"], f["pair_shares"]) if u == 0)
    assert len(b_shares) + len(s_shares) <= n
    assert min(len(b_shares), len(s_shares)) < t
    assert shamir.combine(b_shares, t) == clients[0].b  # the other secret stays out of reach


def test_tampered_share_is_rejected():
    _, clients, server, fwd = _run_to_unmask()
    msg = parse(fwd[2])
    boxes = list(msg.fields["boxes"])
    boxes[0] = boxes[0][:-1] + bytes([boxes[0][-1] ^ 1])
    msg.fields["boxes"] = boxes
    out = parse(clients[2].masked_input(msg.to_bytes()))  # the box does not open: a complaint, not a stop
    assert out.fields["complaints"] == [msg.fields["frm"][0]]
    assert msg.fields["frm"][0] not in clients[2].held


def test_replayed_messages_are_rejected():
    vals = ring_inputs(5, 8)
    # a share ciphertext from round 1 replayed into round 2: the AEAD binds the round
    old_clients = [Client(i, vals[i], round_id=1) for i in range(5)]
    old_server = Server(threshold=3, d=8, round_id=1)
    for c in old_clients:
        old_server.receive(c.advertise())
    r = old_server.close_advertise()
    for c in old_clients:
        old_server.receive(c.share_keys(r[c.id]))
    old_fwd = old_server.close_share()
    with pytest.raises(ProtocolError, match="round 1"):
        Server(threshold=3, d=8, round_id=2).receive(Message("advertise", 1, 0, 0xFFFFFFFF,
                                                             {"c_pk": bytes(32), "s_pk": bytes(32), "sig": b""}).to_bytes())
    replay = parse(old_fwd[0])
    replay.round_id = 2
    c = old_clients[0]
    c.round = 2  # the same keys, a new round: the old ciphertexts must not open
    with pytest.raises(ProtocolError, match=r"complaints about \[1, 2, 3, 4\]"):
        c.masked_input(replay.to_bytes())
    # the same message twice
    _, clients, server, fwd = _run_to_unmask()
    y = clients[0].masked_input(fwd[0])
    server.receive(y)
    with pytest.raises(ProtocolError, match="replayed"):
        server.receive(y)
    with pytest.raises(ProtocolError, match="unexpected forward"):
        clients[0].masked_input(fwd[0])
    with pytest.raises(ProtocolError, match="recipient"):
        clients[1].masked_input(fwd[2])


def test_large_payload_round_trips_without_copy():
    data = np.arange(600_000, dtype=np.uint32)
    msg = parse(Message("masked", 4, 3, 0xFFFFFFFF, {"bits": 32, "data": memoryview(data).cast("B"), "complaints": []}).to_bytes())
    assert (msg.round_id, msg.sender) == (4, 3)
    assert np.array_equal(np.frombuffer(msg.fields["data"], dtype="<u4"), data)


def test_malformed_messages_are_rejected():
    good = Message("masked", 0, 3, 0xFFFFFFFF, {"bits": 32, "data": bytes(40), "complaints": []}).to_bytes()
    assert parse(good).fields["data"] == bytes(40)
    for cut in range(len(good)):
        with pytest.raises(ProtocolError):
            parse(good[:cut])
    with pytest.raises(ProtocolError, match="magic"):
        parse(b"XXXX" + good[4:])
    with pytest.raises(ProtocolError, match="version"):
        parse(good[:4] + bytes([9]) + good[5:])
    with pytest.raises(ProtocolError, match="expected a shares"):
        parse(good, expect="shares")
    rng = np.random.default_rng(0)
    for bad, why in ((b"[" * 100000 + b"]" * 100000, "exceed 1024"), (b'{"bits": 1' + b"0" * 5000 + b"}", "exceed 1024"),
                     (b'{"bits": 1' + b"0" * 500 + b', "data": {"$b": 0}, "complaints": {"$b": 1}}', "bits must be an int"),
                     (b"[" * 500 + b"]" * 500, "must be a JSON object"), (b'{"bits": 3', "not valid JSON")):
        frame = bytearray(good)
        hlen = int.from_bytes(good[24:28], "little")  # header length field; the header starts at byte 32
        frame[24:28] = len(bad).to_bytes(4, "little")
        frame[32 : 32 + hlen] = bad
        with pytest.raises(ProtocolError, match=why):
            parse(bytes(frame))
    for _ in range(300):  # random byte flips: a ProtocolError or a valid message, never another error
        b = bytearray(good)
        b[int(rng.integers(len(b)))] ^= int(rng.integers(1, 256))
        try:
            parse(bytes(b))
        except ProtocolError:
            pass


def test_parameter_edges():
    assert check_parameters(5, 5, None) == 5           # t = n
    assert check_parameters(6, 4, None) == 6           # t just above n/2
    assert check_parameters(9, 5, 8) == 9              # k = n - 1
    with pytest.raises(ValueError, match=r"holders/2 < t <= holders with holders = n=6, got t=3"):
        check_parameters(6, 3, None)
    with pytest.raises(ValueError, match=r"holders/2 < t <= holders with holders = n=5, got t=6"):
        check_parameters(5, 6, None)
    with pytest.raises(ValueError, match=r"holders = k\+1=5, got t=6"):
        check_parameters(10, 6, 4)
    with pytest.raises(ValueError, match=r"1 <= k <= n - 1"):
        check_parameters(5, 3, 5)
    with pytest.raises(ValueError, match=r"n\*k even"):
        check_parameters(5, 3, 3)
    with pytest.raises(ValueError, match="n >= 2"):
        check_parameters(1, 1, None)
    vals = ring_inputs(6, 9)
    assert np.array_equal(simulate_round(vals, threshold=6), ring_sum(vals, range(6)))
    with pytest.raises(ValueError, match="dropout stage"):
        simulate_round(vals, threshold=4, dropouts={1: "later"})


def test_secure_sum_clips_norms():
    X = [torch.full((100,), 0.05), torch.full((100,), -0.01), torch.full((100,), 0.02)]
    got, info = secure_sum(X, norm_clip=0.2, return_info=True)
    want = torch.full((100,), 0.02) + torch.full((100,), -0.01) + torch.full((100,), 0.02)  # 0.5 -> 0.2 norm
    assert torch.allclose(got, want, atol=3 / info.fixed_point.scale)
    assert info.survivors == [0, 1, 2]
