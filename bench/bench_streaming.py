"""Streaming file aggregation (``tapestry aggregate``) against a plain sequential read of the same
files, timed in the same run.

    python bench/bench_streaming.py                       # 16 clients x 4M float32 (256 MiB)
    python bench/bench_streaming.py --n 8 --d 1000000 --json out.json

Rows (GB/s = input bytes / time; ratio = this row's GB/s over the plain read's):

* ``plain read``: every file read front to back with ``readinto`` into one reused 8 MiB buffer
  (files cached: the first, untimed pass brings them into the page cache);
* ``stream read``: the blocks a streamed run reads (every client's columns, chunk by chunk, under
  ``--budget``), without aggregating;
* ``aggregate <rule>``: the whole streamed run in this process (read + rule + output written),
  also compared with the plain read's time plus the in-memory rule's (1.0: reading and computing
  overlap as well as running them back to back would; above 1: better);
* ``in-memory <rule>``: the rule on the stacked tensor already in memory (no I/O), for scale;
* ``scaling``: ``--nproc 1`` and ``2`` runs (spawned gloo ranks): the aggregation time on rank 0
  (after start-up), and the wall time including process start.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

import tapestry as tp
from tapestry.distributed import aggregate_files
from tapestry.distributed.formats import check_layouts, open_input
from tapestry.distributed import FileColumns, Job, plan, run_job


def best(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def plain_read(paths):
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass


def stream_read(paths, budget, rule):
    files = [open_input(p) for p in paths]
    layout = check_layouts(files)
    pl = plan(layout, len(files), rule, budget, 0, 1)
    src = FileColumns(files, layout, 0, layout.d, pl.chunk)
    for a, b in src.blocks():
        src.read(a, b)
    for f in files:
        f.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--d", type=int, default=4 << 20)
    ap.add_argument("--budget", default="64M")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rules", default="mean,trimmed_mean,median,krum")
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--dir", help="where the client files go (default: a temporary directory)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch/OpenMP threads in this process (default 1: on a shared machine OpenMP barriers "
                         "of short kernels are dominated by contention; --nproc N ranks get threads // N each)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    from tapestry.distributed.cli import parse_size

    budget = parse_size(args.budget)
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(dir=args.dir)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(args.n, args.d, generator=g)
    paths = []
    for i in range(args.n):
        paths.append(os.path.join(tmp.name, f"c{i:03d}.safetensors"))
        save_file({"w": X[i].clone()}, paths[-1])
    nbytes = sum(os.path.getsize(p) for p in paths)
    out = os.path.join(tmp.name, "out.safetensors")
    plain_read(paths)  # warm the page cache

    rows = []

    def row(name, secs, **extra):
        rows.append({"case": name, "ms": secs * 1e3, "GB/s": nbytes / secs / 1e9, **extra})

    # the two reads alternate, so that drift on a shared machine hits both alike
    t_plain, t_stream = float("inf"), float("inf")
    for _ in range(2 * args.repeat + 1):
        t_plain = min(t_plain, best(lambda: plain_read(paths), 1)[0])
        t_stream = min(t_stream, best(lambda: stream_read(paths, budget, tp.Median()), 1)[0])
    row("plain read", t_plain)
    row("stream read", t_stream)
    for name in args.rules.split(","):
        params = {"f": args.n // 4} if name in ("trimmed_mean", "krum", "multi_krum", "bulyan") else {}
        rule = tp.make_rule(name, **params)
        t_agg, _ = best(lambda: run_job(Job(paths, out, rule, budget, progress=False)), args.repeat)
        t_mem, _ = best(lambda: rule(X), args.repeat)
        # vs read+compute: the streamed run against reading the files plus the in-memory rule
        row(f"aggregate {name}", t_agg, vs_read_plus_compute=(t_plain + t_mem) / t_agg)
        row(f"in-memory {name}", t_mem)
        if name == "median":
            t_ra, _ = best(lambda: run_job(Job(paths, out, rule, budget, progress=False, read_ahead=True)), args.repeat)
            row(f"aggregate {name} --read-ahead", t_ra, vs_read_plus_compute=(t_plain + t_mem) / t_ra)
    if not args.no_scaling:
        for name in ("trimmed_mean", "krum"):
            rule = tp.make_rule(name, f=args.n // 4)
            for nproc in (1, 2):
                t0 = time.perf_counter()
                res = aggregate_files(paths, out, rule, memory_budget=budget, nproc=nproc, device="cpu")
                wall = time.perf_counter() - t0
                row(f"scaling {name} nproc={nproc}", res.seconds, wall_s=round(wall, 2))
    for r in rows:
        r["ratio"] = r["GB/s"] / rows[0]["GB/s"]
    print(f"# {args.n} clients x {args.d} float32 ({nbytes / 2**20:.0f} MiB), budget {args.budget}, "
          f"torch threads {torch.get_num_threads()}, backends {tp.available_backends()}")
    print(f"{'case':34s} {'ms':>10s} {'GB/s':>8s} {'vs plain read':>14s}")
    for r in rows:
        extra = f"  (wall {r['wall_s']} s with start-up)" if "wall_s" in r else ""
        if "vs_read_plus_compute" in r:
            extra = f"  ({r['vs_read_plus_compute']:.2f} x the time of plain read + in-memory rule)"
        print(f"{r['case']:34s} {r['ms']:10.1f} {r['GB/s']:8.2f} {r['ratio']:14.2f}{extra}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"n": args.n, "d": args.d, "budget": args.budget, "rows": rows}, fh, indent=1)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
