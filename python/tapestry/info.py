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
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:
        info["triton"] = f"not importable ({exc})"
    return info


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
    return 0
