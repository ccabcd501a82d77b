"""``tapestry bench``: every op on every available backend, beside baselines timed in the same run.

Shared machines drift, so each row reports its time as a ratio to a baseline measured in the same
run on the same data (a plain copy of the bytes, torch ``X.mean(0)``, ``X @ X.T``), next to ms and
GB/s of bytes read. Families of cases: ``robust`` (here), and ``compression`` / ``secure`` from
their packages' ``bench_cases`` modules when present.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from . import ops

HELP = "time each op on every available backend beside same-run baselines (copy, torch mean, X @ X.T)"

FAMILIES = {
    "robust": "tapestry.bench",
    "compression": "tapestry.compression.bench_cases",
    "secure": "tapestry.secure.bench_cases",
}


@dataclass
class Config:
    n: int = 32
    d: int = 4_194_304
    f: int = 8
    device: str = "cpu"
    repeat: int = 5
    seed: int = 0


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


def time_case(fn: Callable[[], object], device: str, repeat: int) -> tuple[float, float | None]:
    """Median wall time in ms over ``repeat`` runs after one warm-up, and (CPU only) the peak
    resident memory the call added, in MiB, beyond what it returns."""
    extra = None
    if device == "cpu" and _peak_rss_reset():
        gc.collect()
        before = _rss_kib("VmRSS")
        _peak_rss_reset()
        out = fn()
        held = _rss_kib("VmRSS") - before  # what the result keeps alive
        extra = max(0, _rss_kib("VmHWM") - before - max(held, 0)) / 1024
        del out
    else:
        fn()
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


def _backends_for(device: str) -> list[str]:
    names = []
    for name in ops.BACKENDS:
        if name == "reference" or ops.unavailable_reason(name) is not None:
            continue
        if ops._module(name).rejects(torch.device(device)) is None and not (name == "triton" and device == "cpu"):
            names.append(name)
    return names


def cases(cfg: Config) -> list[Case]:
    """The robust-aggregation family: the issue's headline rules at n, d, f of ``cfg``."""
    import tapestry as tp

    g = torch.Generator().manual_seed(cfg.seed)
    X = torch.randn(cfg.n, cfg.d, generator=g).to(cfg.device)
    Xb = X.to(torch.bfloat16)
    nbytes = X.numel() * X.element_size()
    out = [
        Case("robust", "copy", lambda: X.clone(), nbytes, is_baseline=True),
        Case("robust", "torch_mean", lambda: X.mean(0), nbytes, is_baseline=True),
        Case("robust", "matmul_XXt", lambda: X @ X.T, nbytes, is_baseline=True),
        Case("robust", "torch_sort_trimmed_mean", lambda: torch.sort(X, 0).values[cfg.f : cfg.n - cfg.f].mean(0), nbytes,
             baseline="torch_mean"),
    ]

    def with_backend(b, fn):
        def run():
            with ops.backend(b):
                return fn()
        return run

    for b in _backends_for(cfg.device):
        out += [
            Case("robust", "mean", with_backend(b, lambda: tp.mean(X)), nbytes, b, baseline="torch_mean"),
            Case("robust", "trimmed_mean", with_backend(b, lambda: tp.trimmed_mean(X, f=cfg.f)), nbytes, b, baseline="torch_mean"),
            Case("robust", "trimmed_mean", with_backend(b, lambda: tp.trimmed_mean(Xb, f=cfg.f)), nbytes // 2, b, "bfloat16",
                 baseline="torch_mean"),
            Case("robust", "median", with_backend(b, lambda: tp.median(X)), nbytes, b, baseline="torch_mean"),
            Case("robust", "krum", with_backend(b, lambda: tp.krum(X, f=cfg.f)), nbytes, b, baseline="matmul_XXt"),
            Case("robust", "multi_krum", with_backend(b, lambda: tp.multi_krum(X, f=cfg.f, m=cfg.n - cfg.f)), nbytes, b,
                 baseline="matmul_XXt"),
            Case("robust", "bulyan", with_backend(b, lambda: tp.bulyan(X, f=min(cfg.f, (cfg.n - 3) // 4))), nbytes, b,
                 baseline="matmul_XXt"),
        ]
    return out


def run_bench(cfg: Config, families: list[str]) -> list[Row]:
    rows: list[Row] = []
    for fam in families:
        try:
            module = importlib.import_module(FAMILIES[fam])
        except ModuleNotFoundError as exc:
            print(f"[{fam}] skipped: {exc}")
            continue
        fam_cases = module.cases(cfg)
        times: dict[str, float] = {}
        for case in fam_cases:
            ms, extra = time_case(case.run, cfg.device, cfg.repeat)
            if case.is_baseline:
                times[case.name] = ms
            ratio = ms / times[case.baseline] if case.baseline in times else None
            rows.append(Row(case.family, case.name, case.backend, case.dtype, ms, case.bytes_read / ms / 1e6,
                            case.baseline, ratio, extra))
            print(_format(rows[-1]), flush=True)
        del fam_cases
        gc.collect()
    return rows


def _format(r: Row) -> str:
    ratio = f"{r.ratio:6.2f}x {r.baseline}" if r.ratio is not None else "baseline"
    extra = f"{r.extra_mib:8.1f}" if r.extra_mib is not None else "       -"
    return f"{r.family:12s} {r.name:26s} {r.backend:9s} {r.dtype:9s} {r.ms:10.2f} {r.gbps:8.2f} {extra}   {ratio}"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small sizes (d = 2^20), a few repeats: a smoke run")
    parser.add_argument("--n", type=int, default=None, help="clients (default 32)")
    parser.add_argument("--d", type=int, default=None, help="parameters (default 4,194,304; 2^26 on CUDA)")
    parser.add_argument("--f", type=int, default=8, help="Byzantine clients tolerated (default 8)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per case (median reported)")
    parser.add_argument("--family", action="append", choices=list(FAMILIES), help="only these families (repeatable)")
    parser.add_argument("--json", metavar="FILE", help="write the rows and the machine description as JSON")


def run(args: argparse.Namespace) -> int:
    default_d = 1 << 26 if args.device.startswith("cuda") else 4_194_304
    cfg = Config(n=args.n or 32, d=args.d or (1 << 20 if args.quick else default_d), f=args.f, device=args.device,
                 repeat=args.repeat or (3 if args.quick else 7))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU visible to torch")
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "torch_threads": torch.get_num_threads(), "device": args.device,
               "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None}
    print(f"tapestry bench: n={cfg.n} d={cfg.d} f={cfg.f} device={cfg.device} repeat={cfg.repeat} "
          f"threads={machine['torch_threads']}")
    print(f"{'family':12s} {'case':26s} {'backend':9s} {'dtype':9s} {'ms':>10s} {'GB/s':>8s} {'extraMiB':>8s}   ratio")
    rows = run_bench(cfg, args.family or list(FAMILIES))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"config": asdict(cfg), "machine": machine, "rows": [asdict(r) for r in rows]}, fh, indent=2)
    return 0
