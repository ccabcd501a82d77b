"""``tapestry bench``: every op on every available backend, beside baselines timed in the same run.

Shared machines drift, so each row reports its time as a ratio to a baseline measured in the same
run on the same data (a plain copy of the bytes, torch ``X.mean(0)``, ``X @ X.T``), next to ms and
GB/s of bytes read. Families of cases: ``robust`` (here), and ``compression`` / ``secure`` from
their packages' ``bench_cases`` modules when present.

A case names its baseline by name (a case with ``is_baseline``) or as ``name:backend:dtype`` (any
case timed before it; the bfloat16 trimmed mean is compared with its own float32 time). The ratio
is the median over ``repeat`` rounds of the two timed back to back (:func:`paired_ratio`), so a
load that comes and goes on a shared machine slows both sides of each round alike. ``bw%``
is the row's GB/s as a share of the copy's (which moves each byte twice: read and write, into a
preallocated buffer, so no page faults are timed); for rows paired with the copy it comes from
the paired ratio (bytes / (copy bytes x ratio)), since the machine's bandwidth drifts by 2x over
minutes on a shared VM. ``extra`` is the peak resident memory a call
adds beyond what it returns (see :func:`measure_extra`), also as a share of the input's bytes.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import glob
import importlib
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from collections.abc import Callable

import torch

from . import ops

HELP = "time each op on every available backend beside same-run baselines (copy, torch mean, X @ X.T)"

FAMILIES = {
    "robust": "tapestry.bench",
    "compression": "tapestry.compression.bench_cases",
    "secure": "tapestry.secure.bench_cases",
    "collective": "tapestry.distributed.bench_cases",
    "byzfl": "tapestry.aggregators.bench_cases",
    "privacy": "tapestry.privacy.bench_cases",
}


@dataclass
class Config:
    n: int = 32
    d: int = 4_194_304
    f: int = 8
    device: str = "cpu"
    repeat: int = 5
    seed: int = 0
    quick: bool = False  # a smoke run: families keep every size small


def last_level_cache_bytes() -> int:
    """The largest CPU cache's size in bytes (Linux sysfs), or 32 MiB where it cannot be read."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes, default=32 << 20)


@dataclass
class Case:
    """One timed thing. ``bytes_read`` feeds GB/s; ``baseline`` names another case of the family."""

    family: str
    name: str
    run: Callable[[], object]
    bytes_read: int
    backend: str = "torch"
    dtype: str = "float32"
    baseline: str | None = None
    is_baseline: bool = False


@dataclass
class Row:
    family: str
    name: str
    backend: str
    dtype: str
    ms: float
    gbps: float
    baseline: str | None
    ratio: float | None
    extra_mib: float | None = None
    notes: dict = field(default_factory=dict)
    extra_pct: float | None = None  # extra_mib as a percentage of the case's bytes read
    bw_pct: float | None = None  # GB/s as a percentage of the copy's GB/s (see the module docstring)


def _peak_rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM (peak resident set) to the current RSS
        return True
    except OSError:
        return False


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


_libc: ctypes.CDLL | None | bool = None


def _glibc(mmap_threshold: int) -> ctypes.CDLL | None:
    """glibc, with blocks of ``mmap_threshold`` bytes or more each mapped on their own and memory
    above that much at the top of the heap returned when freed; None where mallopt is missing.

    Measuring: by default glibc raises its mmap threshold after a large block is freed (up to
    32 MiB), and later temporaries are then carved from pages that are already resident: they
    would never show in the peak RSS. A fixed 128 KiB threshold makes each large temporary fault
    in fresh pages (counted) and give them back when freed. Timing: the threshold is then set to
    glibc's own 32 MiB ceiling, where its dynamic threshold ends up in a long-running process, so
    that per-call page faults of the measurement setting do not distort the times."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
        except OSError:
            _libc = False
    if not _libc:
        return None
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    ok = _libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and _libc.mallopt(M_TRIM_THRESHOLD, mmap_threshold) == 1
    return _libc if ok else None


MEASURE_MMAP_THRESHOLD = 128 * 1024
TIMING_MMAP_THRESHOLD = 32 * 1024 * 1024


def measure_extra(fn: Callable[[], object]) -> float | None:
    """Peak resident memory, in MiB, that one call of ``fn`` adds beyond what it returns (CPU).

    Call it after a warm-up call (thread pools, lazy imports and caches exist then). The peak is
    read from VmHWM after resetting it through /proc/self/clear_refs, with glibc set as in
    :func:`_glibc`; None where either is unavailable (the number would not be trustworthy)."""
    lib = _glibc(MEASURE_MMAP_THRESHOLD)
    if lib is None:
        return None
    try:
        gc.collect()
        lib.malloc_trim(0)
        before = _rss_kib("VmRSS")
        if not _peak_rss_reset():
            return None
        out = fn()
        peak = _rss_kib("VmHWM")
        held = _rss_kib("VmRSS") - before  # what the result keeps alive
        del out
        return max(0, peak - before - max(held, 0)) / 1024
    finally:
        _glibc(TIMING_MMAP_THRESHOLD)


def time_case(fn: Callable[[], object], device: str, repeat: int) -> tuple[float, float | None]:
    """Median wall time in ms over ``repeat`` runs after one warm-up, and (CPU only) the peak
    resident memory the call added, in MiB, beyond what it returns (:func:`measure_extra`)."""
    fn()  # warm-up: lazy imports, thread pools, allocator caches
    extra = measure_extra(fn) if device == "cpu" else None
    times = []
    for _ in range(repeat):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), extra


def case_key(case: Case) -> str:
    """``name:backend:dtype``: how a case is named as another's baseline."""
    return f"{case.name}:{case.backend}:{case.dtype}"


def find_baseline(case: Case, pool: list[Case]) -> Case | None:
    """The case ``case.baseline`` names in ``pool`` (a baseline's name, or a ``case_key``)."""
    if not case.baseline:
        return None
    return next((c for c in pool if case_key(c) == case.baseline or (c.is_baseline and c.name == case.baseline)), None)


def paired_times(fn: Callable[[], object], base: Callable[[], object], repeat: int,
                 device: str = "cpu") -> tuple[float, float, float]:
    """Median seconds of ``fn`` and of ``base`` and the median per-round ratio time(fn) / time(base),
    the two timed back to back in each round (alternating which goes first), so that a shared
    machine's load hits both alike. One untimed warm-up of each first."""
    def timed(g):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        g()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    fn(), base()
    tfs, tbs, ratios = [], [], []
    for i in range(repeat):
        if i % 2:
            tb, tf = timed(base), timed(fn)
        else:
            tf, tb = timed(fn), timed(base)
        tfs.append(tf), tbs.append(tb), ratios.append(tf / tb)
    return statistics.median(tfs), statistics.median(tbs), statistics.median(ratios)


def paired_ratio(fn: Callable[[], object], base: Callable[[], object], repeat: int, device: str = "cpu") -> float:
    """The median paired ratio time(fn) / time(base); see :func:`paired_times`."""
    return paired_times(fn, base, repeat, device)[2]


def with_backend(name: str, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with backend ``name`` forced."""
    def run():
        with ops.backend(name):
            return fn()
    return run


def one_thread(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with one thread in tapestry._C's kernels (per-core rates)."""
    from . import _native

    C = _native.require("_C")

    def run():
        before = C.cpu_features()["omp_max_threads"]
        C.set_num_threads(1)
        try:
            return fn()
        finally:
            C.set_num_threads(before)
    return run


def _backends_for(device: str) -> list[str]:
    return [name for name in ops.BACKENDS if name != "reference" and not (name == "triton" and device == "cpu")
            and ops.why_not(name, "trimmed_mean", device) is None]


def cases(cfg: Config) -> list[Case]:
    """The robust-aggregation family: the issue's headline rules at n, d, f of ``cfg``."""
    import tapestry as tp

    g = torch.Generator().manual_seed(cfg.seed)
    X = torch.randn(cfg.n, cfg.d, generator=g).to(cfg.device)
    Xb = X.to(torch.bfloat16)
    nbytes = X.numel() * X.element_size()
    dst = torch.empty_like(X)
    out = [
        Case("robust", "copy", lambda: dst.copy_(X), 2 * nbytes, is_baseline=True),
        Case("robust", "torch_mean", lambda: X.mean(0), nbytes, is_baseline=True),
        Case("robust", "matmul_XXt", lambda: X @ X.T, nbytes, is_baseline=True),
        Case("robust", "torch_sort_trimmed_mean", lambda: torch.sort(X, 0).values[cfg.f : cfg.n - cfg.f].mean(0), nbytes,
             baseline="torch_mean"),
    ]

    # CPU floors are ratios to torch's mean; GPU floors to a device copy of the same bytes (issue 4)
    per_coord_base = "copy" if cfg.device.startswith("cuda") else "torch_mean"
    for b in _backends_for(cfg.device):
        out += [
            Case("robust", "mean", with_backend(b, lambda: tp.mean(X)), nbytes, b, baseline=per_coord_base),
            Case("robust", "trimmed_mean", with_backend(b, lambda: tp.trimmed_mean(X, f=cfg.f)), nbytes, b,
                 baseline=per_coord_base),
            Case("robust", "trimmed_mean", with_backend(b, lambda: tp.trimmed_mean(Xb, f=cfg.f)), nbytes // 2, b, "bfloat16",
                 baseline=f"trimmed_mean:{b}:float32"),
            Case("robust", "median", with_backend(b, lambda: tp.median(X)), nbytes, b, baseline=per_coord_base),
            Case("robust", "krum", with_backend(b, lambda: tp.krum(X, f=cfg.f)), nbytes, b, baseline="matmul_XXt"),
            Case("robust", "multi_krum", with_backend(b, lambda: tp.multi_krum(X, f=cfg.f, m=cfg.n - cfg.f)), nbytes, b,
                 baseline="matmul_XXt"),
            Case("robust", "bulyan", with_backend(b, lambda: tp.bulyan(X, f=min(cfg.f, (cfg.n - 3) // 4))), nbytes, b,
                 baseline="matmul_XXt"),
        ]
    return out


# The issues' speed floors for the robust family: (case, dtype, the most its ratio may be). On a
# GPU the per-coordinate ratios are to a copy that reads the same bytes (and writes them): reading
# at >= 80% of the copy's read rate is a ratio <= 1.25, >= 90% is <= 1.11.
# Compression (issue 5): encode and decode at >= 50% of the copy's bandwidth is a ratio <= 1.25 to
# the copy (5 d bytes moved against the copy's 8 d); the fused int8 trimmed mean <= 1.3x float32's.
FLOORS = {"cpu": [("trimmed_mean", "float32", 2.0), ("median", "float32", 2.5), ("krum", "float32", 1.5),
                  ("trimmed_mean", "bfloat16", 0.6), ("quantize_int8", "float32", 1.25),
                  ("dequantize_int8", "float32", 1.25), ("decode_int8_into", "float32", 1.25),
                  ("fused_int8_trimmed_mean", "int8", 1.3)],
          "cuda": [("trimmed_mean", "float32", 1.25), ("median", "float32", 1.25), ("mean", "float32", 1.11),
                   ("krum", "float32", 1.3)]}
EXTRA_FLOOR_PCT = {"trimmed_mean": 10.0, "median": 10.0, "krum": 10.0}


def check_floors(rows: list[Row], device: str = "cpu") -> list[str]:
    """One line per floor and per backend: the measured ratio (or extra memory) against its bar."""
    lines = []
    for r in rows:
        for name, dtype, bar in FLOORS["cuda" if device.startswith("cuda") else "cpu"]:
            if r.name == name and r.dtype == dtype and r.ratio is not None:
                verdict = "ok" if r.ratio <= bar else "ABOVE"
                lines.append(f"  {name} {dtype} [{r.backend}]: {r.ratio:.2f}x {r.baseline} (floor {bar}x) {verdict}")
        if r.name in EXTRA_FLOOR_PCT and r.extra_pct is not None and r.dtype == "float32":
            bar = EXTRA_FLOOR_PCT[r.name]
            verdict = "ok" if r.extra_pct <= bar else "ABOVE"
            lines.append(f"  {r.name} extra memory [{r.backend}]: {r.extra_pct:.2f}% of the input (floor {bar}%) {verdict}")
    return lines


def run_bench(cfg: Config, families: list[str]) -> list[Row]:
    rows: list[Row] = []
    for fam in families:
        try:
            module = importlib.import_module(FAMILIES[fam])
        except ModuleNotFoundError as exc:
            print(f"[{fam}] skipped: {exc}")
            continue
        if hasattr(module, "rows"):  # a family that times itself (several processes)
            for row in module.rows(cfg):
                rows.append(row)
                print(_format(row), flush=True)
            continue
        fam_cases = module.cases(cfg)
        done: list[Case] = []
        copy_gbps = copy_bytes = None
        for case in fam_cases:
            ms, extra = time_case(case.run, cfg.device, cfg.repeat)
            gbps = case.bytes_read / ms / 1e6
            if case.name == "copy":
                copy_gbps, copy_bytes = gbps, case.bytes_read
            base = find_baseline(case, done)  # only cases timed before this one
            ratio = paired_ratio(case.run, base.run, cfg.repeat, cfg.device) if base is not None else None
            done.append(case)
            row = Row(case.family, case.name, case.backend, case.dtype, ms, gbps, case.baseline, ratio, extra)
            if extra is not None and case.bytes_read:
                row.extra_pct = 100 * extra * 2**20 / case.bytes_read
            if base is not None and base.name == "copy" and ratio:  # paired: robust to the machine's drift
                row.bw_pct = 100 * case.bytes_read / (copy_bytes * ratio)
            elif copy_gbps:
                row.bw_pct = 100 * gbps / copy_gbps
            rows.append(row)
            print(_format(rows[-1]), flush=True)
        del fam_cases
        gc.collect()
    return rows


def _format(r: Row) -> str:
    ratio = f"{r.ratio:6.2f}x {r.baseline}" if r.ratio is not None else "baseline"
    extra = f"{r.extra_mib:8.1f} {r.extra_pct:5.1f}%" if r.extra_mib is not None and r.extra_pct is not None else \
        f"{r.extra_mib:8.1f}       " if r.extra_mib is not None else "       -       "
    bw = f"{r.bw_pct:5.0f}%" if r.bw_pct is not None else "     -"
    notes = f"   bytes sent {r.notes['bytes_sent']:,} ({r.notes['bytes_vs_ring']:.3f}x a float32 ring)" \
        if "bytes_sent" in r.notes else ""
    return f"{r.family:12s} {r.name:26s} {r.backend:9s} {r.dtype:9s} {r.ms:10.2f} {r.gbps:8.2f} {bw} {extra}   {ratio}{notes}"


def configure(parser: argparse.ArgumentParser) -> None:
    from .cli_args import int_in

    parser.add_argument("--quick", action="store_true", help="small sizes (d = 2^20), a few repeats: a smoke run")
    parser.add_argument("--n", type=int_in(1, 4096), default=None, help="clients (default 32)")
    parser.add_argument("--d", type=int_in(1, 1 << 31), default=None, help="parameters (default 4,194,304; 2^26 on CUDA)")
    parser.add_argument("--f", type=int_in(0, 2047), default=8, help="Byzantine clients tolerated (default 8)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--repeat", type=int_in(1, 10_000), default=None, help="timed runs per case (median reported)")
    parser.add_argument("--family", action="append", choices=list(FAMILIES), help="only these families (repeatable)")
    parser.add_argument("--json", metavar="FILE", help="write the rows and the machine description as JSON")


def run(args: argparse.Namespace) -> int:
    _glibc(TIMING_MMAP_THRESHOLD)  # fixed allocator settings for the whole run (see _glibc)
    default_d = 1 << 26 if args.device.startswith("cuda") else 4_194_304
    cfg = Config(n=args.n or 32, d=args.d or (1 << 20 if args.quick else default_d), f=args.f, device=args.device,
                 repeat=args.repeat or (3 if args.quick else 7), quick=args.quick)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU visible to torch")
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "torch_threads": torch.get_num_threads(), "device": args.device,
               "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None}
    print(f"tapestry bench: n={cfg.n} d={cfg.d} f={cfg.f} device={cfg.device} repeat={cfg.repeat} "
          f"threads={machine['torch_threads']}")
    print(f"{'family':12s} {'case':26s} {'backend':9s} {'dtype':9s} {'ms':>10s} {'GB/s':>8s} {'bw%':>6s} "
          f"{'extraMiB':>8s} {'extra':>6s}   ratio")
    rows = run_bench(cfg, args.family or list(FAMILIES))
    floors = check_floors(rows, cfg.device)
    if floors:
        print(f"speed and memory floors (n={cfg.n}, d={cfg.d}, f={cfg.f}; bars hold for n=32, d=4194304, f=8):")
        print("\n".join(floors))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"config": asdict(cfg), "machine": machine, "rows": [asdict(r) for r in rows]}, fh, indent=2)
    return 0
