"""CUDA kernels (tapestry._cuda, csrc/cuda) and the cuda backend.

Without a GPU: the extension imports and reports itself unavailable, forcing it is a clear
error, launch errors become Python exceptions, and the selection kernels' per-column code
(csrc/cuda/select.cuh: keys, sorting networks, rank windows) runs on the CPU through a host
harness compiled with nvcc, against the reference. With a GPU (tests marked ``gpu``): every op
against the reference, at sizes the CPU cannot afford, and the device checks.
"""

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import tapestry as tp
from tapestry import _native, ops, reference
from tapestry.backends import cuda as cuda_backend
from checks import DTYPES, assert_close, direct_distances, distances, infinite_median_columns, make

ROOT = Path(__file__).resolve().parent.parent
HAS_GPU = torch.cuda.is_available()


def _nvcc():
    for cand in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).exists():
            return cand
    return None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found: tapestry._cuda is not built here")


@pytest.fixture(scope="module")
def cuda_ext():
    mod = _native.load("_cuda")
    if isinstance(mod, Exception):
        if NVCC is not None:  # setup.py builds it wherever nvcc exists: its absence is a failure
            raise AssertionError(f"nvcc exists but tapestry._cuda does not import: {mod}")
        pytest.skip("tapestry._cuda not built (no nvcc)")
    return mod


def ptxas_records(text: str, arch: str) -> dict[str, dict]:
    """Per kernel compiled for ``arch``: registers, shared memory, stack frame and spills, from
    ptxas's -v report (setup.py keeps it in build/ptxas/)."""
    records: dict[str, dict] = {}
    cur = name = None
    for line in text.splitlines():
        if m := re.match(r"ptxas info\s*: Compiling entry function '(\S+)' for '(\w+)'", line):
            cur = m[1] if m[2] == arch else None
            name = None
        elif cur and (m := re.match(r"ptxas info\s*: Function properties for (\S+)", line)):
            name = m[1]
        elif cur and name and (m := re.match(r"\s+(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            records.setdefault(name, {}).update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif cur and (m := re.match(r"ptxas info\s*: Used (\d+) registers", line)):
            smem = re.search(r"(\d+) bytes smem", line)
            records.setdefault(cur, {}).update(registers=int(m[1]), smem=int(smem[1]) if smem else 0)
    return records


def test_ptxas_report_parser_sees_spills_and_arch():
    text = """ptxas info    : Compiling entry function 'k1' for 'sm_80'
ptxas info    : Function properties for k1
    8 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers
ptxas info    : Compiling entry function 'k1' for 'sm_90'
ptxas info    : Function properties for k1
    16 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 20480 bytes smem, 408 bytes cmem[0]
"""
    assert ptxas_records(text, "sm_90") == {"k1": {"stack": 16, "spill_stores": 4, "spill_loads": 12, "registers": 64,
                                                   "smem": 20480}}


@needs_nvcc
def test_no_cuda_kernel_spills_or_uses_local_memory_on_sm90(cuda_ext):
    """Every CUDA kernel (and every device function ptxas reports) for sm_90: no spill stores or
    loads and no stack frame (local memory); registers and shared memory printed as the record."""
    sources = sorted(p.name for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    reports = ROOT / "build" / "ptxas"
    assert sorted(p.stem for p in reports.glob("*.cu.txt")) == sources, f"setup.py writes one report per .cu to {reports}"
    bad = []
    for src in sources:
        records = ptxas_records((reports / f"{src}.txt").read_text(), "sm_90")
        assert any("registers" in r for r in records.values()), f"{src}: no sm_90 kernel in the report"
        for name, r in sorted(records.items()):
            print(f"{src} {name}: {r}")
            if r.get("stack", 0) or r.get("spill_stores", 0) or r.get("spill_loads", 0):
                bad.append(f"{src} {name}: {r}")
    assert not bad, "local memory or spills on sm_90:\n" + "\n".join(bad)


ROBUST = ["weighted_mean", "trimmed_mean", "coord_median", "mean_around_median"]


# ---------------------------------------------------------------------------------------------
# no GPU needed


def test_extension_imports_and_reports_devices(cuda_ext):
    count, error = cuda_ext.device_count()
    assert isinstance(count, int) and isinstance(error, str)
    if not HAS_GPU:
        assert count == 0 and error, "without a GPU the runtime's error message is reported"
    for name in ROBUST:  # one op, one name: the binding is named like the op
        assert callable(getattr(cuda_ext, name)), name
    assert cuda_ext.MAX_SELECT_ROWS >= 64


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU reporting")
def test_backend_unavailable_says_why(cuda_ext):
    reason = ops.unavailable_reason("cuda")
    assert reason is not None and "no CUDA GPU" in reason
    assert "cuda" not in ops.available_backends()


@pytest.mark.skipif(HAS_GPU, reason="a launch on null pointers would poison a real GPU context")
def test_launch_errors_become_python_exceptions(cuda_ext):
    with pytest.raises(RuntimeError, match=r"tapestry\._cuda\.trimmed_mean: CUDA error"):
        cuda_ext.trimmed_mean(0, 0, 5, 16, 16, 1, 0, 0, 0)
    with pytest.raises(RuntimeError, match=r"weighted_mean: CUDA error"):
        cuda_ext.weighted_mean(0, 0, 16, 16, 0, 0, 3, 0, 0, 0)
    # every binding takes (stream, device) last, as backends/cuda.py passes them, and fails cleanly
    calls = {"quantize_int8": (0, 0, 16, 8, False, 0, 0, 0, 0), "quantize_int4": (0, 0, 16, 8, False, 0, 0, 0, 0),
             "dequantize_int8": ([0], [0], 16, 8, [0]), "dequantize_int4": ([0], [0], 16, 8, [0]),
             "chacha20_keystream": (0, 0, 0, 0, 16), "chacha20_mask": (0, 0, 16, 0, 0, 1, 0, 0)}
    for name, args in calls.items():
        with pytest.raises(RuntimeError, match=name):
            getattr(cuda_ext, name)(*args, 0, 0)


def test_forcing_cuda_on_cpu_tensors_names_backend_and_device():
    X = torch.randn(5, 3)
    with tp.backend("cuda"):
        with pytest.raises(ops.BackendError, match=r"backend 'cuda' cannot run trimmed_mean on cpu"):
            tp.trimmed_mean(X, f=1)
        with pytest.raises(ops.BackendError, match=r"'cuda'.*cpu"):
            tp.krum(torch.randn(7, 3), f=1)


def test_cuda_backend_rejects_cpu_tensors_even_when_available():
    from tapestry.backends import cuda

    assert "cpu" in cuda.rejects("trimmed_mean", torch.device("cpu"))
    assert cuda.rejects("trimmed_mean", torch.device("cuda", 0)) is None


def test_mixed_devices_are_named():
    # a CPU and a meta tensor stand in for CPU + GPU: the same check names both devices
    with pytest.raises(ValueError, match=r"client 0 on cpu, client 1 on meta"):
        tp.trimmed_mean([torch.randn(4), torch.randn(4, device="meta")], f=0)
    with pytest.raises(ValueError, match=r"client 1, key 'w': on meta, client 0 is on cpu"):
        tp.mean([{"w": torch.randn(3)}, {"w": torch.randn(3, device="meta")}])


# -- the selection kernels' column code, on the host


@pytest.fixture(scope="module")
def host_harness(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc not found")
    exe = tmp_path_factory.mktemp("cuda_host") / "cuda_select_host"
    subprocess.run([NVCC, "-x", "cu", str(ROOT / "tests" / "cuda_select_host.cu"), "-o", str(exe), "-O1",
                    "-std=c++17", f"-I{ROOT / 'csrc'}"], check=True, capture_output=True)
    return exe


def run_host(exe, X, f, k, tmp_path):
    n, d = X.shape
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    X.numpy().astype(np.float32).tofile(src)
    subprocess.run([str(exe), str(src), str(dst), str(n), str(d), str(f), str(k)], check=True)
    return torch.from_numpy(np.fromfile(dst, dtype=np.float32)).reshape(3, d)


@needs_nvcc
@pytest.mark.parametrize("n", range(1, 65))
def test_select_network_on_host(host_harness, n, tmp_path):
    f = (n - 1) // 3
    k = max(1, n - 2 * f)
    X = make(n, 11, seed=n, nonfinite=min(f, 3), device="cpu")
    X[:2, 5] = -0.0
    out = run_host(host_harness, X, f, k, tmp_path)
    assert_close(out[0], reference.trimmed_mean(X, f), X, what=f"trimmed_mean n={n}")
    assert_close(out[1], reference.coord_median(X), X, what=f"coord_median n={n}")
    clean = make(n, 11, seed=n + 100, device="cpu")  # Bulyan's rows are finite
    out = run_host(host_harness, clean, f, k, tmp_path)
    assert_close(out[2], reference.mean_around_median(clean, torch.arange(n), k), clean, what=f"around n={n} k={k}")


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.fixture
def on_cuda():
    with tp.backend("cuda"):
        yield


@pytest.mark.gpu
def test_auto_picks_cuda_on_gpu_tensors():
    for op in ROBUST + ["gram"]:
        assert ops.resolve(op, "cuda")[0] == "cuda", op


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 16, 17, 31, 32, 33, 63, 64, 65, 200])
def test_gpu_selection(n, dtype):
    from tapestry.backends import cuda

    f = (n - 1) // 3
    X = make(n, 1031, seed=n, dtype=dtype, nonfinite=min(f, 3), device="cuda")
    assert_close(cuda.trimmed_mean(X, f), reference.trimmed_mean(X, f), X, what=f"trimmed n={n}")
    assert_close(cuda.coord_median(X), reference.coord_median(X), X, what=f"median n={n}")
    rows = torch.arange(0, n, 2)
    k = max(1, rows.numel() // 2)
    clean = make(n, 1031, seed=n + 1, dtype=dtype, device="cuda")
    assert_close(cuda.mean_around_median(clean, rows, k), reference.mean_around_median(clean, rows, k), clean,
                 what=f"around n={n}")


@pytest.mark.gpu
def test_gpu_infinite_median_takes_the_equal_infinities():
    from tapestry.backends import cuda

    X, want = infinite_median_columns()
    for k, expected in want.items():
        got = cuda.mean_around_median(X.cuda(), torch.arange(5), k).cpu()
        assert torch.equal(got.nan_to_num(7.0), torch.tensor(expected).nan_to_num(7.0)), (k, got)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [1, 7, 1_000_003])
def test_gpu_widths_and_layouts(d, dtype):
    from tapestry.backends import cuda

    X = make(32, d, seed=d, dtype=dtype, common=1e3, nonfinite=2, device="cuda")
    assert_close(cuda.trimmed_mean(X, 8), reference.trimmed_mean(X, 8), X, what="trimmed")
    assert_close(cuda.coord_median(X), reference.coord_median(X), X, what="median")
    w = torch.rand(32, dtype=torch.float64) + 0.1
    w[:2] = 0.0  # the non-finite clients: never read
    w /= w.sum()
    assert_close(cuda.weighted_mean(X, w), reference.weighted_mean(X, w), X, what="weighted_mean")
    view = make(32, d + 3, seed=d, dtype=dtype, device="cuda")[:, 1 : d + 1]  # unaligned rows
    assert_close(cuda.weighted_mean(view, w), reference.weighted_mean(view, w), view, what="unaligned")
    assert_close(cuda.trimmed_mean(view, 8), reference.trimmed_mean(view, 8), view, what="unaligned trimmed")


@pytest.mark.gpu
def test_gpu_bit_identical_and_blocking_free():
    from tapestry.backends import cuda

    X = make(32, 100_003, seed=3, nonfinite=3, device="cuda")
    w = torch.full((32,), 1 / 32, dtype=torch.float64)
    for fn in (lambda A: cuda.trimmed_mean(A, 8), cuda.coord_median, lambda A: cuda.weighted_mean(A, w)):
        a = fn(X)
        assert torch.equal(a, fn(X))
        assert torch.equal(a[4097:70001], fn(X[:, 4097:70001]))
    G = cuda.gram(X)
    assert torch.equal(G, cuda.gram(X))


@pytest.mark.gpu
def test_gpu_gram_accuracy():
    from tapestry.backends import cuda

    X = make(33, 200_001, seed=4, common=1e3, ties=False, device="cuda")
    ref = direct_distances(X)
    D = distances(cuda.gram(X).cpu())
    assert float((D - ref).abs().max() / ref.max()) <= 1e-4


@pytest.mark.gpu
def test_gpu_rules_match_reference(on_cuda):
    X = make(20, 5001, seed=6, common=1e3, ties=False, device="cuda")
    X[0] += 5.0
    X[1, 7] = float("nan")
    for rule in [tp.TrimmedMean(f=3), tp.Median(), tp.Mean(), tp.Krum(f=3), tp.MultiKrum(f=3), tp.Bulyan(f=4)]:
        got, info = rule(X, return_info=True)
        with tp.backend("reference"):
            want, info_ref = rule(X.cpu(), return_info=True)
        assert got.device == X.device and info.backend == "cuda"
        assert info.selected == info_ref.selected, rule
        assert_close(got, want, X, what=repr(rule))


@pytest.mark.gpu
def test_gpu_mixed_cpu_and_cuda_updates_name_both():
    with pytest.raises(ValueError, match=r"client 0 on cpu, client 1 on cuda"):
        tp.trimmed_mean([torch.randn(4), torch.randn(4, device="cuda")], f=0)
    with pytest.raises(ValueError, match=r"client 1, key 'w': on cpu, client 0 is on cuda:0"):
        tp.mean([{"w": torch.randn(3, device="cuda")}, {"w": torch.randn(3)}])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus():
    with pytest.raises(ValueError, match=r"cuda:0.*cuda:1"):
        tp.median([torch.randn(4, device="cuda:0"), torch.randn(4, device="cuda:1")])
    X = make(9, 4099, seed=2, device="cuda:1")
    torch.cuda.set_device(0)
    with tp.backend("cuda"):
        out = tp.trimmed_mean(X, f=2)
    assert out.device == X.device
    assert_close(out, reference.trimmed_mean(X, 2), X)
    # the launch ran on cuda:1 and left the caller's current device where it was
    q, s = cuda_backend.quantize_int8(X[0], 64, None)
    assert q.device == X.device and torch.cuda.current_device() == 0


@pytest.mark.gpu
def test_launch_leaves_the_current_device_alone():
    before = torch.cuda.current_device()
    X = make(9, 4099, seed=3, device=f"cuda:{before}")
    with tp.backend("cuda"):
        tp.median(X)
    cuda_backend.chacha20_keystream(torch.zeros(8, dtype=torch.int32, device=X.device),
                            torch.zeros(3, dtype=torch.int32, device=X.device), 0, 64)
    assert torch.cuda.current_device() == before
