"""``tapestry bench``: every op on every available backend, beside baselines timed in the same run;
``--device cuda`` is the GPU benchmark."""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import asdict

import torch

from .floors import check_floors
from .harness import FAMILIES, Config, run_bench, timing_allocator

HELP = "time each op on every available backend beside same-run baselines (copy, torch mean, X @ X.T)"


def configure(parser: argparse.ArgumentParser) -> None:
    from ..cli_args import int_in

    parser.add_argument("--quick", action="store_true", help="small sizes (d = 2^20), a few repeats: a smoke run")
    parser.add_argument("--n", type=int_in(1, 4096), default=None, help="clients (default 32)")
    parser.add_argument("--d", type=int_in(1, 1 << 31), default=None, help="parameters (default 4,194,304; 2^26 on CUDA)")
    parser.add_argument("--f", type=int_in(0, 2047), default=8, help="Byzantine clients tolerated (default 8)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--repeat", type=int_in(1, 10_000), default=None, help="timed runs per case (median reported)")
    parser.add_argument("--family", action="append", choices=FAMILIES, help="only these families (repeatable)")
    parser.add_argument("--json", metavar="FILE", help="write the rows and the machine description as JSON")


def run(args: argparse.Namespace) -> int:
    timing_allocator()
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
