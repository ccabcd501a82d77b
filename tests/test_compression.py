"""Delta compression: codec accuracy, unbiased stochastic rounding, error feedback, compression
ratios, round trips of every update form, and fused decode-and-aggregate against aggregating the
decoded updates (the kernels themselves: test_compression_kernels.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tapestry as tp
from tapestry import ops
from tapestry import reference as R
from tapestry.compression import Compressor, PayloadError, aggregate, decode, encode
from tapestry.compression.codecs import decode_flat, seed_key
from tapestry.compression.fused import Compressed, open_payloads
from tapestry.compression.wire import parse


def _backends():
    out = []
    for name in ("cpu", "triton"):
        if ops.unavailable_reason(name) is None:
            out.append(name)
    return out


BACKENDS = _backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _first_mismatch(a: torch.Tensor, b: torch.Tensor) -> str:
    bad = torch.nonzero(a.reshape(-1) != b.reshape(-1)).flatten()
    if bad.numel() == 0:
        return "equal"
    i = int(bad[0])
    return f"{bad.numel()} mismatches, first at {i}: {a.reshape(-1)[i].item()} vs {b.reshape(-1)[i].item()}"


def _hard_vector(d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Normal values with awkward content: a block of zeros, a block of tiny values, exact ties at
    half steps, and a huge common component in the last part."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d, generator=g) * 3
    if d >= 64:
        x[:16] = 0
        x[16:32] = 1e-31  # below 2^-96: scale 0
        x[32:48] = torch.arange(16) - 7.5
    if d >= 1000:
        x[-300:] += 1e3
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------
# accuracy


@pytest.mark.parametrize("codec,qmax", [("int8", 127), ("int4", 7)])
@pytest.mark.parametrize("d,block", [(1, 2), (7, 2), (7, 256), (1000, 2), (1000003, 256)])
def test_round_to_nearest_within_half_a_step(codec, qmax, d, block):
    x = _hard_vector(d, torch.float32, seed=3)
    y = decode(encode(x, codec, block=block, rounding="nearest"))
    nb = -(-d // block)
    pad = torch.zeros(nb * block)
    pad[:d] = x.abs()
    step = (pad.view(nb, block).amax(1) / qmax).repeat_interleave(block)[:d]
    err = (y - x).abs()
    # half a step, plus the float32 rounding of x * (1/scale) and of q * scale
    bound = 0.5 * step * (1 + 2e-5) + 2e-7 * x.abs() + 1e-30
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), f"index {worst}: x={x[worst].item()} decoded={y[worst].item()} step={step[worst].item()}"


@pytest.mark.parametrize("codec,qmax", [("int8", 127), ("int4", 7)])
def test_stochastic_rounding_is_unbiased(codec, qmax):
    """Over S seeds the mean of decode(encode(x)) converges to x. Per element the decoded value
    is floor or ceil of x/step; its standard deviation is step * sqrt(p (1 - p)). The test bounds
    the worst z-score over 2048 elements and the average signed error; round-to-nearest (biased)
    must fail the same bounds, which shows the test can fail."""
    d, S, block = 2048, 300, 64
    g = torch.Generator().manual_seed(11)
    x = torch.randn(d, generator=g)

    def stats(rounding):
        acc = torch.zeros(d, dtype=torch.float64)
        for s in range(S):
            acc += decode(encode(x, codec, block=block, rounding=rounding, seed=1000 + s)).double()
        mean = acc / S
        step = (x.abs().view(-1, block).amax(1).double() / qmax).repeat_interleave(block)
        frac = (x.double() / step) - torch.floor(x.double() / step)
        sd = step * torch.sqrt((frac * (1 - frac)).clamp(min=1e-3)) / math.sqrt(S)
        z = (mean - x.double()) / sd
        return z.abs().max().item(), (z.sum() / math.sqrt(d)).abs().item()

    zmax, zsum = stats("stochastic")
    assert zmax < 5.5, f"worst per-element z-score {zmax:.2f}"
    assert zsum < 4.0, f"average bias z-score {zsum:.2f}"
    zmax_rtn, _ = stats("nearest")
    assert zmax_rtn > 5.5, "the bound must reject a biased rounding"


def test_counter_generator_is_uniform_and_seed_dependent():
    j = torch.arange(1 << 16, dtype=torch.int64)
    u = R.quant_uniform(j, seed_key(5))
    counts = torch.histc(u, bins=16, min=0, max=1)
    expected = u.numel() / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 45, f"chi-square {chi2:.1f} over 15 degrees of freedom"  # p ~ 1e-4
    assert 0 <= float(u.min()) and float(u.max()) < 1
    v = R.quant_uniform(j, seed_key(6))
    assert abs(float(torch.corrcoef(torch.stack([u, v]))[0, 1])) < 0.02
    assert seed_key(5) != seed_key(6) and seed_key(0) != seed_key(1 << 32)


def test_encode_is_reproducible_and_seeded():
    x = torch.randn(5000)
    assert encode(x, "int8", seed=3) == encode(x, "int8", seed=3)
    assert encode(x, "int8", seed=3) != encode(x, "int8", seed=4)
    assert encode(x, "int4", rounding="nearest") == encode(x, "int4", rounding="nearest")
    assert parse(encode(x, "int8", seed=3)).stochastic and not parse(encode(x, "int8", rounding="nearest")).stochastic


@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8", "int4", "topk"])
def test_non_finite_updates_are_refused(codec):
    x = torch.ones(300)
    x[123] = float("nan")
    with pytest.raises(ValueError, match="123"):
        encode(x, codec)
    x[123] = float("inf")
    with pytest.raises(ValueError, match="123"):
        encode(x, codec)
    if codec in ("fp16", "bf16"):  # finite, but beyond the format's range
        x[123] = 1e6 if codec == "fp16" else 3.4e38
        with pytest.raises(ValueError, match=f"value 123 .* overflows {codec}"):
            encode(x, codec)


def test_bad_arguments():
    x = torch.ones(10)
    with pytest.raises(ValueError, match="unknown codec"):
        encode(x, "int3")
    with pytest.raises(ValueError, match="block"):
        encode(x, "int8", block=7)
    with pytest.raises(ValueError, match="block"):
        encode(x, "int4", block=8192)
    with pytest.raises(ValueError, match="rounding"):
        encode(x, "int8", rounding="up")
    with pytest.raises(ValueError, match="seed"):
        encode(x, "int8", seed=-1)
    with pytest.raises(ValueError, match="ratio"):
        encode(x, "topk", ratio=0)
    with pytest.raises(TypeError, match="int64 is not float32"):
        encode(torch.ones(3, dtype=torch.int64), "int8")
    with pytest.raises(TypeError, match="payload must be bytes"):
        decode("not bytes")


def test_topk_keeps_the_largest_magnitudes():
    x = torch.randn(10007)
    y = decode(encode(x, "topk", ratio=0.01))
    k = math.ceil(0.01 * 10007)
    kept = torch.nonzero(y).flatten()
    assert kept.numel() == k
    assert torch.equal(y[kept], x[kept])
    assert float(x.abs()[y == 0].max()) <= float(x.abs()[kept].min())
    assert torch.equal(decode(encode(x, "topk", k=1)), torch.where(x.abs() == x.abs().max(), x, torch.zeros(1)))


# ---------------------------------------------------------------------------------------------
# error feedback


@pytest.mark.parametrize("codec,options,tol,bound", [("int4", {}, 0.03, 0.5), ("topk", {"ratio": 0.01}, 0.6, 10.0)])
def test_error_feedback_tracks_the_sum_of_true_deltas(codec, options, tol, bound):
    """Four clients send compressed deltas (a common drift plus noise) for 50 rounds. With error
    feedback the true sum minus the decoded sum is exactly the residual; the residual stays below
    ``bound * |delta|`` (top-1% is a (k/d)-contraction: sqrt(d/k) = 10) and stops growing; the
    decoded sum tracks the true sum far better than the same run without feedback."""
    d, rounds = 20000, 50
    g = torch.Generator().manual_seed(2)
    drift = torch.randn(d, generator=g) * 0.1
    for client in range(4):
        comp = Compressor(codec, seed=client, **options)
        plain = Compressor(codec, seed=client, error_feedback=False, **options)
        true_sum = torch.zeros(d, dtype=torch.float64)
        sent = torch.zeros(d, dtype=torch.float64)
        sent_plain = torch.zeros(d, dtype=torch.float64)
        residual_norms, delta_norm = [], 0.0
        for _ in range(rounds):
            delta = drift + torch.randn(d, generator=g)
            true_sum += delta.double()
            sent += decode(comp.encode(delta)).double()
            sent_plain += decode(plain.encode(delta)).double()
            residual_norms.append(float(comp.residual.norm()))
            delta_norm = max(delta_norm, float(delta.norm()))
        # the invariant of error feedback: what was not sent yet is exactly the residual
        assert torch.allclose(true_sum - sent, comp.residual.double(), rtol=0, atol=1e-3)
        assert max(residual_norms) <= bound * delta_norm, f"client {client}: residual {max(residual_norms):.1f}"
        assert residual_norms[-1] <= 1.3 * residual_norms[rounds // 2 - 1], f"client {client}: residual still growing"
        rel = float((true_sum - sent).norm() / true_sum.norm())
        rel_plain = float((true_sum - sent_plain).norm() / true_sum.norm())
        assert rel < tol, f"client {client}: decoded sum is {rel:.3f} away from the true sum"
        assert rel < rel_plain / 1.5, f"error feedback ({rel:.3f}) should beat none ({rel_plain:.3f})"


def test_compressor_compress_forms_the_delta():
    local = {"w": torch.randn(4, 5), "b": torch.randn(5)}
    glob = {"w": torch.randn(4, 5), "b": torch.randn(5)}
    comp = Compressor("fp16")
    out = decode(comp.compress(local, glob))
    assert set(out) == {"w", "b"} and out["w"].shape == (4, 5)
    assert torch.allclose(out["w"], local["w"] - glob["w"], atol=1e-2)
    with pytest.raises(ValueError, match="unknown codec"):
        Compressor("zip")


# ---------------------------------------------------------------------------------------------
# wire format: ratios and round trips


def _model_like(seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    shapes = {"conv1.weight": (64, 3, 7, 7), "conv1.bias": (64,), "layer1.weight": (256, 1024),
              "layer2.weight": (1024, 512), "fc.weight": (10, 512), "fc.bias": (10,)}
    return {k: torch.randn(*s, generator=g) * 0.01 for k, s in shapes.items()}


def test_compression_ratios_on_a_realistic_model():
    sd = _model_like()
    raw = sum(v.numel() * 4 for v in sd.values())
    assert raw > 3_000_000
    ratios = {c: raw / len(encode(sd, c, seed=0)) for c in ("int8", "int4", "fp16", "bf16")}
    assert ratios["int8"] >= 3.9, ratios
    assert ratios["int4"] >= 7.5, ratios
    assert ratios["fp16"] >= 1.99 and ratios["bf16"] >= 1.99, ratios
    assert raw / len(encode(sd, "topk", ratio=0.01)) >= 45


@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8", "int4", "topk"])
def test_parameter_sets_round_trip_names_shapes_dtypes(codec):
    sd = {"a.weight": torch.randn(3, 4), "a.bias": torch.randn(4).half(), "b": torch.randn(2, 2, 2).bfloat16(),
          "scalar": torch.tensor(0.5), "empty": torch.empty(0, 3)}
    out = decode(encode(sd, codec, seed=1))
    assert list(out) == list(sd)
    for k in sd:
        assert out[k].shape == sd[k].shape and out[k].dtype == sd[k].dtype, k
    arrays = [np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32),
              np.ones(7, dtype=np.float16), np.float64(2.0) * np.ones((2, 2))]
    back = decode(encode(arrays, codec, seed=1))
    assert isinstance(back, list) and len(back) == 3
    for a, b in zip(arrays, back):
        assert isinstance(b, np.ndarray) and b.shape == a.shape and b.dtype == a.dtype
    t = torch.randn(6, 7)
    y = decode(encode(t, codec, seed=1))
    assert isinstance(y, torch.Tensor) and y.shape == (6, 7)
    v = np.arange(5, dtype=np.float32)
    assert isinstance(decode(encode(v, codec)), np.ndarray)


@pytest.mark.parametrize("codec", ["int8", "int4", "fp16", "bf16", "topk"])
def test_decode_into_a_reused_buffer(codec):
    x = _hard_vector(10007, torch.float32, seed=3)
    p = encode(x, codec, seed=4)
    assert type(p) is bytes
    buf = torch.full((10007,), float("nan"))
    got, spec = decode_flat(p, out=buf)
    assert got.data_ptr() == buf.data_ptr() and torch.equal(buf, decode_flat(p)[0])
    for bad in (torch.empty(10006), torch.empty(10007, dtype=torch.float64), torch.empty(2, 10007)[:, 0]):
        with pytest.raises(ValueError, match="out must be a contiguous float32 CPU tensor of d=10007 values"):
            decode_flat(p, out=bad)


def test_exact_codecs_round_trip_exactly():
    x = torch.randn(1001).half()
    assert torch.equal(decode(encode(x, "fp16")), x)
    xb = torch.randn(1001).bfloat16()
    assert torch.equal(decode(encode(xb, "bf16")), xb)
    assert torch.equal(decode(encode(torch.empty(0), "int8")), torch.empty(0))
    assert torch.equal(decode(encode(torch.zeros(9), "int4")), torch.zeros(9))


# ---------------------------------------------------------------------------------------------
# fused decode + aggregate


def _payloads(n, d, codecs, seed=0, common=0.0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g) + common
    return [encode(X[i], codecs[i % len(codecs)], seed=i, block=64) for i in range(n)]


RULES = [tp.Mean(), tp.TrimmedMean(f=2), tp.Median(), tp.Krum(f=2), tp.MultiKrum(f=2, m=4), tp.Bulyan(f=1),
         tp.GeometricMedian(), tp.NNM(f=1, rule=tp.TrimmedMean(f=1))]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_fused_aggregate_equals_aggregating_decoded_updates(rule):
    n, d = 9, 30011
    ps = _payloads(n, d, ["int8", "int4", "fp16", "topk", "bf16"], common=5.0)
    dense = torch.stack([decode(p) for p in ps])
    want, info_want = rule(dense, return_info=True)
    got, info = aggregate(ps, rule, return_info=True, block_bytes=n * 4 * 1024)  # many column blocks
    if info_want.selected is not None:
        assert info.selected == info_want.selected
    if rule.name in ("mean", "trimmed_mean", "median", "krum", "multi_krum", "bulyan"):
        assert torch.equal(got, want), _first_mismatch(got, want)
    else:
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("codec", ["int8", "int4", "fp16", "bf16"])
def test_fused_aggregate_of_one_codec_decodes_inside_the_selection(codec):
    """All payloads of one codec (int8, int4, fp16 or bf16): mean, trimmed mean, median, Bulyan, the geometric median's
    weighted means and (Multi-)Krum's Gram matrix run the fused cpu kernels (no decoded block) and
    still equal aggregating the decoded updates bit for bit."""
    n, d = 11, 20011
    ps = _payloads(n, d, [codec], common=-3.0)
    dense = torch.stack([decode(p) for p in ps])
    src = Compressed(open_payloads(ps))
    for rule in (tp.Mean(), tp.TrimmedMean(f=3), tp.Median(), tp.Bulyan(f=2), tp.GeometricMedian(), tp.Krum(f=2),
                 tp.MultiKrum(f=2, m=5)):
        got, info = aggregate(ps, rule, return_info=True)
        want, info_want = rule(dense, return_info=True)
        assert info.backend == "cpu" and torch.equal(got, want), f"{rule.name}: {_first_mismatch(got, want)}"
        assert info.selected == info_want.selected, rule.name
    assert src.fused("trimmed_mean") is not None and src.fused("gram") is not None
    with ops.backend("reference"):  # the reference would materialise every row: blocks instead
        assert src.fused("trimmed_mean") is None
        assert torch.equal(aggregate(ps, tp.TrimmedMean(f=3)), tp.trimmed_mean(dense, f=3))
    other = encode(dense[-1], codec, block=128) if codec in ("int8", "int4") else encode(dense[-1], "int8")
    mixed = Compressed(open_payloads(ps[:-1] + [other]))
    assert mixed.fused("trimmed_mean") is None  # two block sizes or codecs: decoded block by block


def test_fused_aggregate_by_name_and_parameter_set_form():
    sds = [_model_like(seed=i) for i in range(5)]
    ps = [encode(sd, "int8", seed=i) for i, sd in enumerate(sds)]
    out = aggregate(ps, "trimmed_mean", f=1)
    want = tp.trimmed_mean([decode(p) for p in ps], f=1)
    assert list(out) == list(sds[0])
    for k in out:
        assert torch.equal(out[k], want[k]), k
    w = [1.0, 2.0, 3.0, 4.0, 5.0]
    out = aggregate(ps, "mean", weights=w)
    want = tp.mean([decode(p) for p in ps], weights=w)
    assert all(torch.equal(out[k], want[k]) for k in out)


def test_fused_aggregate_rejects_mismatched_clients():
    a = encode({"w": torch.ones(4)}, "int8")
    b = encode({"v": torch.ones(4)}, "int8")
    c = encode({"w": torch.ones(5)}, "int8")
    with pytest.raises(PayloadError, match="client 1: key 'v' where client 0 has 'w'"):
        aggregate([a, b], "mean")
    with pytest.raises(PayloadError, match="client 1: payload holds d=5"):
        aggregate([a, c], "mean")
    with pytest.raises(PayloadError, match="client 2"):
        aggregate([a, a, a[:-1]], "mean")
    with pytest.raises(ValueError, match="trimmed_mean needs 2f < n"):
        aggregate([a, a], "trimmed_mean", f=1)


def test_fused_aggregate_peak_memory_is_about_one_update():
    """n = 16 int8 payloads of d = 2^21 values: aggregating them adds at most ~2 float32 updates
    of resident memory (the (d,) result and a cache-sized block), not n = 16."""
    from tapestry.bench.harness import peak_rss_reset, rss_kib

    if not peak_rss_reset():
        pytest.skip("/proc/self/clear_refs not writable here: cannot measure peak memory")
    n, d = 16, 1 << 21
    g = torch.Generator().manual_seed(0)
    ps = [encode(torch.randn(d, generator=g), "int8", seed=i) for i in range(n)]
    for rule in (tp.TrimmedMean(f=4), tp.Krum(f=3)):
        aggregate(ps[:2], tp.Mean())  # warm up allocator and kernels
        import gc

        gc.collect()
        before = rss_kib("VmRSS")
        peak_rss_reset()
        out = aggregate(ps, rule)
        extra_mib = (rss_kib("VmHWM") - before) / 1024
        one_update_mib = 4 * d / 2**20
        assert extra_mib < 2.5 * one_update_mib, f"{rule.name}: {extra_mib:.1f} MiB extra, one update is {one_update_mib:.0f} MiB"
        del out


def test_fresh_codec_buffers_ask_for_huge_pages():
    """Large fresh outputs (payloads, decoded updates) are advised onto transparent huge pages
    (tapestry._pages): the mapping behind a fresh 64 MiB tensor carries MADV_HUGEPAGE ("hg" in its
    VmFlags). Whether the kernel then finds free huge pages depends on the machine's memory
    fragmentation, not on us, so AnonHugePages is not asserted."""
    from tapestry import _pages

    try:
        mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
        open("/proc/self/smaps").close()
    except OSError:
        pytest.skip("no transparent huge pages or /proc/self/smaps on this system")
    if "[never]" in mode:
        pytest.skip("transparent huge pages are disabled on this system")

    def vm_flags(address: int) -> list[str]:
        inside = False
        for line in open("/proc/self/smaps"):
            head = line.split()
            if "-" in head[0] and ":" not in head[0]:  # a mapping's first line: start-end perms ...
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                inside = lo <= address < hi
            elif inside and head[0] == "VmFlags:":
                return head[1:]
        raise AssertionError(f"no mapping holds address {address:#x}")

    t = _pages.empty(16 << 20)  # 64 MiB
    t.fill_(1.0)
    assert "hg" in vm_flags(t.data_ptr() + (8 << 20)), "no MADV_HUGEPAGE on a fresh 64 MiB tensor"
    payload = _pages.empty_bytes(32 << 20)
    assert type(payload) is bytes and len(payload) == 32 << 20 and payload[:4] == bytes(4)
    assert float(t.sum()) == 16 << 20
    _pages.advise_huge_pages(12345, 3)  # odd or tiny ranges are ignored, never an error
