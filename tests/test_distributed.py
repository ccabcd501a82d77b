"""tapestry.distributed: streamed file aggregation (any chunk size) and sharding over gloo ranks
give what the in-memory rules give on the stacked updates."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import tapestry as tp
from tapestry.distributed.formats import check_layouts, open_input
from tapestry.distributed.job import Job, run_job
from tapestry.distributed.memory import plan
from tapestry.distributed.stream import FileColumns, aggregate_shard

BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float64: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (NaN == NaN), same dtype and shape."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


def make_clients(tmp_path, n, spec, *, seed=0, poison=True, common=0.0):
    """``n`` safetensors files of ``spec`` = {name: (shape, dtype)}; returns paths and state_dicts.
    With ``poison``: a NaN, an Inf and ties in client 0/1, so trimming and ranking matter."""
    g = torch.Generator().manual_seed(seed)
    paths, sds = [], []
    for i in range(n):
        sd = {}
        for name, (shape, dtype) in spec.items():
            t = common + torch.randn(shape, generator=g, dtype=torch.float64)
            if poison and t.numel() > 3:
                flat = t.view(-1)
                if i == 0:
                    flat[0], flat[1] = float("nan"), float("inf")
                if i in (1, 2):
                    flat[2] = 0.5  # a tie
            sd[name] = t.to(dtype).contiguous()
        p = tmp_path / f"client{i:02d}.safetensors"
        save_file(sd, str(p))
        paths.append(str(p))
        sds.append(sd)
    return paths, sds


SPEC_MIXED = {"layer.weight": ((33, 31), torch.float32), "layer.bias": ((7,), torch.float16),
              "emb": ((1, 5, 3), torch.bfloat16), "scale": ((1,), torch.float64), "empty": ((0, 3), torch.float32)}


def stream(paths, rule, chunk, read_ahead=True):
    files = [open_input(p) for p in paths]
    layout = check_layouts(files)
    src = FileColumns(files, layout, 0, layout.d, chunk)
    out = torch.full((layout.d,), float("nan"))

    def write(a, v):
        out[a : a + v.numel()] = v

    info = aggregate_shard(src, rule, write, read_ahead=read_ahead)
    for f in files:
        f.close()
    return out, info, layout


def unflatten(flat, layout):
    return {k.name: flat[layout.offsets[i] : layout.offsets[i + 1]].reshape(k.shape).to(k.dtype)
            for i, k in enumerate(layout.keys)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, "mixed"])
@pytest.mark.parametrize("rule", [tp.Mean(), tp.TrimmedMean(f=2), tp.Median()], ids=["mean", "trimmed", "median"])
def test_per_coordinate_rules_bit_identical_for_any_chunk(tmp_path, dtype, rule):
    spec = SPEC_MIXED if dtype == "mixed" else {"a": ((41, 25), dtype), "b": ((7,), dtype), "c": ((1,), dtype)}
    paths, sds = make_clients(tmp_path, 7, spec)
    want = rule(sds)  # the in-memory call on the same parameter sets
    for chunk in (1, 7, 1000, 10**6):
        flat, _, layout = stream(paths, rule, chunk, read_ahead=chunk != 7)
        got = unflatten(flat, layout)
        assert set(got) == set(want)
        for k in want:
            assert same_bits(got[k], want[k]), (chunk, k, got[k].flatten()[:5], want[k].flatten()[:5])


def test_stacked_call_matches_file_stream(tmp_path):
    """tp.<rule> on the stacked (n, d) tensor equals the streamed result, d = 1000003."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(5, 1000003, generator=g)
    X[3, 17] = float("-inf")
    paths = []
    for i in range(5):
        paths.append(str(tmp_path / f"c{i}.safetensors"))
        save_file({"v": X[i].contiguous()}, paths[-1])
    for rule in (tp.TrimmedMean(f=1), tp.Median()):
        flat, _, _ = stream(paths, rule, 65537)
        assert same_bits(flat, rule(X))


@pytest.mark.parametrize("rule", [tp.Krum(f=2), tp.MultiKrum(f=2, m=4), tp.Bulyan(f=1)], ids=["krum", "multi_krum", "bulyan"])
def test_distance_rules_select_same_clients_when_streamed(tmp_path, rule):
    spec = {"w": ((301, 29), torch.float32), "b": ((13,), torch.float16)}
    paths, sds = make_clients(tmp_path, 9, spec, common=1e3)  # huge common component
    want, want_info = rule(sds, return_info=True)
    for chunk in (1000, 4099):
        flat, info, layout = stream(paths, rule, chunk)
        assert info.selected == want_info.selected and info.nonfinite == want_info.nonfinite == [0]
        got = unflatten(flat, layout)
        for k in want:
            assert same_bits(got[k], want[k]), k


def test_nnm_streamed_matches_in_memory(tmp_path):
    rule = tp.NNM(2, tp.TrimmedMean(f=2))
    paths, sds = make_clients(tmp_path, 8, {"w": ((3001,), torch.float32)})
    want = rule(sds)["w"]
    flat, info, _ = stream(paths, rule, 999)
    assert info.nonfinite == [0]
    torch.testing.assert_close(flat, want, rtol=1e-6, atol=1e-6)


def test_run_job_writes_inputs_dtypes_and_is_atomic(tmp_path):
    paths, sds = make_clients(tmp_path, 6, SPEC_MIXED)
    out = tmp_path / "out" / "global.safetensors"
    out.parent.mkdir()
    res = run_job(Job(paths, str(out), tp.TrimmedMean(f=1), 1 << 20, progress=False))
    got, want = load_file(str(out)), tp.trimmed_mean(sds, f=1)
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in sds[0].items()}
    assert all(same_bits(got[k], want[k]) for k in want)
    assert res.d == sum(v.numel() for v in sds[0].values()) and res.n == 6
    assert os.listdir(out.parent) == ["global.safetensors"]  # no temporary file left


def test_interrupted_run_leaves_previous_output_untouched(tmp_path, monkeypatch):
    paths, _ = make_clients(tmp_path, 5, {"w": ((20000,), torch.float32)})
    out = tmp_path / "global.safetensors"
    out.write_bytes(b"previous round")
    from tapestry.distributed import formats

    calls = []

    def boom(self, start, values):
        calls.append(start)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, start, values)

    real = formats.OutputWriter.write
    monkeypatch.setattr(formats.OutputWriter, "write", boom)
    with pytest.raises(KeyboardInterrupt):
        run_job(Job(paths, str(out), tp.Median(), 5 * 4096 * 80, progress=False))
    assert len(calls) == 2 and out.read_bytes() == b"previous round"
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(p) for p in paths] + ["global.safetensors"])


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_plan_respects_budget_and_rejects_too_small(tmp_path, backend):
    from tapestry.distributed.memory import temp_bytes_per_value

    paths, _ = make_clients(tmp_path, 4, {"w": ((100000,), torch.float16)})
    files = [open_input(p) for p in paths]
    layout = check_layouts(files)
    with tp.backend(backend):
        per_column = 4 * (2 + temp_bytes_per_value("cpu")) + 16  # f16 block + temporaries + result
        ahead = plan(layout, 4, tp.Median(), 4 << 20, 0, 1, read_ahead=True)
        assert ahead.chunk == min(100000, (4 << 20) * 3 // 4 // (per_column + 4 * 2) // 64 * 64)
        assert (temp_bytes_per_value("cpu") == 32) == (backend == "reference" or "cpu" not in tp.available_backends())
        p = plan(layout, 4, tp.Median(), 4 << 20, 0, 1)
        assert 4096 <= p.chunk <= 100000 and (p.chunk % 64 == 0 or p.chunk == 100000) and p.per_chunk <= 4 << 20
        assert p.chunk == min(100000, (4 << 20) * 3 // 4 // per_column // 64 * 64)
        p1 = plan(layout, 4, tp.Median(), 4 << 20, 1, 3)
        assert (p1.lo, p1.hi) == (33280, 66624)  # multiples of 64 near d/3, 2d/3
        with pytest.raises(ValueError, match=r"--memory-budget .* too small: one chunk of 4096 columns of 4 clients"):
            plan(layout, 4, tp.Median(), 4096 * per_column - 1, 0, 1)
        krum_min = 4 * 100000 + 4096 * per_column  # its float32 result stays in memory
        with pytest.raises(ValueError, match=r"krum keeps this rank's 100000 aggregated values in memory"):
            plan(layout, 4, tp.Krum(f=0), krum_min - 1, 0, 1)
        assert plan(layout, 4, tp.Krum(f=0), krum_min, 0, 1).chunk == 4096
        assert plan(layout, 4, tp.Krum(f=0), krum_min + 40000 * per_column, 1, 2).chunk > 4096  # half the shard
    for f in files:
        f.close()


# -- bad input: a clear error, and nothing written -------------------------------------------------

def _header_file(path, header: dict | bytes, data: bytes = b"", hlen: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if hlen is None else hlen) + raw + data)
    return str(path)


def _bad_inputs(tmp_path):
    good, _ = make_clients(tmp_path, 3, {"w": ((8, 4), torch.float32), "b": ((4,), torch.float16)}, poison=False)
    cases = {
        "missing": ([*good, str(tmp_path / "nope.safetensors")], r"nope.safetensors: no such file"),
        "text": ([*good[:2], _write(tmp_path / "t.safetensors", b"hello, not a tensor file at all")],
                 r"t.safetensors: not a valid safetensors file: header length \d+ exceeds"),
        "short": ([*good[:2], _write(tmp_path / "s.safetensors", b"\x01\x00")], r"shorter than the 8-byte header length"),
        "header_past_end": ([*good[:2], _header_file(tmp_path / "h.safetensors", {}, hlen=4096)],
                            r"header length 4096 runs past the end of the 10-byte file"),
        "offsets_out": ([*good[:2], _header_file(tmp_path / "o.safetensors",
                                                 {"w": {"dtype": "F32", "shape": [8, 4], "data_offsets": [0, 128]}}, b"\0" * 64)],
                        r"key 'w': data_offsets \[0, 128\] outside the 64-byte data area"),
        "size_mismatch": ([*good[:2], _header_file(tmp_path / "m.safetensors",
                                                   {"w": {"dtype": "F32", "shape": [8, 4], "data_offsets": [0, 64]}}, b"\0" * 64)],
                          r"key 'w': 64 bytes for shape \[8, 4\] of F32 \(128 expected\)"),
        "overlap": ([*good[:2], _header_file(tmp_path / "v.safetensors",
                                             {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24)],
                    r"keys 'a' and 'b' overlap"),
        "duplicate": ([*good[:2], _header_file(tmp_path / "d.safetensors",
                                               b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                                               b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4)],
                      r"key 'a' appears twice"),
        "deep": ([*good[:2], _header_file(tmp_path / "n.safetensors", b"[" * 100000 + b"]" * 100000)],
                 r"nested too deeply"),
        "not_object": ([*good[:2], _header_file(tmp_path / "l.safetensors", b"[1, 2]")], r"header is a JSON list"),
        "int_dtype": ([*good[:2], _header_file(tmp_path / "i.safetensors",
                                               {"w": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8)],
                      r"key 'w' has dtype I64; only floating tensors"),
    }
    shape = _save(tmp_path / "shape.safetensors", {"w": torch.zeros(4, 8), "b": torch.zeros(4, dtype=torch.float16)})
    dtype = _save(tmp_path / "dtype.safetensors", {"w": torch.zeros(8, 4), "b": torch.zeros(4)})
    missing_key = _save(tmp_path / "mk.safetensors", {"w": torch.zeros(8, 4)})
    extra_key = _save(tmp_path / "ek.safetensors", {"w": torch.zeros(8, 4), "b": torch.zeros(4, dtype=torch.float16),
                                                    "z": torch.zeros(1)})
    cases.update({
        "shape": ([*good, shape], r"shape.safetensors: key 'w' has shape \[4, 8\], .*client00.safetensors has \[8, 4\]"),
        "dtype": ([*good, dtype], r"dtype.safetensors: key 'b' has dtype F32, .*client00.safetensors has F16"),
        "missing_key": ([*good, missing_key], r"mk.safetensors: key 'b' is missing"),
        "extra_key": ([*good, extra_key], r"ek.safetensors: key 'z' is not in"),
        "twice": ([*good, good[0]], r"an input file is given twice"),
    })
    return good, cases


def _write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def _save(path, sd):
    save_file(sd, str(path))
    return str(path)


def test_bad_inputs_raise_before_any_output(tmp_path):
    good, cases = _bad_inputs(tmp_path)
    outdir = tmp_path / "out"
    outdir.mkdir()
    for name, (inputs, message) in cases.items():
        with pytest.raises((ValueError, TypeError), match=message):
            run_job(Job(inputs, str(outdir / "g.safetensors"), tp.Mean(), 1 << 20, progress=False))
        assert os.listdir(outdir) == [], name
    with pytest.raises(ValueError, match="is also an input"):
        run_job(Job(good, good[1], tp.Mean(), 1 << 20))
    with pytest.raises(ValueError, match=r"trimmed_mean needs 2f < n, got n=3, f=2"):
        run_job(Job(good, str(outdir / "g.safetensors"), tp.TrimmedMean(f=2), 1 << 20))
    with pytest.raises(ValueError, match=r"krum needs n >= 2f\+3, got n=3, f=1"):
        run_job(Job(good, str(outdir / "g.safetensors"), tp.Krum(f=1), 1 << 20))
    with pytest.raises(ValueError, match="output directory .* does not exist"):
        run_job(Job(good, str(tmp_path / "no" / "g.safetensors"), tp.Mean(), 1 << 20))
    assert os.listdir(outdir) == []


def test_compressed_payload_files_match_fused_aggregate(tmp_path):
    """Payload files of mixed codecs stream like compression.aggregate; a safetensors file of the
    same model can sit beside them; a corrupted payload is an error naming the file."""
    from tapestry import compression

    g = torch.Generator().manual_seed(5)
    sds = [{"w": torch.randn(300, 7, generator=g), "b": torch.randn(13, generator=g).half()} for _ in range(6)]
    payloads, paths = [], []
    for i, (sd, codec) in enumerate(zip(sds, ["int8", "int4", "fp16", "topk", "bf16", "int8"])):
        payloads.append(compression.encode(sd, codec, seed=i, **({"block": 64} if i == 5 else {})))
        paths.append(_write(tmp_path / f"c{i}.tpz", payloads[-1]))
    for rule in (tp.TrimmedMean(f=1), tp.Krum(f=1)):
        want = compression.aggregate(payloads, rule)
        out = tmp_path / "g.safetensors"
        run_job(Job(paths, str(out), rule, 1 << 20, progress=False))
        got = load_file(str(out))
        assert all(got[k].dtype == sds[0][k].dtype and same_bits(got[k], want[k].to(got[k].dtype)) for k in want)
    dense = _save(tmp_path / "dense.safetensors", sds[0])
    mixed = [*paths[1:], dense]
    from tapestry.compression.codecs import decode_flat

    # decoded values stay float32 (as in the fused aggregate); the dense file's are cast to float32
    X = torch.stack([decode_flat(p)[0] for p in payloads[1:]] + [torch.cat([sds[0]["w"].flatten(), sds[0]["b"].float()])])
    agg = tp.trimmed_mean(X, f=1)
    run_job(Job(mixed, str(tmp_path / "m.safetensors"), tp.TrimmedMean(f=1), 1 << 20))
    got = load_file(str(tmp_path / "m.safetensors"))
    assert same_bits(got["w"], agg[:2100].reshape(300, 7)) and same_bits(got["b"], agg[2100:].half())
    broken = bytearray(payloads[0])
    broken[40] ^= 0xFF  # inside the spec: its CRC fails
    bad = _write(tmp_path / "bad.tpz", bytes(broken))
    with pytest.raises(ValueError, match=r"bad.tpz: invalid payload"):
        run_job(Job([*paths[1:], bad], str(tmp_path / "x.safetensors"), tp.Median(), 1 << 20))
    assert not (tmp_path / "x.safetensors").exists()


def test_pt_files_weights_only(tmp_path):
    import argparse

    ok = tmp_path / "ok.pt"
    torch.save({"w": torch.arange(10.0)}, str(ok))
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(10)], str(listed))
    hostile = tmp_path / "hostile.pt"
    torch.save({"w": torch.zeros(10), "x": argparse.Namespace(a=1)}, str(hostile))
    with pytest.raises(ValueError, match=r"list.pt: expected a flat \{name: tensor\} mapping"):
        open_input(str(listed))
    with pytest.raises(ValueError, match=r"hostile.pt: not a loadable .pt file with weights_only=True"):
        open_input(str(hostile))
    f = open_input(str(ok))
    out = torch.empty(3)
    f.read_into(f.keys[0], 4, 7, out)
    assert out.tolist() == [4.0, 5.0, 6.0]


def _raw_safetensors(path, items, pad=0):
    """A safetensors file with the data of ``items`` in the given order (and ``pad`` header bytes)."""
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    header, blobs, pos = {}, [], 0
    for name, t in items:
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + len(raw)]}
        blobs.append(raw)
        pos += len(raw)
    header["__metadata__"] = {"pad": "x" * pad}
    return _header_file(path, header, b"".join(blobs))


def test_files_with_other_offsets_and_data_order(tmp_path):
    """Same keys, shapes and dtypes, but other header lengths and data order: read by name."""
    g = torch.Generator().manual_seed(9)
    sds = [{"w": torch.randn(50, 3, generator=g), "b": torch.randn(5, generator=g).bfloat16()} for _ in range(5)]
    paths = [_raw_safetensors(tmp_path / f"c{i}.safetensors", list(sd.items())[:: 1 if i % 2 else -1], pad=17 * i)
             for i, sd in enumerate(sds)]
    run_job(Job(paths, str(tmp_path / "g.safetensors"), tp.Median(), 1 << 20))
    got, want = load_file(str(tmp_path / "g.safetensors")), tp.median(sds)
    assert all(same_bits(got[k], want[k]) for k in want)


@pytest.mark.parametrize("world", [2, 3, 5])
def test_any_number_of_shards_per_coordinate(tmp_path, world):
    """Every rank's plan and shard, run here one after the other (per-coordinate rules need no
    communication): the concatenated shards are bit-identical to the in-memory call."""
    paths, sds = make_clients(tmp_path, 6, {"w": ((1000, 7), torch.bfloat16), "b": ((3,), torch.bfloat16)})
    files = [open_input(p) for p in paths]
    layout = check_layouts(files)
    for rule in (tp.Median(), tp.TrimmedMean(f=2), tp.Mean()):
        out = torch.full((layout.d,), float("nan"))
        covered = 0
        for rank in range(world):
            pl = plan(layout, 6, rule, 1 << 20, rank, world)
            assert pl.lo == covered and pl.lo % 64 == 0  # contiguous, aligned shards
            covered = pl.hi
            src = FileColumns(files, layout, pl.lo, pl.hi, 640)  # several chunks per shard

            def write(a, v, lo=pl.lo):
                out[lo + a : lo + a + v.numel()] = v

            aggregate_shard(src, rule, write)
        assert covered == layout.d
        got, want = unflatten(out, layout), rule(sds)
        assert all(same_bits(got[k], want[k]) for k in want), rule
    for f in files:
        f.close()


def test_sharded_api_without_process_group_is_the_rule():
    from tapestry.distributed import aggregate

    g = torch.Generator().manual_seed(2)
    X = torch.randn(7, 333, generator=g)
    for rule in (tp.Krum(f=2), tp.TrimmedMean(f=1)):
        agg, info = aggregate(X, rule, return_info=True)
        want, want_info = rule(X, return_info=True)
        assert torch.equal(agg, want) and info.selected == want_info.selected
    with pytest.raises(TypeError, match="rule must be a tapestry rule object"):
        aggregate(X, "krum")
