"""Decoding is an attack surface: hostile payloads raise PayloadError, nothing else.

* hypothesis mutates valid payloads (bit flips, byte overwrites, truncation, extension, and header
  fields rewritten with a correct checksum so that every validator is reached);
* hand-written hostile headers and specs check the messages and that nothing is allocated for them;
* the C++ decoding kernels run under AddressSanitizer + UBSan (tests/asan_quant_harness.cpp) on the
  exact buffers the validated decoder hands them from thousands of fuzzed payloads, with every
  buffer in an allocation of exactly its size.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tapestry.compression import PayloadError, decode, encode
from tapestry.compression.wire import HEADER, parse

ROOT = Path(__file__).resolve().parent.parent

g = torch.Generator().manual_seed(0)
SEEDS = {
    "int8": encode(torch.randn(300, generator=g), "int8", block=64, seed=1),
    "int4": encode(torch.randn(301, generator=g), "int4", block=6, seed=1),
    "fp16": encode({"w": torch.randn(3, 5, generator=g), "b": torch.randn(5, generator=g)}, "fp16"),
    "bf16": encode([torch.randn(7, generator=g).numpy()], "bf16"),
    "topk": encode(torch.randn(1000, generator=g), "topk", k=9),
    "empty": encode(torch.empty(0), "int8"),
}


def _with_crc(raw: bytearray) -> bytes:
    """Recompute the header checksum, so a mutated header reaches the field validators."""
    spec_len = struct.unpack_from("<I", raw, 20)[0] if len(raw) >= 40 else 0
    if len(raw) >= 40:
        crc = zlib.crc32(bytes(raw[40 : 40 + spec_len]), zlib.crc32(bytes(raw[:32])))
        struct.pack_into("<I", raw, 32, crc)
    return bytes(raw)


def _check(payload: bytes) -> None:
    """decode either succeeds with a result of the declared size or raises PayloadError."""
    try:
        p = parse(payload)
    except PayloadError as exc:
        assert str(exc).startswith("invalid payload")
        return
    out = decode(payload)
    total = 0
    parts = out.values() if isinstance(out, dict) else out if isinstance(out, list) else [out]
    for t in parts:
        total += int(t.size) if hasattr(t, "size") and not callable(t.size) else t.numel()
    assert total == p.d


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("extend"), st.integers(1, 64), st.integers(0, 255)),
    st.tuples(st.just("field"), st.sampled_from([4, 6, 7, 8, 16, 20, 24, 36]), st.integers(0, 2**64 - 1)),
)


def _mutate(raw: bytes, muts) -> bytes:
    b = bytearray(raw)
    fix_crc = False
    for kind, a, v in muts:
        if kind == "flip" and b:
            b[a % len(b)] ^= 1 << v
        elif kind == "set" and b:
            b[a % len(b)] = v
        elif kind == "truncate":
            del b[a % (len(b) + 1) :]
        elif kind == "extend":
            b += bytes([v]) * a
        elif kind == "field" and len(b) >= 40:
            size = {4: 2, 6: 1, 7: 1, 8: 8, 16: 4, 20: 4, 24: 8, 36: 4}[a]
            b[a : a + size] = (v % (1 << (8 * size))).to_bytes(size, "little")
            fix_crc = True
    return _with_crc(b) if fix_crc else bytes(b)


@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(seed=st.sampled_from(sorted(SEEDS)), muts=st.lists(mutation, min_size=1, max_size=4))
def test_fuzzed_payloads_raise_only_payload_error(seed, muts):
    _check(_mutate(SEEDS[seed], muts))


@settings(max_examples=300, deadline=None, database=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_raise_payload_error(data):
    with pytest.raises(PayloadError):
        decode(data)
    with pytest.raises(PayloadError):
        decode(b"TPZC" + data)


def _header(codec=3, d=300, block=64, spec=b'{"form":"tensor","numpy":false,"shape":[300],"dtype":"float32"}', k=0,
            version=1, flags=0):
    head = bytearray(HEADER.pack(b"TPZC", version, codec, flags, d, block, len(spec), k, 0, 0))
    return _with_crc(head + spec)


@pytest.mark.parametrize("payload,message", [
    (b"", "truncated: 0 bytes"),
    (b"PK\x03\x04" + bytes(60), "bad magic"),
    (_header(version=2), "unsupported wire-format version 2"),
    (_header(codec=9), "unknown codec id 9"),
    (_header(flags=4), "unknown flag bits"),
    (_header(d=2**40, spec=b"{}"), "exceeds the format's limit"),
    (_header(block=0), "block size 0 must be even"),
    (_header(block=7), "block size 7"),
    (_header(codec=5, block=0, k=0), "topk k=0"),
    (_header(codec=5, block=0, k=1, d=2**31, spec=b"{}"), "more than 65536x"),
    (_header(d=2**32 - 1, spec=b"{}"), "length mismatch"),  # would be 4 GiB: refused before allocating
    (_header(), "length mismatch: header implies"),
    (_header(spec=b'{"form":"tensor","numpy":false,"shape":[299],"dtype":"float32"}'), "length mismatch"),
])
def test_hostile_headers(payload, message):
    with pytest.raises(PayloadError, match=message):
        decode(payload)


def _with_spec(spec: bytes, d=4) -> bytes:
    body = bytes(-len(spec) % 8) + bytes(2 * d)
    return _with_crc(bytearray(HEADER.pack(b"TPZC", 1, 1, 0, d, 0, len(spec), 0, 0, 0)) + spec) + body


@pytest.mark.parametrize("spec,message", [
    (b"[" * 100000 + b"]" * 100000, "not valid UTF-8 JSON"),
    (b"\xff\xfe", "not valid UTF-8 JSON"),
    (b"1" * 5000, "not valid UTF-8 JSON"),
    (b"[]", "must be a JSON object"),
    (b'{"form":"pickle","numpy":false}', "form"),
    (b'{"form":"tensor","numpy":1,"shape":[4],"dtype":"float32"}', "numpy"),
    (b'{"form":"tensor","numpy":false,"shape":[4],"dtype":"object"}', "dtype"),
    (b'{"form":"tensor","numpy":false,"shape":[2,3],"dtype":"float32"}', "holds 6 values"),
    (b'{"form":"tensor","numpy":false,"shape":[-4],"dtype":"float32"}', "shape sizes"),
    (b'{"form":"tensor","numpy":false,"shape":[1e400],"dtype":"float32"}', "shape sizes"),
    (b'{"form":"tensor","numpy":false,"shape":' + json.dumps([1] * 40).encode() + b',"dtype":"float32"}', "at most 32"),
    (b'{"form":"state_dict","numpy":false,"entries":[[1,[4],"float32"]]}', "keys must be strings"),
    (b'{"form":"state_dict","numpy":false,"entries":[["a",[2],"float32"],["a",[2],"float32"]]}', "duplicate key"),
    (b'{"form":"arrays","numpy":false,"entries":[[0,[4294967295],"float32"],[1,[4294967295],"float32"]]}', "more than"),
    (b'{"form":"arrays","numpy":false,"entries":[[0,[3],"float32"]]}', "hold 3 values"),
])
def test_hostile_specs(spec, message):
    with pytest.raises(PayloadError, match=message):
        decode(_with_spec(spec))


def test_hostile_data_sections():
    raw = bytearray(SEEDS["int8"])
    start = len(raw) - 300 - 4 * 5  # 5 float32 scales, then 300 codes
    for bad in (float("nan"), float("inf"), -1.0):
        b = bytearray(raw)
        struct.pack_into("<f", b, start + 8, bad)
        with pytest.raises(PayloadError, match="scale of block 2"):
            decode(bytes(b))
    topk = bytearray(SEEDS["topk"])
    idx_start = len(topk) - 8 * 9
    b = bytearray(topk)
    struct.pack_into("<I", b, idx_start + 4, 0)  # indices no longer increasing
    with pytest.raises(PayloadError, match="strictly increasing"):
        decode(bytes(b))
    b = bytearray(topk)
    struct.pack_into("<I", b, idx_start + 4 * 8, 1000)  # last index == d
    with pytest.raises(PayloadError, match="< d=1000"):
        decode(bytes(b))


def test_decoding_never_unpickles(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("decode must never unpickle")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    for raw in SEEDS.values():
        decode(raw)
        for cut in range(0, len(raw), 37):
            with pytest.raises(PayloadError):
                decode(raw[:cut])


def test_memoryview_and_bytearray_payloads_decode():
    raw = SEEDS["int8"]
    ref = decode(raw)
    assert torch.equal(decode(bytearray(raw)), ref)
    assert torch.equal(decode(memoryview(raw)), ref)
    assert torch.equal(decode(memoryview(b"xx" + raw)[2:]), ref)


# ---------------------------------------------------------------------------------------------
# the C++ kernels under AddressSanitizer


def _records_from_fuzzed_payloads(count: int) -> bytes:
    """Records for the harness: the kernel arguments the decoder derives from valid payloads
    among ``count`` random mutations of the int8/int4 seeds (data bytes and scales mutated), plus
    the aligned column ranges the fused aggregator reads."""
    import random

    rnd = random.Random(7)
    out = io.BytesIO()
    seeds = [SEEDS["int8"], SEEDS["int4"], encode(torch.randn(4097), "int4", block=4096, seed=3),
             encode(torch.randn(5), "int8", block=2, seed=3), encode(torch.randn(1), "int4", block=2, seed=3)]
    n_records = 0
    for i in range(count):
        raw = bytearray(seeds[i % len(seeds)])
        for _ in range(rnd.randint(1, 4)):  # mutate data bytes only (headers are covered above)
            pos = rnd.randrange(40, len(raw))
            raw[pos] = rnd.randrange(256)
        try:
            p = parse(bytes(raw))
        except PayloadError:
            continue
        op = 1 if p.codec == "int8" else 2
        for start in sorted({0, p.block * rnd.randrange(0, -(-p.d // p.block))}):
            stop = rnd.randint(start, p.d) if start else p.d
            m = stop - start
            q = p.values[start:stop] if op == 1 else p.values[start // 2 : (stop + 1) // 2]
            s = p.scales[start // p.block : -(-stop // p.block)]
            qb, sb = q.numpy().tobytes(), s.numpy().tobytes()
            out.write(struct.pack("<BQQQ", op, m, p.block, len(qb)) + qb + struct.pack("<Q", len(sb) // 4) + sb)
            n_records += 1
    return out.getvalue(), n_records


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the AddressSanitizer harness")
def test_cpp_kernels_under_address_sanitizer(tmp_path):
    exe = tmp_path / "asan_quant_harness"
    cmd = ["g++", "-std=c++17", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
           "-DTAPESTRY_REG_MAX=4",  # 4 unrolled networks instead of 32: the sanitized build stays short
           "-fno-omit-frame-pointer", "-fopenmp", f"-I{ROOT / 'csrc'}", str(ROOT / "tests" / "asan_quant_harness.cpp"),
           str(ROOT / "csrc" / "cpu" / "quant.cpp"), str(ROOT / "csrc" / "cpu" / "select.cpp"), str(ROOT / "csrc" / "cpu" / "mean.cpp"), str(ROOT / "csrc" / "cpu" / "gram.cpp"), "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    records, n = _records_from_fuzzed_payloads(2000)
    assert n > 500, "too few fuzzed payloads survived validation to exercise the kernels"
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:exitcode=66", OMP_NUM_THREADS="2")
    res = subprocess.run([str(exe)], input=records, capture_output=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    assert res.stdout.decode().split() == ["ok", str(n), "300"]
