"""Compression kernels on every backend, bit-identical to the reference: quantize / dequantize,
the fused decode-and-select kernels on every SIMD path, the GPU kernels, hostile codes."""

from __future__ import annotations

import pytest
import torch

from tapestry import ops
from tapestry import reference as R
from tapestry.compression.codecs import seed_key
from test_compression import BACKENDS, DTYPES, _first_mismatch, _hard_vector


# ---------------------------------------------------------------------------------------------
# kernels: bit-identical to the reference on every backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["quantize_int8", "quantize_int4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_matches_reference_bit_for_bit(backend, name, dtype):
    # the Triton interpreter runs one Python-level program per block: keep its sizes small
    sizes = [1, 7, 1000, 4099, 1000003] if backend == "cpu" else [1, 7, 333]
    for d in sizes:
        x = _hard_vector(d, dtype, seed=d)
        for block in ([2, 6, 256] if d < 5000 and backend == "cpu" else [6, 256] if d < 5000 else [256]):
            for key in (None, seed_key(d)):
                q_ref, s_ref = getattr(R, name)(x, block, key)
                with ops.backend(backend):
                    q, s = ops.call(name, x, block, key)
                assert q.dtype == q_ref.dtype and q.shape == q_ref.shape
                assert torch.equal(q, q_ref), f"{backend} {name} d={d} block={block} key={key}: {_first_mismatch(q, q_ref)}"
                assert torch.equal(s, s_ref), f"{backend} {name} d={d} block={block}: {_first_mismatch(s, s_ref)}"
                out = (torch.full_like(q, 3), torch.full_like(s, float("nan")))
                with ops.backend(backend):
                    got = ops.call(name, x, block, key, out=out)
                assert got[0] is out[0] and torch.equal(out[0], q_ref) and torch.equal(out[1], s_ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_dequantize_matches_reference_on_row_ranges(backend, codec):
    block, d, n = 6, 1003 if backend == "triton" else 100003, 3
    g = torch.Generator().manual_seed(1)
    qs, ss = [], []
    for i in range(n):
        q, s = getattr(R, "quantize_" + codec)(torch.randn(d, generator=g), block, seed_key(i))
        qs.append(q), ss.append(s)
    full = [torch.empty(d) for _ in range(n)]
    getattr(R, "dequantize_" + codec)(qs, ss, block, full)
    for i in range(n):  # the definition, element by element
        codes = qs[i].to(torch.int32) if codec == "int8" else torch.stack(
            [(qs[i].to(torch.int32) & 15) - 8, (qs[i].to(torch.int32) >> 4) - 8], 1).reshape(-1)[:d]
        assert torch.equal(full[i], codes.float() * ss[i].repeat_interleave(block)[:d])
    for start, stop in [(0, d), (6, 601), (block * 7, d), (block * 9, block * 9)]:
        got = [torch.full((stop - start,), float("nan")) for _ in range(n)]
        with ops.backend(backend):
            ops.call("dequantize_" + codec, qs, ss, block, got, start, device="cpu")
        for i in range(n):
            want = full[i][start:stop]
            assert torch.equal(got[i], want), f"row {i} [{start}, {stop}): {_first_mismatch(got[i], want)}"


def _encoded_rows(n: int, d: int, codec: str, block: int, seed: int = 0):
    """Payload rows (values, scales) of n clients with awkward content: per-row scales spanning
    2^40, exact ties across rows, a huge common component; hostile values: int8 code -128, scales
    near float32's max (whose products overflow to +-Inf, as decode gives them), and NaN/Inf in
    16-bit rows."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g) * torch.logspace(-20, 20, n, base=2.0)[torch.randperm(n, generator=g)][:, None]
    X[: n // 2, : d // 3] = X[0, : d // 3].clone()  # ties
    X[:, d // 2 :] += 1e3
    qs, ss = [], []
    for i in range(n):
        if codec in ("fp16", "bf16"):
            q, s = X[i].to(torch.float16 if codec == "fp16" else torch.bfloat16), None
            if i == n - 1 and d > 4:
                q[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        else:
            q, s = getattr(R, "quantize_" + codec)(X[i], block, seed_key(i) if i % 2 else None)
            if i == n - 1 and d > 4:
                if codec == "int8":
                    q[:3] = -128
                s[0] = 3.0e38
        qs.append(q), ss.append(s)
    return qs, ss


@pytest.mark.parametrize("codec", ["int8", "int4", "fp16", "bf16"])
@pytest.mark.parametrize("isa", ["avx512", "portable"])
def test_fused_partitioning_path_matches_the_reference_bit_for_bit(codec, isa):
    """Trimmed mean and median of many payload rows (the partitioning path, n >= 1024) decode
    inside the op with the same bits as the reference."""
    from tapestry import _native

    C = _native.require("_C")
    C.set_isa(isa)
    try:
        n, d, block = 1030, 90, 64
        qs, ss = _encoded_rows(n, d, codec, block, seed=n)
        for op, args in [("trimmed_mean_encoded", (257,)), ("trimmed_mean_encoded", (0,)), ("coord_median_encoded", ())]:
            want = getattr(R, op)(qs, ss, codec, block, d, *args)
            with ops.backend("cpu"):
                got = ops.call(op, qs, ss, codec, block, d, *args, device="cpu")
            nan = torch.isnan(want)
            assert torch.equal(torch.isnan(got), nan) and torch.equal(got[~nan], want[~nan]), \
                f"{op} {args}: {_first_mismatch(got, want)}"
    finally:
        C.set_isa("best")


@pytest.mark.parametrize("codec", ["int8", "int4", "fp16", "bf16"])
@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
def test_fused_select_kernels_match_the_reference_bit_for_bit(codec, isa):
    """The cpu backend's *_encoded ops (decode a tile inside the op) equal the reference (decode
    every row, then the op) bit for bit: register path (n <= 32) and tile path (n > 32),
    tile-straddling and odd d, blocks that straddle tiles and groups of lanes."""
    from tapestry import _native

    C = _native.require("_C")
    C.set_isa(isa)
    try:
        for n, d, block in [(1, 1, 2), (2, 7, 2), (5, 257, 6), (9, 1000, 4096), (32, 2053, 256), (33, 777, 100),
                            (40, 513, 64)]:
            qs, ss = _encoded_rows(n, d, codec, block, seed=n)
            rows = torch.arange(n - 1, -1, -2)
            k = max(1, rows.numel() // 2)
            w = torch.rand(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
            w[::3] = 0  # zero-weight rows are not read
            cases = [("weighted_mean_encoded", (w / w.sum() if w.sum() else w,)),
                     ("trimmed_mean_encoded", ((n - 1) // 2,)), ("trimmed_mean_encoded", (0,)),
                     ("coord_median_encoded", ()), ("mean_around_median_encoded", (rows, k))]
            for op, args in cases:
                want = getattr(R, op)(qs, ss, codec, block, d, *args)
                with ops.backend("cpu"):
                    got = ops.call(op, qs, ss, codec, block, d, *args, device="cpu")
                nan = torch.isnan(want)  # NaN from a NaN-sending client: same places, any NaN bits
                assert torch.equal(torch.isnan(got), nan) and torch.equal(got[~nan], want[~nan]), \
                    f"{op} n={n} d={d} block={block}: {_first_mismatch(got, want)}"
            # the Gram kernel is not bit-equal to the float64 reference (float32 products, see
            # gram.cpp), but decoding inside it must not change one bit of what it computes
            with ops.backend("cpu"):
                G = ops.call("gram_encoded", qs, ss, codec, block, d, device="cpu")
                G_dense = ops.call("gram", R._dequantized(qs, ss, codec, block, d))
            torch.testing.assert_close(G, G_dense, rtol=0, atol=0, equal_nan=True)
    finally:
        C.set_isa("best")


@pytest.mark.parametrize("codec,sizes", [("int8", [(2, 7, 2), (33, 40, 16)]), ("int4", [(5, 257, 6), (70, 9, 8)]),
                                         ("fp16", [(3, 50, 0)]), ("bf16", [(2, 9, 0)])])
def test_triton_fused_ops_match_the_reference_bit_for_bit(codec, sizes):
    """The Triton backend's *_encoded ops (interpreted on CPU tensors here, so sizes stay small)
    decode inside the selection, mean and Gram kernels with the reference's bits: odd d, blocks
    straddling column tiles, the >64-row tile path."""
    for n, d, block in sizes:
        qs, ss = _encoded_rows(n, d, codec, block, seed=n)
        rows = torch.arange(n - 1, -1, -2)
        k = max(1, rows.numel() // 2)
        w = torch.rand(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        w[::3] = 0
        cases = [("weighted_mean_encoded", (w / w.sum() if w.sum() else w,)), ("trimmed_mean_encoded", ((n - 1) // 2,)),
                 ("coord_median_encoded", ()), ("mean_around_median_encoded", (rows, k))]
        with ops.backend("triton"):
            for op, args in cases:
                want = getattr(R, op)(qs, ss, codec, block, d, *args)
                got = ops.call(op, qs, ss, codec, block, d, *args, device="cpu")
                nan = torch.isnan(want)
                assert torch.equal(torch.isnan(got), nan) and torch.equal(got[~nan], want[~nan]), \
                    f"{op} n={n} d={d} block={block}: {_first_mismatch(got, want)}"
            G = ops.call("gram_encoded", qs, ss, codec, block, d, device="cpu")
            G_dense = ops.call("gram", R._dequantized(qs, ss, codec, block, d))
        torch.testing.assert_close(G, G_dense, rtol=0, atol=0, equal_nan=True)
        with ops.backend("triton"), pytest.raises(ValueError, match="row 0 needs"):
            ops.call("coord_median_encoded", [q[:0] for q in qs], ss, codec, block, d, device="cpu")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fused_select_kernels_check_their_inputs(backend):
    if ops.unavailable_reason(backend):
        pytest.skip(ops.unavailable_reason(backend))
    qs, ss = _encoded_rows(3, 100, "int8", 10)
    call = lambda *a: ops.call("trimmed_mean_encoded", *a, device="cpu")
    with ops.backend(backend):
        with pytest.raises(ValueError, match="row 2 needs 100 contiguous 1-byte int8 values"):
            call(qs[:2] + [qs[2][:99]], ss, "int8", 10, 100, 1)
        with pytest.raises(ValueError, match="row 1 needs 10 contiguous float32 scales"):
            call(qs, [ss[0], ss[1][:9], ss[2]], "int8", 10, 100, 1)
        with pytest.raises(ValueError, match="codec must be one of"):
            call(qs, ss, "int3", 10, 100, 1)
        with pytest.raises(ValueError, match="block must be even"):
            call(qs, ss, "int8", 7, 100, 1)
        with pytest.raises(ValueError, match="0 <= 2f < n"):
            call(qs, ss, "int8", 10, 100, 2)
        with pytest.raises(ValueError, match="row 0 needs 100 contiguous 2-byte fp16 values"):
            call(qs, None, "fp16", 0, 100, 1)  # 1-byte rows are not float16 rows


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_gpu_kernels_match_reference_bit_for_bit(backend, codec):
    """On a GPU: the CUDA and Triton kernels give the reference's bytes (no FMA contraction,
    correctly rounded divisions), and decode row ranges exactly."""
    reason = ops.unavailable_reason(backend)
    assert reason is None, f"{backend} backend unavailable on a GPU machine: {reason}"
    for d in (1, 7, 1000003):
        for dtype in DTYPES:
            x = _hard_vector(d, dtype, seed=d).cuda()
            for block in (6, 256):
                for key in (None, seed_key(d)):
                    q_ref, s_ref = getattr(R, "quantize_" + codec)(x, block, key)
                    with ops.backend(backend):
                        q, s = ops.call("quantize_" + codec, x, block, key)
                    assert torch.equal(q, q_ref), f"{backend} d={d} {dtype} block={block}: {_first_mismatch(q.cpu(), q_ref.cpu())}"
                    assert torch.equal(s, s_ref)
                    ref, got = torch.empty(d, device="cuda"), torch.empty(d, device="cuda")
                    getattr(R, "dequantize_" + codec)([q], [s], block, [ref])
                    with ops.backend(backend):
                        ops.call("dequantize_" + codec, [q], [s], block, [got])
                    assert torch.equal(got, ref)


def test_hostile_codes_decode_without_error():
    """int4 nibble 0 (q = -8, never produced) and any int8 byte decode to q * scale."""
    packed = torch.tensor([0x00, 0xF0, 0x8F], dtype=torch.uint8)
    out = torch.empty(6)
    R.dequantize_int4([packed], [torch.tensor([2.0])], 6, [out])
    assert out.tolist() == [-16.0, -16.0, -16.0, 14.0, 14.0, 0.0]
    if "cpu" in BACKENDS:
        got = torch.empty(6)
        with ops.backend("cpu"):
            ops.call("dequantize_int4", [packed], [torch.tensor([2.0])], 6, [got], device="cpu")
        assert torch.equal(got, out)
