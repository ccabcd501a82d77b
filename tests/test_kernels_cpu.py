"""The cpu backend's robust-aggregation kernels (csrc/cpu/select.cpp, gram.cpp, mean.cpp) against
the reference evaluated in float64.

Tolerance: tests/checks.py (one policy for every kernel and rule test).
"""

from __future__ import annotations

import pytest
import torch

import tapestry as tp
from tapestry import _native, ops, reference
from tapestry.backends import cpu
from checks import DTYPES, assert_close, assert_distances, direct_distances, distances, infinite_median_columns

C = _native.require("_C")  # the cpu backend is built by `make test`: its absence is a failure
NS = [1, 2, 3, 5, 8, 17, 32, 33, 64, 100]
DS = [1, 7, 1000, 4099]
feat = C.cpu_features()
SUPPORTED_ISAS = ["portable"] + (["avx2"] if feat["avx2"] and feat["fma"] else []) + \
    (["avx512"] if feat["avx512f"] and feat["avx512bw"] else [])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def data(n: int, d: int, dtype=torch.float32, seed: int = 0, kind: str = "normal", stride_pad: int = 0) -> torch.Tensor:
    """``(n, d)`` test updates; ``stride_pad > 0`` gives a view whose row stride is ``d + pad``."""
    g = _gen(seed)
    X = torch.randn(n, d + stride_pad, generator=g, dtype=torch.float64)
    if kind == "ties":  # few distinct values: many equal values per coordinate
        X = torch.randint(-2, 3, (n, d + stride_pad), generator=g).to(torch.float64)
    elif kind == "common":  # a common component 1e3 times the spread
        X = 1e3 * (1 + torch.rand(1, d + stride_pad, generator=g, dtype=torch.float64)) + X
    elif kind == "tiny":  # float16 subnormals and signed zeros
        X = X * 1e-6
        X[:, ::5] = 0.0
        X[::2, ::5] = -0.0
    X = X.to(dtype)
    return X[:, stride_pad // 2 : stride_pad // 2 + d] if stride_pad else X


def poison(X: torch.Tensor, rows: int, seed: int = 1) -> torch.Tensor:
    """Put NaN, +Inf and -Inf at random coordinates of the first ``rows`` rows (a copy)."""
    X = X.clone()
    g = _gen(seed)
    bad = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=X.dtype)
    for r in range(rows):
        mask = torch.rand(X.shape[1], generator=g) < 0.5
        X[r, mask] = bad[torch.randint(0, 3, (int(mask.sum()),), generator=g)]
    return X


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaN payloads included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def ref64(op: str, X: torch.Tensor, *args) -> torch.Tensor:
    return getattr(reference, op)(X.to(torch.float64), *args)


def trims(n: int) -> list[int]:
    return sorted({0, 1, (n - 1) // 4, (n - 1) // 2} & set(range((n + 1) // 2)))


# ---------------------------------------------------------------------------------------------
# per-coordinate ops against the float64 reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", NS)
def test_coordinate_ops_match_reference(n, dtype):
    for d in DS if n <= 33 else DS[:3]:
        for kind in ("normal", "ties", "common"):
            X = data(n, d, dtype, seed=n * 31 + d, kind=kind)
            for f in trims(n):
                assert_close(cpu.trimmed_mean(X, f), ref64("trimmed_mean", X, f), X, what=f"trimmed n={n} d={d} f={f} {kind}")
            assert_close(cpu.coord_median(X), ref64("coord_median", X), X, what=f"median n={n} d={d} {kind}")
            w = torch.rand(n, generator=_gen(d), dtype=torch.float64)
            assert_close(cpu.weighted_mean(X, w), ref64("weighted_mean", X, w), X, what=f"wmean n={n} d={d} {kind}")
            m = max(1, n - 2 * (n // 4))
            rows = torch.randperm(n, generator=_gen(n + d))[:m].sort().values
            for k in sorted({1, max(1, m - 2 * (n // 4)), m}):
                assert_close(cpu.mean_around_median(X, rows, k), ref64("mean_around_median", X, rows, k), X.index_select(0, rows), what=f"around median n={n} m={m} k={k} d={d} {kind}")


# Past the register networks: two sorted runs (select_runs.h, 32 < n <= 64) and, for float32,
# partitioning (select_wide.h: median from n = 512, trimmed mean from n = 1024).
WIDE_NS = [33, 48, 63, 64, 512, 1023, 1024, 1500]


def awkward_columns(kind: str, n: int, d: int, seed: int) -> torch.Tensor:
    """Columns built against a quickselect's pivots and tie handling."""
    X = data(n, d, seed=seed, kind="common" if kind == "common" else "normal")
    if kind == "sorted":
        X = X.sort(0).values
    elif kind == "reversed":
        X = X.sort(0, descending=True).values
    elif kind == "organ_pipe":  # ascending then descending: middle-of-three pivots at the extremes
        s = X.sort(0).values
        X = torch.cat([s[0::2], s[1::2].flip(0)])
    elif kind == "equal":
        X = X[:1].expand(n, d).clone()
    elif kind == "two_values":
        X = torch.where(X > 0.7, 1.0, -0.5)
    elif kind == "poison":
        X = poison(X, (n - 1) // 4)
    return X


@pytest.mark.parametrize("n", WIDE_NS)
@pytest.mark.parametrize("kind", ["normal", "common", "sorted", "reversed", "organ_pipe", "equal", "two_values", "poison"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_rows_match_reference(n, kind, dtype):
    X = awkward_columns(kind, n, 37, seed=n).to(dtype)
    for f in trims(n):
        assert_close(cpu.trimmed_mean(X, f), ref64("trimmed_mean", X, f), X, what=f"trimmed n={n} f={f} {kind}")
    assert_close(cpu.coord_median(X), ref64("coord_median", X), X, what=f"median n={n} {kind}")


@pytest.mark.parametrize("n", [48, 1024])
def test_many_rows_same_bits_on_every_isa_and_blocking(n, isa_cap):
    d = 301
    X = poison(data(n, d, kind="ties", seed=5), n // 5) + data(n, d, seed=6)
    f = n // 4 - 1
    results = {}
    for isa in SUPPORTED_ISAS:
        isa_cap(isa)
        results[isa] = (cpu.trimmed_mean(X, f), cpu.coord_median(X))
        cuts = [0, 1, 16, 17, 64, 200, d]
        parts = [(cpu.trimmed_mean(X[:, a:b], f), cpu.coord_median(X[:, a:b])) for a, b in zip(cuts, cuts[1:])]
        for i, name in enumerate(("trimmed_mean", "median")):
            assert same_bits(torch.cat([p[i] for p in parts]), results[isa][i]), f"{name} on {isa}: blocks differ"
    for isa, res in results.items():
        for got, want in zip(res, results[SUPPORTED_ISAS[0]]):
            assert same_bits(got, want), f"isa {isa} differs from portable"


@pytest.mark.parametrize("n,dtype", [(3, torch.float32), (5, torch.bfloat16), (4, torch.float16)], ids=str)
def test_large_d(n, dtype):
    d = 1_000_003
    X = data(n, d, dtype, seed=7)
    f = (n - 1) // 4
    assert_close(cpu.trimmed_mean(X, f), ref64("trimmed_mean", X, f), X, what=f"trimmed n={n} d={d}")
    assert_close(cpu.coord_median(X), ref64("coord_median", X), X, what=f"median n={n} d={d}")
    w = torch.rand(n, generator=_gen(1), dtype=torch.float64)
    assert_close(cpu.weighted_mean(X, w), ref64("weighted_mean", X, w), X, what=f"wmean n={n} d={d}")


def test_float16_subnormals_and_signed_zeros():
    for n in (4, 5, 33):
        X = data(n, 1000, torch.float16, seed=n, kind="tiny")
        assert bool((X != 0).any()) and bool((X.abs() < 6.1e-5).any())  # subnormals present
        for f in trims(n):
            assert_close(cpu.trimmed_mean(X, f), ref64("trimmed_mean", X, f), X, what=f"fp16 tiny n={n} f={f}")
        assert_close(cpu.coord_median(X), ref64("coord_median", X), X, what=f"fp16 tiny median n={n}")


def test_even_median_is_mean_of_middle_values():
    X = torch.tensor([[1.0, -5.0], [2.0, 7.0], [10.0, 0.0], [4.0, 1.0]])
    assert cpu.coord_median(X).tolist() == [3.0, 0.5]
    assert cpu.coord_median(X[:1]).tolist() == [1.0, -5.0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,f", [(3, 1), (5, 2), (8, 3), (17, 4), (32, 8), (33, 16), (64, 20), (100, 30)])
def test_nonfinite_in_up_to_f_rows_never_reach_the_output(n, f, dtype):
    X = poison(data(n, 1000, dtype, seed=n), f, seed=f)
    got = cpu.trimmed_mean(X, f)
    assert bool(torch.isfinite(got).all())
    assert_close(got, ref64("trimmed_mean", X, f), X, what=f"trimmed with {f} poisoned rows")
    if 2 * f < n:  # median: finite while the non-finite values are a minority on each side
        med = cpu.coord_median(X)
        assert bool(torch.isfinite(med).all())
        assert_close(med, ref64("coord_median", X), X, what=f"median with {f} poisoned rows")
    k = n - 2 * f
    got = cpu.mean_around_median(X, torch.arange(n), k)
    assert_close(got, ref64("mean_around_median", X, torch.arange(n), k), X, what="around median, poisoned")


def test_nan_ranks_above_inf():
    inf, nan = float("inf"), float("nan")
    X = torch.tensor([[nan, -inf], [inf, 1.0], [0.0, nan], [1.0, -inf], [2.0, 2.0]])
    # column 0 sorted: 0, 1, 2, inf, nan; column 1: -inf, -inf, 1, 2, nan
    assert cpu.coord_median(X).tolist() == [2.0, 1.0]
    assert cpu.trimmed_mean(X, 1).tolist() == [(1.0 + 2.0 + inf) / 3, (-inf + 1.0 + 2.0) / 3]
    assert cpu.trimmed_mean(X, 2).tolist() == [2.0, 1.0]


def test_infinite_median_takes_the_equal_infinities():
    X, want = infinite_median_columns()
    rows = torch.arange(5)
    for k, expected in want.items():
        for got in (cpu.mean_around_median(X, rows, k), reference.mean_around_median(X, rows, k)):
            assert torch.equal(got.nan_to_num(7.0), torch.tensor(expected).nan_to_num(7.0)), (k, got)


def test_weighted_mean_never_reads_zero_weight_rows():
    X = data(6, 777, seed=3)
    X[2] = float("nan")
    X[4, ::2] = float("inf")
    w = torch.tensor([0.1, 0.2, 0.0, 0.3, 0.0, 0.4], dtype=torch.float64)
    got = cpu.weighted_mean(X, w)
    assert bool(torch.isfinite(got).all())
    assert_close(got, ref64("weighted_mean", X, w), X, what="wmean skipping rows")
    w2 = w.clone()
    w2[4] = 0.5
    assert bool(torch.isinf(cpu.weighted_mean(X, w2)[::2]).all())  # a weighted non-finite row does propagate


# ---------------------------------------------------------------------------------------------
# gram


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", NS)
def test_gram_distances(n, dtype):
    for d in (1, 7, 1000, 20001):
        for kind in ("normal", "common", "ties"):
            X = data(n, d, dtype, seed=n + d, kind=kind)
            G = cpu.gram(X)
            assert G.dtype == torch.float64 and G.shape == (n, n)
            assert torch.equal(G, G.T)
            assert_distances(G, X, f"n={n} d={d} {kind} {dtype}")


def test_gram_common_component_relative_accuracy():
    """docs/spec.md: relative 1e-4 per distance with a common component 1e3 times the spread."""
    for n, d in ((5, 1), (32, 7), (17, 1000), (33, 100_003)):
        X = data(n, d, seed=d, kind="common")
        D, D0 = distances(cpu.gram(X)), direct_distances(X)
        off = ~torch.eye(n, dtype=torch.bool)
        err = ((D - D0).abs()[off] / D0[off]).max().item() if n > 1 else 0.0
        assert err <= 1e-4, f"n={n} d={d}: relative distance error {err:.3g}"


def test_gram_with_one_far_row_keeps_close_rows_accurate():
    # the first row (the kernel's first shift) is 1e4 spreads away from tightly clustered others
    X = data(9, 1000, seed=5, kind="common")
    X[0] += 1e2
    D, D0 = distances(cpu.gram(X)), direct_distances(X)
    err = ((D - D0).abs()[1:, 1:] / D0[1:, 1:].clamp(min=1e-30)).masked_fill(torch.eye(8, dtype=torch.bool), 0).max()
    assert err.item() <= 1e-4, err.item()


def test_gram_nonfinite_row_stays_in_its_row_and_column():
    X = data(7, 1000, seed=2)
    X[3, 10] = float("nan")
    X[5, 999] = float("inf")
    G = cpu.gram(X)
    bad = torch.tensor([3, 5])
    good = torch.tensor([0, 1, 2, 4, 6])
    assert not bool(torch.isfinite(G.diagonal()[bad]).any())
    assert bool(torch.isfinite(G[good][:, good]).all())
    assert_distances(G[good][:, good], X[good], "finite rows beside non-finite ones")


# ---------------------------------------------------------------------------------------------
# layout, blocking, determinism, SIMD paths


def _all_ops(X: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    f = (n - 1) // 4
    rows = torch.arange(0, n, 2) if n > 2 else torch.arange(n)
    return {
        "trimmed_mean": cpu.trimmed_mean(X, f),
        "coord_median": cpu.coord_median(X),
        "weighted_mean": cpu.weighted_mean(X, torch.linspace(0.5, 1.5, n, dtype=torch.float64)),
        "mean_around_median": cpu.mean_around_median(X, rows, max(1, len(rows) - 2)),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 5, 32, 33, 70])
def test_strided_rows(n, dtype):
    X = data(n, 1001, dtype, seed=n, stride_pad=37)
    assert X.stride(0) == 1038 and X.stride(1) == 1
    Xc = X.contiguous()
    for name, got in _all_ops(X, n).items():
        assert same_bits(got, _all_ops(Xc, n)[name]), name
    assert torch.equal(cpu.gram(X), cpu.gram(Xc))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [2, 17, 32, 64])
def test_blocking_invariance_bit_for_bit(n, dtype):
    d = 5003
    X = poison(data(n, d, dtype, seed=n), max(0, (n - 1) // 4))
    full = _all_ops(X, n)
    cuts = [0, 1, 8, 65, 130, 2048, 2049, 4999, d]
    for name in full:
        parts = [_all_ops(X[:, a:b], n)[name] for a, b in zip(cuts, cuts[1:])]
        assert same_bits(torch.cat(parts), full[name]), f"{name}: column blocks differ from the whole"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic(dtype):
    X = poison(data(33, 300_007, dtype, seed=4), 3)
    a, b = _all_ops(X, 33), _all_ops(X, 33)
    for name in a:
        assert same_bits(a[name], b[name]), name
    assert torch.equal(cpu.gram(X[4:]), cpu.gram(X[4:]))


@pytest.fixture
def isa_cap():
    yield C.set_isa
    C.set_isa("best")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [17, 33])
def test_every_simd_path_gives_the_same_bits(n, dtype, isa_cap):
    """The portable, AVX2 and AVX-512 copies do the same per-lane arithmetic (gram excepted:
    it fuses multiply-adds where the ISA has them, so it is compared by distance accuracy);
    float16 values converted by F16C or in software alike."""
    d = 3001
    X = poison(data(n, d, dtype, seed=9, kind="ties"), 4) + data(n, d, dtype, seed=8)
    results = {}
    for isa in SUPPORTED_ISAS:
        assert isa_cap(isa) == isa and C.isa() == isa
        results[isa] = (_all_ops(X, n), cpu.gram(X[:, :1000]))
    first = results[SUPPORTED_ISAS[0]]
    good = torch.isfinite(X[:, :1000]).all(1)
    for isa, (res, G) in results.items():
        for name in res:
            assert same_bits(res[name], first[0][name]), f"{name}: isa {isa} differs from portable"
        assert_distances(G[good][:, good], X[good, :1000], f"gram on isa {isa}")


def test_thread_count_does_not_change_results():
    X = data(32, 200_001, seed=3)
    out = {}
    for threads in (1, 2):
        C.set_num_threads(threads)
        try:
            out[threads] = (_all_ops(X, 32), cpu.gram(X))
        finally:
            C.set_num_threads(torch.get_num_threads())
    for name in out[1][0]:
        assert same_bits(out[1][0][name], out[2][0][name]), name
    assert torch.equal(out[1][1], out[2][1])


def test_empty_columns_and_bad_input():
    X = torch.zeros(4, 0)
    assert cpu.trimmed_mean(X, 1).shape == (0,) and cpu.coord_median(X).shape == (0,)
    assert torch.equal(cpu.gram(X), torch.zeros(4, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        cpu.trimmed_mean(torch.zeros(3, 4, dtype=torch.int32), 0)
    with pytest.raises(ValueError, match="2f < n"):
        cpu.trimmed_mean(torch.zeros(4, 4), 2)
    with pytest.raises(ValueError, match="2-D"):
        cpu.coord_median(torch.zeros(4))
    with pytest.raises(ValueError, match="rows"):
        cpu.mean_around_median(torch.zeros(4, 3), torch.tensor([0, 9]), 1)
    with pytest.raises(ValueError, match="weights"):
        cpu.weighted_mean(torch.zeros(4, 3), torch.ones(3, dtype=torch.float64))
    Xt = data(5, 40, seed=1).T.contiguous().T  # unit stride along rows, not along d: copied
    assert torch.equal(cpu.coord_median(Xt), cpu.coord_median(Xt.contiguous()))


# ---------------------------------------------------------------------------------------------
# the rules on the cpu backend select what the reference selects


@pytest.mark.parametrize("n,f,kind", [(11, 2, "normal"), (19, 4, "common"), (32, 7, "normal"), (23, 5, "ties")])
def test_rules_cpu_vs_reference(n, f, kind):
    X = data(n, 3001, seed=n, kind=kind)
    X[:f] += 5 * torch.randn(f, 3001, generator=_gen(2))  # outliers
    if f >= 2:
        X[1, 17] = float("nan")
        X[0, 5] = float("inf")
    calls = {
        "trimmed_mean": lambda: tp.trimmed_mean(X, f=f, return_info=True),
        "median": lambda: tp.median(X, return_info=True),
        "krum": lambda: tp.krum(X, f=f, return_info=True),
        "multi_krum": lambda: tp.multi_krum(X, f=f, m=n - f, return_info=True),
        "bulyan": lambda: tp.bulyan(X, f=(n - 3) // 4, return_info=True),
        "mean": lambda: tp.mean(X[f:], return_info=True),
    }
    for name, call in calls.items():
        with ops.backend("cpu"):
            agg, info = call()
        with ops.backend("reference"):
            agg0, info0 = call()
        assert info.backend == "cpu" and info0.backend == "reference", name
        assert info.selected == info0.selected, f"{name}: cpu selected {info.selected}, reference {info0.selected}"
        assert info.nonfinite == info0.nonfinite, name
        assert bool(torch.isfinite(agg).all()), name
        assert_close(agg, agg0.to(torch.float64), X, what=f"rule {name}")


def test_bench_memory_measurement_sees_temporaries_and_kernels_add_none():
    """`tapestry bench` reports the peak memory a call adds beyond its result: it must see a
    temporary as large as the input, and the selection and Gram kernels must add < 10% of it.
    Run in a fresh interpreter, as `tapestry bench` runs: the measurement is only trustworthy
    in a process whose allocator was set up by the harness before its inputs were made."""
    import json
    import subprocess
    import sys

    script = """
import json, torch
from tapestry.bench import harness as bench
from tapestry.backends import cpu
bench._glibc(bench.MEASURE_MMAP_THRESHOLD)
X = torch.randn(32, 1 << 18)
cases = {"temp": lambda: (X * 2).sum(), "trimmed_mean": lambda: cpu.trimmed_mean(X, 8),
         "coord_median": lambda: cpu.coord_median(X), "gram": lambda: cpu.gram(X)}
out = {}
for name, fn in cases.items():
    fn()
    out[name] = bench.measure_extra(fn)
print(json.dumps(out))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    nbytes = 32 * (1 << 18) * 4
    if got["temp"] is None:
        pytest.skip("no /proc/self/clear_refs or glibc here: bench reports no memory figure either")
    assert abs(got["temp"] * 2**20 - nbytes) < 0.05 * nbytes, got
    for name in ("trimmed_mean", "coord_median", "gram"):
        assert got[name] * 2**20 < 0.1 * nbytes, (name, got)


# ---------------------------------------------------------------------------------------------
# anchor_dots (MoNNA's distances, FLTrust's dot products): float64 sums of exact terms


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d,kind,pad", [(1, 1, "normal", 0), (5, 8191, "ties", 3), (16, 8193, "common", 0),
                                          (7, 70_001, "tiny", 5), (3, 24_577, "normal", 0)])
def test_anchor_dots_matches_reference(n, d, kind, pad, dtype):
    X = data(n, d, dtype, seed=d, kind=kind, stride_pad=pad)
    z = data(1, d, torch.float32, seed=d + 1, kind=kind)[0]
    got, want = cpu.anchor_dots(X, z), reference.anchor_dots(X, z)
    assert got.shape == (n, 3) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)  # only the float64 sums' order differs


def test_anchor_dots_nonfinite_rows_and_invariance(isa_cap):
    X = poison(data(9, 20_000, seed=5), 2)
    z = data(1, 20_000, seed=6)[0]
    want = cpu.anchor_dots(X, z)
    assert not torch.isfinite(want[:2]).all(1).any() and torch.isfinite(want[2:]).all()
    for isa in SUPPORTED_ISAS:  # the same lane sums on every ISA and thread count
        assert isa_cap(isa) == isa
        for threads in (1, 2):
            C.set_num_threads(threads)
            try:
                assert torch.equal(cpu.anchor_dots(X, z).nan_to_num(7.0), want.nan_to_num(7.0)), (isa, threads)
            finally:
                C.set_num_threads(torch.get_num_threads())
    with pytest.raises(ValueError, match="z has 3 values"):
        cpu.anchor_dots(X, z[:3])
