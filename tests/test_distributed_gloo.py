"""Two gloo ranks (spawned, loopback only): sharded file aggregation and the sharded Python API
give the single-process in-memory results; a bad job fails on every rank, with nothing written."""

from __future__ import annotations

import os
import pickle

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import tapestry as tp
from tapestry.distributed import aggregate
from tapestry.distributed.launch import free_port
from tapestry.distributed.job import Job, run_job

BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}

FILE_RULES = {
    "mean": tp.Mean(), "trimmed_mean": tp.TrimmedMean(f=2), "median": tp.Median(), "krum": tp.Krum(f=2),
    "multi_krum": tp.MultiKrum(f=2, m=3), "bulyan": tp.Bulyan(f=1), "nnm+median": tp.NNM(1, tp.Median()),
    "geometric_median": tp.GeometricMedian(),
}
EXACT = {"mean", "trimmed_mean", "median", "krum", "multi_krum", "bulyan"}


def _worker(rank, world, port, tmp, layouts, budget):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    from tapestry.distributed import memory

    memory.MAX_BLOCK_BYTES = 7 * 4 * 4096  # chunks of 4096 columns: several per rank and pass
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    res = {}
    try:
        for lname in layouts:
            paths = sorted(os.path.join(tmp, lname, p) for p in os.listdir(os.path.join(tmp, lname)))
            for name, rule in FILE_RULES.items():
                out = os.path.join(tmp, f"out-{lname}-{name}.safetensors")
                r = run_job(Job(paths, out, rule, budget, progress=False), rank=rank, world=world)
                if rank == 0:
                    res[(lname, name)] = (r.info.selected, r.info.nonfinite)
        # unequal file counts: rank 1 is given one file fewer
        paths = sorted(os.path.join(tmp, "big", p) for p in os.listdir(os.path.join(tmp, "big")))
        try:
            run_job(Job(paths if rank == 0 else paths[:-1], os.path.join(tmp, "never.safetensors"), tp.Median(), budget),
                    rank=rank, world=world)
            res[("unequal", rank)] = None
        except ValueError as exc:
            res[("unequal", rank)] = str(exc)
        # the sharded Python API: this rank's half of the columns
        g = torch.Generator().manual_seed(7)
        X = torch.randn(9, 5001, generator=g) + 100.0
        X[4] *= 30  # an outlier
        X[2, 4000] = float("nan")
        part = X[:, :2500] if rank == 0 else X[:, 2500:]
        for name in ("trimmed_mean", "krum", "bulyan", "geometric_median", "centered_clipping"):
            rule = {"trimmed_mean": tp.TrimmedMean(f=2), "krum": tp.Krum(f=2), "bulyan": tp.Bulyan(f=1),
                    "geometric_median": tp.GeometricMedian(), "centered_clipping": tp.CenteredClipping(tau=5.0, iterations=3)}[name]
            agg, info = aggregate(part, rule, return_info=True)
            res[("api", name, rank)] = (agg, info.selected, info.nonfinite)
        try:
            aggregate(X[: 9 - rank], tp.Median())
            res[("api_n", rank)] = None
        except ValueError as exc:
            res[("api_n", rank)] = str(exc)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(tmp, f"res{rank}.pkl"), "wb") as fh:
        pickle.dump(res, fh)


def _clients(directory, n, spec, seed):
    os.makedirs(directory)
    g = torch.Generator().manual_seed(seed)
    sds = []
    for i in range(n):
        sd = {k: torch.randn(shape, generator=g).to(dt) for k, (shape, dt) in spec.items()}
        if i == 5:
            next(iter(sd.values())).view(-1)[0] = float("inf")
        if i == 6:
            for v in sd.values():
                v.mul_(20)  # far from the others
        save_file(sd, os.path.join(directory, f"c{i}.safetensors"))
        sds.append(sd)
    return sds


def test_two_gloo_ranks_match_single_process(tmp_path):
    layouts = {
        "big": _clients(tmp_path / "big", 7, {"w": ((301, 67), torch.float32), "b": ((33,), torch.float16),
                                              "e": ((5,), torch.bfloat16)}, 1),
        "tiny": _clients(tmp_path / "tiny", 7, {"v": ((7,), torch.float32)}, 2),  # rank 0's shard is empty
    }
    budget = 8 << 20
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path), list(layouts), budget), nprocs=2,
                       start_method="spawn", join=True)
    res = [pickle.load(open(tmp_path / f"res{r}.pkl", "rb")) for r in range(2)]
    for lname, sds in layouts.items():
        for name, rule in FILE_RULES.items():
            want, info = rule(sds, return_info=True)
            got = load_file(str(tmp_path / f"out-{lname}-{name}.safetensors"))
            selected, nonfinite = res[0][(lname, name)]
            assert selected == info.selected and info.nonfinite == [5], (lname, name)
            # streamed per-coordinate rules skip the diagnostics pass; mean names the culprit
            assert nonfinite == ([] if name in ("trimmed_mean", "median") else [5]), (lname, name)
            for k in want:
                assert got[k].dtype == want[k].dtype
                if name in EXACT:
                    assert torch.equal(got[k].view(BITS[got[k].dtype]), want[k].view(BITS[want[k].dtype])), (lname, name, k)
                else:
                    torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
    for r in range(2):
        assert "rank 1 has 6 input files, rank 0 has 7" in res[r][("unequal", r)]
        assert "ranks hold different numbers of clients (from 8 to 9" in res[r][("api_n", r)]
    assert not (tmp_path / "never.safetensors").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]

    g = torch.Generator().manual_seed(7)
    X = torch.randn(9, 5001, generator=g) + 100.0
    X[4] *= 30
    X[2, 4000] = float("nan")
    for name, rule in {"trimmed_mean": tp.TrimmedMean(f=2), "krum": tp.Krum(f=2), "bulyan": tp.Bulyan(f=1),
                       "geometric_median": tp.GeometricMedian(),
                       "centered_clipping": tp.CenteredClipping(tau=5.0, iterations=3)}.items():
        want, info = rule(X, return_info=True)
        got = torch.cat([res[r][("api", name, r)][0] for r in range(2)])
        for r in range(2):
            assert res[r][("api", name, r)][1:] == (info.selected, info.nonfinite), name
        if name in EXACT:
            assert torch.equal(got.view(torch.int32), want.view(torch.int32)), name
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def _big_result(job, *, rank, world, device):
    dist.barrier()
    return bytes(range(256)) * (job // 256)  # rank 0's result crosses a pipe whose buffer is 64 KiB


def test_spawn_returns_a_result_larger_than_the_pipe():
    import datetime

    from tapestry.distributed import launch

    size = 8 << 20
    out = launch.spawn(size, 2, "cpu", target=_big_result, timeout=datetime.timedelta(seconds=60))
    assert len(out) == size and out[:3] == bytes([0, 1, 2])
