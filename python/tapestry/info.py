"""``tapestry info``: what this installation can run, and why a backend is missing."""

from __future__ import annotations

import argparse
import json
import os
import platform

import torch

from . import __version__, _native, ops

HELP = "show backends found (and why others are missing), CPU features and threads"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def collect() -> dict:
    backends = {name: (ops.unavailable_reason(name) or "available") for name in ops.BACKENDS}
    cpu = _native.load("_C")
    cuda_ext = _native.load("_cuda")
    info = {
        "tapestry": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "backends": backends,
        "auto_cpu": _auto("cpu"),
        "cpu_features": cpu.cpu_features() if not isinstance(cpu, Exception) else None,
        "cuda_extension": (dict(zip(("devices", "error"), cuda_ext.device_count())) if not isinstance(cuda_ext, Exception)
                           else f"not built ({cuda_ext})"),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [],
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "ops": op_table(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:
        info["triton"] = f"not importable ({exc})"
    return info


def _natural_device(backend: str) -> str:
    """The device a backend is asked about in the op table: the one it exists for."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def op_table() -> dict[str, dict[str, str]]:
    """op -> backend -> "yes" or the reason it cannot run the op (on its own device, any input)."""
    return {op: {b: ops.why_not(b, op, _natural_device(b)) or "yes" for b in ops.BACKENDS} for op in ops.OPS}


def _auto(device: str) -> str:
    try:
        return ops.resolve("trimmed_mean", device)[0]
    except ops.BackendError as exc:
        return f"none ({exc})"


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"tapestry {info['tapestry']}  python {info['python']}  torch {info['torch']} ({info['torch_threads']} threads)")
    print("backends (auto order):")
    for name, status in info["backends"].items():
        print(f"  {name:10s} {status}")
    print(f"auto backend for CPU tensors: {info['auto_cpu']}")
    if info["cpu_features"]:
        feats = info["cpu_features"]
        flags = [k for k, v in feats.items() if v is True]
        print(f"CPU features: {' '.join(flags) or 'baseline x86-64'}; OpenMP threads: {feats['omp_max_threads']}")
    print(f"CUDA extension: {info['cuda_extension']}")
    print(f"CUDA devices: {', '.join(info['cuda_devices']) or 'none'}")
    print(f"triton: {info['triton']} (TRITON_INTERPRET={info['triton_interpret']})")
    _print_table(info["ops"])
    return 0


def _print_table(table: dict[str, dict[str, str]]) -> None:
    """The op x backend table; each distinct reason for a gap is printed once, as a footnote."""
    notes: list[str] = []
    width = max(map(len, table))
    print("\nops (yes, or the footnote saying why not):")
    print(" " * (width + 2) + "".join(f"{b:>11s}" for b in ops.BACKENDS))
    for op, row in table.items():
        cells = []
        for b in ops.BACKENDS:
            reason = row[b]
            if reason == "yes":
                cells.append("yes")
                continue
            note = f"{b}: {reason}"
            if note not in notes:
                notes.append(note)
            cells.append(f"[{notes.index(note) + 1}]")
        print(f"  {op:{width}s}" + "".join(f"{c:>11s}" for c in cells))
    for i, note in enumerate(notes, 1):
        print(f"  [{i}] {note}")
