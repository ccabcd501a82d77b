"""``tapestry bench --family collective``: the robust all-reduce against ``torch.distributed.all_reduce``.

``WORLD`` local gloo ranks (spawned, loopback) each hold one float32 update of ``d`` values (16 Mi
by default, 1 Mi with ``--quick``). Every case is timed in rounds paired with the baseline, a plain
``dist.all_reduce`` (SUM) followed by the division by ``n``, in the same run; a round's time is the
slowest rank's. Bytes are counted, not modelled: each rank's ``info.bytes_sent`` (headers, scales,
status records and partial sums included), against the ``2 (n-1)/n * 4 d`` bytes a ring all-reduce
of float32 sends per rank.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 4


def _cases():
    import tapestry as tp

    return [("mean", tp.Mean(), None), ("trimmed_mean", tp.TrimmedMean(f=1), None), ("median", tp.Median(), None),
            ("krum", tp.Krum(f=0), None), ("mean", tp.Mean(), "int8"), ("trimmed_mean", tp.TrimmedMean(f=1), "int8"),
            ("median", tp.Median(), "int4")]


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    return _slowest(time.perf_counter() - t0)


def _rank(rank: int, world: int, port: int, d: int, repeat: int, queue) -> None:
    from .._native import set_num_threads
    from ..distributed.allreduce import all_reduce
    from .harness import paired_times

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    set_num_threads(1)  # WORLD ranks share this machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x = torch.randn(d, generator=torch.Generator().manual_seed(rank))

        def base():
            y = x.clone()
            dist.all_reduce(y)
            y /= world

        rows = []
        for name, rule, codec in _cases():
            def fn(rule=rule, codec=codec):
                return all_reduce(x, rule, codec=codec, seed=1, return_info=True)[1]

            info = fn()
            tf, tb, ratio = paired_times(fn, base, repeat, timer=_timed)
            rows.append((name, codec, tf, tb, ratio, info.bytes_sent))
        if rank == 0:
            queue.put(rows)
    finally:
        dist.destroy_process_group()


def rows(cfg) -> list:
    """The family's rows (timed in ``WORLD`` spawned ranks, reported by rank 0)."""
    from ..distributed.launch import free_port
    from .harness import Row

    d = (1 << 20) if cfg.quick else (1 << 24)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_rank, args=(WORLD, free_port(), d, cfg.repeat, queue), nprocs=WORLD, join=True,
                       start_method="spawn")
    measured = queue.get()
    ring = 2 * (WORLD - 1) / WORLD * 4 * d
    nbytes = 4 * d
    base_ms = statistics.median(m[3] for m in measured) * 1e3
    out = [Row("collective", "dist.all_reduce+divide", "gloo", "float32", base_ms, nbytes / base_ms / 1e6, None, None,
               notes={"bytes_sent": int(ring), "bytes_vs_ring": 1.0, "ranks": WORLD, "d": d})]
    for name, codec, tf, _tb, ratio, sent in measured:
        ms = tf * 1e3
        out.append(Row("collective", f"all_reduce {name}", "gloo", codec or "float32", ms, nbytes / ms / 1e6,
                       "dist.all_reduce+divide", ratio,
                       notes={"bytes_sent": sent, "bytes_vs_ring": round(sent / ring, 4), "ranks": WORLD, "d": d}))
    return out
