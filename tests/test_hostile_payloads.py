"""Hostile compressed payloads: every one is a PayloadError, memory stays bounded."""

import random

import pytest
import torch

import tapestry as tp
from hostile import MiB, peak_growth, with_spec
from tapestry.compression import PayloadError, aggregate, decode, encode, fused
from tapestry.compression.wire import parse


def _fp16(d=4):
    return encode(torch.arange(float(d)), "fp16")


@pytest.mark.parametrize("spec", [
    {"form": "tensor", "numpy": False, "shape": [4], "dtype": ["float32"]},
    {"form": "tensor", "numpy": False, "shape": [4], "dtype": {"a": 1}},
    {"form": "state_dict", "numpy": False, "entries": [["a", [4], ["float32"]]]},
    {"form": ["tensor"], "numpy": False, "shape": [4], "dtype": "float32"},
    {"form": "state_dict", "numpy": False, "entries": [["a", [4], "float32"], ["b", [0, 2**32 - 1, 2**32 - 1], "float32"]]},
    {"form": "state_dict", "numpy": False, "entries": [["\ud800", [4], "float32"]]},
    {"form": "arrays", "numpy": False, "entries": [[True, [4], "float32"]]},
])
def test_malformed_specs_are_payload_errors(spec):
    with pytest.raises(PayloadError):
        decode(with_spec(_fp16(), spec))


def test_zero_size_tensor_with_overflowing_sizes():
    p = encode(torch.zeros(0), "fp16")
    with pytest.raises(PayloadError, match="non-zero sizes"):
        decode(with_spec(p, {"form": "tensor", "numpy": False, "shape": [1, 0] + [2**32 - 1] * 3, "dtype": "float32"}))
    # a legitimate empty shape still decodes
    assert decode(with_spec(p, {"form": "tensor", "numpy": False, "shape": [0, 2**32 - 1], "dtype": "float32"})).shape == (0, 2**32 - 1)


@pytest.mark.parametrize("codec,byte,value", [("int8", 0x80, None), ("int4", 0x08, None), ("int4", 0x80, None)])
def test_codes_outside_the_documented_range(codec, byte, value):
    x = torch.linspace(-1, 1, 512)
    p = bytearray(encode(x, codec, rounding="nearest", block=64))
    p[-1] = byte  # -128 (int8); a nibble of code -8 (int4, low or high)
    with pytest.raises(PayloadError, match=r"-128|-8"):
        decode(bytes(p))
    with pytest.raises(PayloadError, match="client 1"):
        aggregate([encode(x, codec, block=64), bytes(p)], "mean")
    # every code in range decodes within the block's absmax
    y = decode(encode(x, codec, rounding="nearest", block=64))
    assert float(y.abs().max()) <= 1.0


def test_mixed_block_sizes_keep_the_bounded_buffer():
    g = torch.Generator().manual_seed(1)
    n, d = 6, 300_007
    xs = [torch.randn(d, generator=g) for _ in range(n)]
    ps = [encode(x, "int8" if i % 3 else "int4", block=4096 if i % 2 else 4094, seed=i) for i, x in enumerate(xs)]
    block_bytes = 1 << 20
    src = fused.Compressed(fused.open_payloads(ps), block_bytes)
    assert src.cols * n * 4 <= block_bytes  # was lcm(4096, 4094) = 8384512 columns: n dense updates
    X = torch.stack([decode(p) for p in ps])
    for rule, kw, ref in [("mean", {}, tp.mean(X)), ("median", {}, tp.median(X)), ("krum", {"f": 1}, tp.krum(X, f=1))]:
        got = aggregate(ps, rule, block_bytes=block_bytes, **kw)
        assert torch.equal(got, ref), rule
    big = aggregate(ps, "median", block_bytes=64 << 20)  # a large buffer is not kept after the call
    assert torch.equal(big, tp.median(X))
    buf = getattr(fused._local, "buf", None)
    assert buf is None or buf.numel() * 4 <= fused.RETAIN_BYTES


def test_unaligned_reads_equal_aligned_decoding():
    x = torch.randn(10_001, generator=torch.Generator().manual_seed(2))
    for codec, block in [("int8", 4094), ("int4", 6), ("int8", 2)]:
        p = parse(encode(x, codec, block=block, seed=3))
        full = decode(encode(x, codec, block=block, seed=3))
        for start, stop in [(1, 5), (4093, 4100), (7, 10_001), (10_000, 10_001)]:
            out = torch.empty(stop - start)
            from tapestry.compression.codecs import decode_rows
            decode_rows([p], [out], start, stop)
            assert torch.equal(out, full[start:stop]), (codec, block, start, stop)


def test_spec_of_many_tiny_entries_stays_within_4x_plus_64mib(tmp_path):
    # ~8 MiB spec of minimal state_dict entries; the old parser kept ~40x the JSON
    n = 8 * MiB // 24
    entries = ",".join(f'["{i:x}",[0],"float32"]' for i in range(n)).encode()
    raw = b'{"form":"state_dict","numpy":false,"entries":[' + entries + b"]}"
    path = tmp_path / "p.bin"
    path.write_bytes(with_spec(encode(torch.zeros(0), "fp16"), raw))
    size = path.stat().st_size
    r = peak_growth(f"from tapestry.compression import decode\ndata = open({str(path)!r}, 'rb').read()",
                    "result = len(decode(data))")
    assert r["error"][0] == "PayloadError" and f"more than {65536 + size // 160} entries" in r["error"][1], r["error"]
    assert r["growth"] <= 4 * size + 64 * MiB, (r["growth"] / MiB, size / MiB)
    # the most entries a payload of that size may list: parsed and decoded within the bound
    n = 65536 + size // 160 - 1000
    raw = b'{"form":"state_dict","numpy":false,"entries":[' + ",".join(f'["{i:x}",[0],"float32"]' for i in range(n)).encode() + b"]}"
    path.write_bytes(with_spec(encode(torch.zeros(0), "fp16"), raw + b" " * (size - 48 - len(raw))))
    size = path.stat().st_size
    r = peak_growth(f"from tapestry.compression import decode\ndata = open({str(path)!r}, 'rb').read()",
                    "result = len(decode(data))")
    assert r["error"] is None and r["result"] == n
    assert r["growth"] <= 4 * size + 64 * MiB, (r["growth"] / MiB, size / MiB)


def test_weights_near_the_float_limit_do_not_zero_the_mean():
    X = torch.randn(3, 50, generator=torch.Generator().manual_seed(4), dtype=torch.float64).float()
    got = tp.mean(X[:2], weights=[1e308, 1e308])
    assert torch.equal(got, tp.mean(X[:2])) and bool(got.abs().sum() > 0)
    torch.testing.assert_close(tp.mean(X, weights=[1.5e308, 1.5e308, 1e-300]), tp.mean(X[:2]))
    for bad, who in [([1, float("inf"), 1], "client 1"), ([1, 1, float("nan")], "client 2"), ([-1, 1, 1], "client 0")]:
        with pytest.raises(ValueError, match=who):
            tp.mean(X, weights=bad)
    with pytest.raises(ValueError, match="sum of weights > 0"):
        tp.mean(X, weights=[0, 0, 0])


def _mutate(rng: random.Random, p: bytes) -> bytes:
    b = bytearray(p)
    kind = rng.randrange(4)
    if kind == 0 and b:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        b = b[: rng.randrange(len(b) + 1)]
    elif kind == 2:  # a spec mutation with a valid checksum
        doc = rng.choice([b'{"form":"tensor","numpy":false,"shape":[%d],"dtype":"float32"}' % rng.randrange(-2, 70),
                          b'{"form":"state_dict","numpy":false,"entries":[["a",[%d],"float16"]]}' % rng.randrange(70),
                          b'{"form":"arrays","numpy":true,"entries":[[0,[64],"bfloat16"]],"form":"x"}',
                          bytes(rng.randrange(256) for _ in range(rng.randrange(40)))])
        b = bytearray(with_spec(bytes(b), doc))
    else:  # data bytes only (CRC still valid)
        for _ in range(rng.randint(1, 16)):
            i = rng.randrange(40, len(b)) if len(b) > 40 else 0
            if b:
                b[i] = rng.randrange(256)
    return bytes(b)


def test_seeded_mutations_only_ever_raise_payload_error():
    rng = random.Random(13)
    x = torch.randn(64, generator=torch.Generator().manual_seed(5))
    seeds = [encode(x, c, block=8) if c in ("int8", "int4") else encode(x, c) for c in ("fp16", "bf16", "int8", "int4", "topk")]
    seeds.append(encode({"a": x[:30], "b": x[30:].double()}, "int8", block=6))
    ok = 0
    for _ in range(1500):
        p = _mutate(rng, rng.choice(seeds))
        try:
            y = decode(p)
            ok += 1
            if isinstance(y, torch.Tensor) and y.dtype == torch.float32 and y.numel() == 64:
                aggregate([p, p], "median")
        except PayloadError:
            pass
    assert ok > 50  # some mutations (data bytes) are valid payloads and decode
