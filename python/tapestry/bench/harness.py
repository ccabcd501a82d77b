"""The benchmark harness: cases, one timing implementation, memory measurement, the runner.

Shared machines drift, so each row reports its time as a ratio to a baseline measured in the same
run on the same data (a plain copy of the bytes, torch ``X.mean(0)``, ``X @ X.T``), next to ms and
GB/s of bytes read. Each family is a module of this package with ``cases(cfg)`` (or ``rows(cfg)``
when it times itself across processes) and imports only this module and the library.

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

import ctypes
import gc
import glob
import importlib
import statistics
import time
from dataclasses import dataclass, field
from collections.abc import Callable

import torch

from .. import ops

FAMILIES = ("robust", "sweep", "compression", "secure", "collective", "byzfl", "privacy")  # modules of tapestry.bench


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
    once: bool = False  # a slow reference (ByzFL's subset searches): one paired round after one warm-up


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


def peak_rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM (peak resident set) to the current RSS
        return True
    except OSError:
        return False


def rss_kib(field_name: str) -> int:
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


def timing_allocator() -> None:
    """Fixed glibc settings for a whole timing run (see :func:`_glibc`)."""
    _glibc(TIMING_MMAP_THRESHOLD)


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
        before = rss_kib("VmRSS")
        if not peak_rss_reset():
            return None
        out = fn()
        peak = rss_kib("VmHWM")
        held = rss_kib("VmRSS") - before  # what the result keeps alive
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
                 device: str = "cpu", timer: Callable[[Callable[[], object]], float] | None = None
                 ) -> tuple[float, float, float]:
    """Median seconds of ``fn`` and of ``base`` and the median per-round ratio time(fn) / time(base),
    the two timed back to back in each round (alternating which goes first), so that a shared
    machine's load hits both alike. One untimed warm-up of each first. ``timer(g)`` replaces the
    wall clock of one call (the collective family times the slowest rank)."""
    def wall(g):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        g()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed = timer or wall
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
    from .. import _native

    C = _native.require("_C")

    def run():
        before = C.cpu_features()["omp_max_threads"]
        C.set_num_threads(1)
        try:
            return fn()
        finally:
            C.set_num_threads(before)
    return run


def backends_for(device: str, op: str = "trimmed_mean") -> list[str]:
    """The non-reference backends that run ``op`` on ``device`` (Triton's CPU interpreter excluded)."""
    return [name for name in ops.BACKENDS if name != "reference" and ops.auto_skip_reason(name, op, device) is None]


def run_bench(cfg: Config, families: list[str]) -> list[Row]:
    rows: list[Row] = []
    for fam in families:
        module = importlib.import_module(f"tapestry.bench.{fam}")
        if hasattr(module, "rows"):  # a family that times itself (several processes)
            for row in module.rows(cfg):
                rows.append(row)
                print(format_row(row), flush=True)
            continue
        fam_cases = module.cases(cfg)
        done: list[Case] = []
        copy_gbps = copy_bytes = None
        for case in fam_cases:
            base = find_baseline(case, done)  # only cases timed before this one
            if case.once and base is not None:
                tf, _, ratio = paired_times(case.run, base.run, 1, cfg.device)
                ms, extra = tf * 1e3, None
            else:
                ms, extra = time_case(case.run, cfg.device, cfg.repeat)
                ratio = paired_ratio(case.run, base.run, cfg.repeat, cfg.device) if base is not None else None
            gbps = case.bytes_read / ms / 1e6
            if case.name == "copy":
                copy_gbps, copy_bytes = gbps, case.bytes_read
            done.append(case)
            row = Row(case.family, case.name, case.backend, case.dtype, ms, gbps, case.baseline, ratio, extra)
            if extra is not None and case.bytes_read:
                row.extra_pct = 100 * extra * 2**20 / case.bytes_read
            if base is not None and base.name == "copy" and ratio:  # paired: robust to the machine's drift
                row.bw_pct = 100 * case.bytes_read / (copy_bytes * ratio)
            elif copy_gbps:
                row.bw_pct = 100 * gbps / copy_gbps
            rows.append(row)
            print(format_row(rows[-1]), flush=True)
        del fam_cases
        gc.collect()
    return rows


def format_row(r: Row) -> str:
    ratio = f"{r.ratio:6.2f}x {r.baseline}" if r.ratio is not None else "baseline"
    extra = f"{r.extra_mib:8.1f} {r.extra_pct:5.1f}%" if r.extra_mib is not None and r.extra_pct is not None else \
        f"{r.extra_mib:8.1f}       " if r.extra_mib is not None else "       -       "
    bw = f"{r.bw_pct:5.0f}%" if r.bw_pct is not None else "     -"
    notes = f"   bytes sent {r.notes['bytes_sent']:,} ({r.notes['bytes_vs_ring']:.3f}x a float32 ring)" \
        if "bytes_sent" in r.notes else ""
    return f"{r.family:12s} {r.name:26s} {r.backend:9s} {r.dtype:9s} {r.ms:10.2f} {r.gbps:8.2f} {bw} {extra}   {ratio}{notes}"
