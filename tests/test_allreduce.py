"""tapestry.distributed.all_reduce on spawned gloo ranks (loopback only): every rank one participant.

Every rule gives, on every rank, bit for bit what it gives on the stacked updates in one process
(n = 2..8 ranks, d not a multiple of n, float32 and bfloat16, NaN senders, ties, a large common
component); with a codec, what it gives on the decoded shards; disagreeing ranks get the same
ValueError before any large transfer; a missing peer is a CollectiveError within the timeout.
"""

from __future__ import annotations

import copy
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tapestry as tp
from tapestry.compression.codecs import decode_rows
from tapestry.distributed import CollectiveError, all_reduce
from tapestry.distributed.allreduce import Wire, _shard_seed, shard_bounds
from tapestry.distributed.launch import free_port


def rules(n: int) -> list[tp.Rule]:
    out = [tp.Mean(), tp.TrimmedMean(f=(n - 1) // 2), tp.Median(), tp.GeometricMedian(),
           tp.CenteredClipping(tau=5.0, iterations=2), tp.NNM(1, tp.Median())]
    if n >= 3:
        f = (n - 3) // 2
        out += [tp.Krum(f=f), tp.MultiKrum(f=f)]
    if n >= 7:
        out.append(tp.Bulyan(f=(n - 3) // 4))
    return out


def updates(n: int, d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Awkward updates: a common component 1e3 times the spread, a duplicated row (ties), a NaN."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g) + 1000.0
    if n >= 3:
        X[2] = X[0]
    X[n - 1, d // 2] = float("nan")
    return X.to(dtype)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, NaN included."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int32 if a.dtype == torch.float32 else torch.int16),
                                                                     b.view(torch.int32 if b.dtype == torch.float32 else torch.int16))


def codec_reference(rule, X: torch.Tensor, codec: str, seed: int) -> torch.Tensor:
    """What all_reduce with ``codec`` must give: ``rule`` on every rank's decoded shards (a shard
    with a NaN arrives as all NaN), then each aggregated shard encoded and decoded once more."""
    n, d = X.shape
    bounds = shard_bounds(d, n, 256 if codec in ("int8", "int4") else 16)
    wire = Wire(codec, 256, [b - a for a, b in bounds])
    slot = torch.empty(wire.slot, dtype=torch.uint8)
    dec = torch.empty(n, d)
    for r in range(n):
        for j, (a, b) in enumerate(bounds):
            wire.encode(X[r, a:b], j, slot, _shard_seed(seed, 1, r, j))
            decode_rows([wire.open(slot, j, r)], [dec[r, a:b]], 0, b - a)
    agg = rule(dec)
    out = torch.empty(d)
    for j, (a, b) in enumerate(bounds):
        wire.encode(agg[a:b], j, slot, _shard_seed(seed, 2, j))
        decode_rows([wire.open(slot, j, j)], [out[a:b]], 0, b - a)
    return out


def _run(world: int, body, *args) -> list:
    """Run ``body(rank, world, *args)`` on ``world`` spawned gloo ranks; each rank's return value."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(world, free_port(), queue, body, args), nprocs=world, join=True,
                       start_method="spawn")
    results = {}
    while not queue.empty():
        rank, value = queue.get()
        results[rank] = value
    return [results[r] for r in range(world)]


def _worker(rank, world, port, queue, body, args):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        queue.put((rank, body(rank, world, *args)))
    finally:
        dist.destroy_process_group()


# -- the bodies each rank runs ----------------------------------------------------------------

def _exactness(rank, world, sizes, dtypes, codecs):
    """(what, ok, info tuple) per case: ok = bit-identical to the one-process result."""
    out = []
    for d in sizes:
        for dtype in dtypes:
            X = updates(world, d, dtype, seed=d)
            for rule in rules(world):
                ref_rule = copy.deepcopy(rule)
                agg, info = all_reduce(X[rank], rule, return_info=True)
                ref, ref_info = ref_rule(X, return_info=True)
                key = (info.selected, info.rejected, info.nonfinite)
                out.append((f"{rule.name} d={d} {dtype}", same(agg, ref), key,
                            (ref_info.selected, ref_info.rejected, ref_info.nonfinite)))
    for codec in codecs:
        X = updates(world, 3001, torch.float32, seed=1)
        for rule in (tp.Mean(), tp.TrimmedMean(f=(world - 1) // 2), tp.Median()):
            agg, info = all_reduce(X[rank], rule, codec=codec, seed=11, return_info=True)
            ref = codec_reference(copy.deepcopy(rule), X, codec, 11)
            key = (info.selected, info.rejected, info.nonfinite)
            out.append((f"{rule.name} {codec}", same(agg, ref), key, key))
    # a rank that takes part without contributing (a recovering replica): the rule sees the others
    if world >= 3:
        X = updates(world, 2001, torch.float32, seed=3)
        keep = [r for r in range(world) if r != 1]
        for codec in (None, "int8"):
            agg = all_reduce(X[rank] if rank != 1 else torch.zeros(2001), tp.Median(), codec=codec, seed=5,
                             participate=rank != 1)
            ref = tp.median(X[keep]) if codec is None else None
            out.append((f"participate=False {codec}", ref is None or same(agg, ref), agg.isfinite().all().item(),
                        agg.isfinite().all().item()))
        out.append(("p2p on c10d groups", type(dist.distributed_c10d._get_default_group()) is dist.ProcessGroup,
                    None, None))
    # a state_dict and a weighted mean
    sd = {"w": torch.randn(3, 5, generator=torch.Generator().manual_seed(rank)), "b": torch.full((2,), float(rank))}
    agg = all_reduce(sd, tp.Mean(), weight=rank + 1)
    ref = tp.mean([{"w": torch.randn(3, 5, generator=torch.Generator().manual_seed(r)), "b": torch.full((2,), float(r))}
                   for r in range(world)], weights=[r + 1 for r in range(world)])
    out.append(("weighted state_dict", all(same(agg[k], ref[k]) for k in ref) and list(agg) == ["w", "b"], None, None))
    return out


def _bytes(rank, world, d):
    x = torch.randn(d, generator=torch.Generator().manual_seed(rank))
    _, dense = all_reduce(x, tp.TrimmedMean(f=1), return_info=True)
    _, int8 = all_reduce(x, tp.TrimmedMean(f=1), codec="int8", return_info=True)
    return dense.bytes_sent, int8.bytes_sent


def _disagree(rank, world):
    """Each case: the message every rank raised (or None)."""
    def attempt(fn):
        try:
            fn()
            return None
        except (ValueError, TypeError) as exc:
            return f"{type(exc).__name__}: {exc}"

    x = torch.ones(10 + (rank == 1))
    y = torch.ones(10)
    big = torch.ones(10, dtype=torch.bfloat16 if rank == 1 else torch.float32)
    return [
        attempt(lambda: all_reduce(x, tp.Median())),                                        # d differs
        attempt(lambda: all_reduce(y, tp.CenteredClipping(tau=1.0 + rank))),                # rule params differ
        attempt(lambda: all_reduce(y, tp.Median(), codec="int8" if rank else None)),        # codec differs
        attempt(lambda: all_reduce(big, tp.Median())),                                      # dtype differs
        attempt(lambda: all_reduce(y, tp.Krum(f=1))),                                       # n < 2f + 3
        attempt(lambda: all_reduce("oops" if rank == 1 else y, tp.Median())),               # a bad update
        attempt(lambda: all_reduce({"a": y} if rank else {"b": y}, tp.Median())),           # names differ
        all_reduce(y * (rank + 1), tp.Median()).tolist(),                                   # still usable after
    ]


def _missing_peer(rank, world):
    if rank == 1:  # never joins: rank 0 must give up within the timeout
        time.sleep(8)
        return None
    t0 = time.perf_counter()
    try:
        all_reduce(torch.ones(100), tp.Median(), timeout=2.0)
    except CollectiveError as exc:
        return time.perf_counter() - t0, str(exc)
    return "no error"


# -- the tests --------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_bit_identical_to_one_process(world):
    big = world in (3, 4)
    sizes = [1, 7, 1003] + ([100_003] if big else [])
    dtypes = [torch.float32, torch.bfloat16] if world != 8 else [torch.float32]
    codecs = ["int8", "int4", "fp16", "bf16"] if world == 4 else ["int8"] if world == 3 else []
    results = _run(world, _exactness, sizes, dtypes, codecs)
    for what, ok, key, ref_key in results[0]:
        assert ok, f"{world} ranks, {what}: not bit-identical to the one-process rule"
        assert key == ref_key, f"{world} ranks, {what}: info {key} != one-process info {ref_key}"
    for r, rows in enumerate(results[1:], 1):  # the same diagnostics on every rank
        assert [row[2] for row in rows] == [row[2] for row in results[0]], f"rank {r} reports other diagnostics"
        assert all(row[1] for row in rows)


def test_bytes_on_the_wire():
    world, d = 4, 1 << 20
    ring = 2 * (world - 1) / world * 4 * d  # what a ring all-reduce of float32 sends per rank
    for dense, int8 in _run(world, _bytes, d):
        assert dense <= 1.01 * ring, f"dense all_reduce sent {dense} bytes, a ring all-reduce sends {ring:.0f}"
        assert int8 <= 0.27 * ring, f"int8 all_reduce sent {int8 / ring:.3f}x the float32 ring's bytes"


def test_disagreeing_ranks_get_the_same_error():
    r0, r1 = _run(2, _disagree)
    assert r0 == r1
    d, params, codec, dtype, krum, bad, names, after = r0
    assert "ranks disagree on the update size d: rank 0 has 10, rank 1 has 11" in d
    assert "ranks disagree on the rule and its parameters" in params and "tau=1.0" in params and "tau=2.0" in params
    assert "ranks disagree on the codec: rank 0 has None, rank 1 has 'int8'" in codec
    assert "ranks disagree on the update dtype" in dtype
    assert "krum needs n >= 2f+3, got n=2, f=1" in krum
    assert "rank 1 cannot take part" in bad and "str" in bad
    assert "parameter names" in names
    assert after == [1.5] * 10


def test_missing_peer_is_an_error_within_the_timeout():
    r0, _ = _run(2, _missing_peer)
    seconds, message = r0
    assert seconds < 6, f"rank 0 waited {seconds:.1f} s with a 2 s timeout"
    assert "rank 0" in message and "status exchange" in message and "2 s" in message


def test_single_process_and_bad_arguments():
    with pytest.raises(ValueError, match="not initialised"):
        all_reduce(torch.ones(3), tp.Median())
    with pytest.raises(TypeError, match="rule must be a tapestry rule"):
        all_reduce(torch.ones(3), "median")
    with pytest.raises(ValueError, match="unknown codec 'int3'"):
        all_reduce(torch.ones(3), tp.Median(), codec="int3")
