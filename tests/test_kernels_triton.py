"""Triton kernels (tapestry_kernels) against the float64 reference.

Without a GPU they run under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py sets it), so
sizes stay small; the same tests run on CUDA tensors where a GPU exists, plus GPU-only sizes.
"""

import os

import pytest
import torch

import tapestry as tp
from tapestry import ops, reference
from checks import DEVICE, DTYPES, assert_close, direct_distances, distances, infinite_median_columns, make


from tapestry_kernels import gram as tgram  # noqa: E402
from tapestry_kernels import mean as tmean  # noqa: E402
from tapestry_kernels import select as tselect  # noqa: E402

# ---------------------------------------------------------------------------------------------
# per-coordinate selection


# every power-of-two bucket up to 64, and n = 65 (the path above the register networks)
SELECT_CASES = [(n, dt) for n in [1, 2, 3, 5, 8, 13, 32, 33, 64] for dt in DTYPES] + [(65, torch.float32)]


@pytest.mark.parametrize("n,dtype", SELECT_CASES, ids=str)
def test_trimmed_mean_and_median(n, dtype):
    f = (n - 1) // 3
    X = make(n, 7, seed=n, dtype=dtype, nonfinite=min(f, 3))  # at most f non-finite per column
    assert_close(tselect.trimmed_mean(X, f), reference.trimmed_mean(X, f), X, what=f"trimmed_mean n={n} f={f}")
    assert_close(tselect.coord_median(X), reference.coord_median(X), X, what=f"coord_median n={n}")
    if f > 0:  # docs/spec.md: with at most f non-finite values per coordinate the result is finite
        assert bool(torch.isfinite(tselect.trimmed_mean(X, f)).all())


@pytest.mark.parametrize("d", [1, 7, 129])
def test_selection_awkward_widths_and_strides(d):
    X = make(9, d, seed=d, common=1e3)  # a huge common component: accuracy scales with the range
    assert_close(tselect.trimmed_mean(X, 2), reference.trimmed_mean(X, 2), X, what=f"d={d}")
    assert_close(tselect.coord_median(X), reference.coord_median(X), X, what=f"d={d}")
    wide = make(9, d + 5, seed=d)
    view = wide[:, 3 : 3 + d]  # row stride != d, offset start
    assert_close(tselect.trimmed_mean(view, 3), reference.trimmed_mean(view, 3), view, what="strided")


def test_selection_all_trim_levels():
    n = 12
    X = make(n, 5, seed=3)
    for f in range(0, (n - 1) // 2 + 1):
        assert_close(tselect.trimmed_mean(X, f), reference.trimmed_mean(X, f), X, what=f"f={f}")


def test_nonfinite_ranking():
    """-Inf < finite < +Inf < NaN: the ranks the kernel picks, checked on explicit columns."""
    nan, inf = float("nan"), float("inf")
    X = torch.tensor([[nan, inf, -inf, 1.0, -0.0],
                      [2.0, 2.0, 3.0, nan, 0.0],
                      [-inf, 1.0, 4.0, inf, -1.0],
                      [5.0, nan, 2.0, 0.5, 1.0],
                      [1.0, 3.0, -inf, nan, -0.0]], device=DEVICE)
    assert_close(tselect.trimmed_mean(X, 1), reference.trimmed_mean(X, 1), X, what="trim 1")
    assert_close(tselect.coord_median(X), reference.coord_median(X), X, what="median")
    assert_close(tselect.trimmed_mean(X, 0), reference.trimmed_mean(X, 0), X, what="trim 0 (non-finite means)")
    assert torch.equal(tselect.trimmed_mean(X, 2).cpu(), torch.tensor([2.0, 3.0, 2.0, float("inf"), 0.0]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k", [(1, 1), (2, 1), (3, 2), (6, 2), (7, 3), (11, 3), (16, 7), (33, 9), (64, 1), (64, 63)])
def test_mean_around_median(m, k, dtype):
    n = m + 3
    X = make(n, 7, seed=m * 31 + k, dtype=dtype)
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(m))[:m].sort().values
    assert_close(tselect.mean_around_median(X, rows, k), reference.mean_around_median(X, rows, k), X,
                 what=f"m={m} k={k}")


def test_mean_around_median_ties_go_to_smaller():
    # median 1.5; 1 and 2 are equally close: k=1 takes 1 (window starts low)
    X = torch.tensor([[0.0], [1.0], [2.0], [3.0]], device=DEVICE)
    rows = torch.arange(4)
    assert tselect.mean_around_median(X, rows, 1).item() == 1.0
    assert tselect.mean_around_median(X, rows, 3).item() == 1.0  # {0, 1, 2} beats {1, 2, 3}
    assert_close(tselect.mean_around_median(X, rows, 3), reference.mean_around_median(X, rows, 3), X)


def test_infinite_median_takes_the_equal_infinities():
    X, want = infinite_median_columns()
    for k, expected in want.items():
        got = tselect.mean_around_median(X.to(DEVICE), torch.arange(5), k).cpu()
        assert torch.equal(got.nan_to_num(7.0), torch.tensor(expected).nan_to_num(7.0)), (k, got)


def test_selection_is_deterministic_and_blocking_free():
    X = make(9, 150, seed=5, nonfinite=2)
    a = tselect.trimmed_mean(X, 2)
    assert torch.equal(a, tselect.trimmed_mean(X, 2))  # same bits on a second run
    part = tselect.trimmed_mean(X[:, 77:141], 2)  # other blocking and alignment
    assert torch.equal(a[77:141], part)


# ---------------------------------------------------------------------------------------------
# weighted mean


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", [(1, 1), (4, 7), (33, 1000), (70, 3)])
def test_weighted_mean(n, d, dtype):
    X = make(n, d, seed=n + d, dtype=dtype, common=1e3)
    w = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(n)) + 0.1
    w /= w.sum()
    assert_close(tmean.weighted_mean(X, w), reference.weighted_mean(X, w), X, what=f"n={n} d={d}")


def test_weighted_mean_never_reads_zero_weight_rows():
    X = make(5, 9, seed=1)
    X[1] = float("nan")
    X[3] = float("inf")
    w = torch.tensor([0.5, 0.0, 0.25, 0.0, 0.25], dtype=torch.float64)
    out = tmean.weighted_mean(X, w)
    assert bool(torch.isfinite(out).all())
    assert_close(out, reference.weighted_mean(X, w), X)
    w[3] = 0.25
    w[4] = 0.0
    assert bool(torch.isinf(tmean.weighted_mean(X, w)).all())  # a read Inf client propagates


def test_weighted_mean_is_deterministic():
    X = make(17, 513, seed=2)
    w = torch.full((17,), 1 / 17, dtype=torch.float64)
    assert torch.equal(tmean.weighted_mean(X, w), tmean.weighted_mean(X, w))


# ---------------------------------------------------------------------------------------------
# centred Gram matrix (compared through distances: the shift is not the reference's)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", [(1, 5), (2, 1), (7, 300), (33, 257), (70, 40)])
def test_gram_distances_with_huge_common_component(n, d, dtype):
    X = make(n, d, seed=n * d, dtype=dtype, common=1e3, ties=False)
    G = tgram.gram(X)
    assert G.dtype == torch.float64 and G.shape == (n, n)
    D, ref = distances(G.cpu()), direct_distances(X)
    scale = ref.abs().max().clamp(min=1e-300)
    assert float((D - ref).abs().max() / scale) <= 1e-4, "relative distance error above docs/spec.md's 1e-4"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN matmul
def test_gram_nonfinite_rows_stay_in_their_row_and_column():
    X = make(6, 50, seed=4, ties=False)
    X[2, 7] = float("nan")
    X[4, 0] = float("inf")
    D = distances(tgram.gram(X).cpu())
    bad = torch.tensor([2, 4])
    good = torch.tensor([0, 1, 3, 5])
    assert not bool(torch.isfinite(D[bad][:, bad]).any())
    ref = direct_distances(X[good])
    assert float((D[good][:, good] - ref).abs().max() / ref.max()) <= 1e-4


def test_gram_is_deterministic():
    X = make(9, 700, seed=8)
    assert torch.equal(tgram.gram(X), tgram.gram(X))


# ---------------------------------------------------------------------------------------------
# through the op table and the rules


def test_rules_on_forced_triton_match_reference():
    X = make(11, 40, seed=12, common=1e3, ties=False)
    X[0] += 5.0
    for rule in [tp.TrimmedMean(f=2), tp.Median(), tp.Mean(), tp.Krum(f=2), tp.MultiKrum(f=2, m=5), tp.Bulyan(f=2)]:
        with tp.backend("reference"):
            want, info_ref = rule(X.cpu(), return_info=True)
        with tp.backend("triton"):
            got, info = rule(X, return_info=True)
        assert info.backend == "triton"
        assert info.selected == info_ref.selected, rule
        assert_close(got, want, X, what=repr(rule))


def test_triton_forced_without_interpreter_on_cpu_names_the_device(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    X = torch.randn(5, 3)
    with tp.backend("triton"), pytest.raises(ops.BackendError, match=r"triton.*cpu"):
        tp.trimmed_mean(X, f=1)


def test_auto_never_picks_the_interpreter_for_cpu_tensors():
    name, _ = ops.resolve("trimmed_mean", "cpu")
    assert name != "triton"


# ---------------------------------------------------------------------------------------------
# GPU only: sizes the interpreter cannot afford, and devices


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_large_d(dtype):
    X = make(32, 1_000_003, seed=1, dtype=dtype, nonfinite=3, device="cuda")
    assert_close(tselect.trimmed_mean(X, 8), reference.trimmed_mean(X, 8), X, what="trimmed_mean")
    assert_close(tselect.coord_median(X), reference.coord_median(X), X, what="median")
    w = torch.full((32,), 1 / 32, dtype=torch.float64)
    w[:3] = 0.0
    w /= w.sum()
    assert_close(tmean.weighted_mean(X, w), reference.weighted_mean(X, w), X, what="weighted_mean")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_second_device():
    X = make(9, 1001, seed=2, device="cuda:1")
    with tp.backend("triton"):
        out = tp.trimmed_mean(X, f=2)
    assert out.device == X.device
    assert_close(out, reference.trimmed_mean(X, 2), X)


# ---------------------------------------------------------------------------------------------
# compiled for Hopper without a GPU: the interpreter does not catch what only the compiler
# rejects (non-constexpr globals, unsupported ops or precisions), so CI compiles the kernels'
# main configurations for sm_90 ahead of time, in a process without TRITON_INTERPRET.

AOT_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tapestry_kernels import gram as G, hadamard as H, mean as M, select as S

target = GPUTarget("cuda", 90, 32)

def build(fn, sig, consts, aligned, **opts):
    names = list(sig)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}  # as for 16-byte aligned tensors
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=target, options=opts)
    return k.asm["ptx"]

# payload rows: plain values (CODEC 0) or packed int4 codes with float32 scales (2; int8, 1, is the
# same path without the nibble split and is compiled by the rank-window kernel)
CODECS = [("*fp32", 0), ("*u8", 2)]
window = {"X": "*fp32", "S": "*fp32", "out": "*fp32", "n": "i32", "d": "i32", "stride": "i32", "sstride": "i32",
          "block": "i32", "lo": "i32", "hi": "i32", "BLOCK_D": "constexpr", "NP": "constexpr", "CODEC": "constexpr"}
for dt, np_, codec in [("*fp32", 32, 0), ("*bf16", 64, 0), ("*fp16", 128, 0), ("*i8", 32, 1), ("*u8", 100, 2)]:
    block, np2, warps = S._shape(np_, 1 << 26)
    ptx = build(S._rank_window_kernel, dict(window, X=dt), {"BLOCK_D": block, "NP": np2, "CODEC": codec},
                ["X", "out", "d", "stride"], num_warps=warps)
    if dt == "*fp32" and "ld.global.v4" not in ptx:
        sys.exit("rank window: no 16-byte loads")
block, np2, warps = S._shape(32, 1 << 26, around=True)
for dt, codec in CODECS:
    build(S._mean_around_median_kernel, {"X": dt, "S": "*fp32", "rows": "*i64", "out": "*fp32", "m": "i32",
          "d": "i32", "stride": "i32", "sstride": "i32", "block": "i32", "k": "i32", "BLOCK_D": "constexpr",
          "NP": "constexpr", "CODEC": "constexpr"}, {"BLOCK_D": block, "NP": np2, "CODEC": codec},
          ["X", "out", "d", "stride"], num_warps=warps)
    ptx = build(M._weighted_mean_kernel, {"X": dt, "S": "*fp32", "rows": "*i64", "weights": "*fp64", "out": "*fp32",
                "m": "i32", "d": "i32", "stride": "i32", "sstride": "i32", "block": "i32", "BLOCK_D": "constexpr",
                "CODEC": "constexpr"}, {"BLOCK_D": 1024, "CODEC": codec}, ["X", "out", "d", "stride"], num_warps=4)
    if codec == 0 and "ld.global.v4" not in ptx:
        sys.exit("weighted mean: no 16-byte loads")
    gram_sig = {"X": dt, "S": "*fp32", "partial": "*fp64", "n": "i32", "d": "i32", "stride": "i32", "sstride": "i32",
                "block": "i32", "tiles": "i32", "BN": "constexpr", "BLOCK_D": "constexpr", "ROW_BLOCKS": "constexpr",
                "PRECISION": "constexpr", "CODEC": "constexpr"}
    for bn, rb in [(32, 1), (64, 2)]:
        build(G._gram_kernel, gram_sig, {"BN": bn, "BLOCK_D": 64, "ROW_BLOCKS": rb, "PRECISION": "tf32x3",
              "CODEC": codec}, ["X", "d", "stride"], num_warps=8 if bn == 64 else 4, num_stages=3)
# the Walsh-Hadamard transform: the block launch and a radix-16 row launch
build(H._block_kernel, {"X": "*fp32", "Y": "*fp32", "signs": "*i32", "scale": "fp32", "B": "constexpr",
      "LOG_B": "constexpr", "SIGNS_FIRST": "constexpr", "SCALE": "constexpr", "SIGNS_AFTER": "constexpr"},
      {"B": H.BLOCK, "LOG_B": H.BLOCK.bit_length() - 1, "SIGNS_FIRST": True, "SCALE": False, "SIGNS_AFTER": False},
      ["X", "Y", "signs"], num_warps=4)
build(H._rows_kernel, {"Y": "*fp32", "signs": "*i32", "scale": "fp32", "h": "i64", "RR": "constexpr",
      "LOG_RR": "constexpr", "WW": "constexpr", "SCALE": "constexpr", "SIGNS_AFTER": "constexpr"},
      {"RR": H.R, "LOG_RR": H.R.bit_length() - 1, "WW": H.W, "SCALE": True, "SIGNS_AFTER": True}, ["Y", "signs"],
      num_warps=4)
print("ok")
"""


def test_kernels_compile_for_sm90():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:] + res.stdout[-500:]
