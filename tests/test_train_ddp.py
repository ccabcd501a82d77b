"""``tapestry train --dp distributed`` on spawned gloo ranks (loopback only).

One spawn of three ranks does everything that needs ranks: outer steps of the distributed
mechanism on known deltas (:meth:`tapestry.train.dp.DistributedOuter.outer_sum`, the call the loop
makes), with what each rank sends and receives recorded, and four tiny training runs (without
--dp; epsilon inf; epsilon 8 straight; epsilon 8 resumed from its step-2 checkpoint). The checks:
the masked sum is the plain sum of the ranks' codes mod 2^32 (so mod 2^b) exactly; what a rank
sends and receives are masked vectors, uniform-looking, never a peer's codes; the decoded mean is
DistributedDP's one-process ``secure_sum`` on the same inputs, bit for bit, on every rank; the
noise comes from each rank's own secret, not from the public seed; epsilon is the accountant's;
epsilon inf is the run without --dp; a resumed run continues bit for bit. Bad settings are
refused before any rank starts, with the failing condition in the message.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

from tapestry.cli import main
from tapestry.privacy import DistributedDP, epsilon
from tapestry.train import TrainConfig
from train_spy import run_jobs, spawn_runs

WORLD, D, BITS = 3, 10_001, 20          # D pads to 16384 = 3 shards of 5462 words (the last one short)
SECRET = b"test-secret-shared-by-all-ranks!"  # every rank the same: the one-process reference can redo it
TINY = dict(participants=WORLD, inner_steps=2, outer_steps=3, width=16, heads=2, layers=1, context=16,
            batch_size=8, files=1, chars_per_file=5000, warmup=2)
TINY_ARGV = ["--participants", "3", "--inner-steps", "2", "--outer-steps", "3", "--width", "16", "--heads", "2",
             "--layers", "1", "--context", "16", "--batch-size", "8", "--files", "1", "--chars-per-file", "5000",
             "--quiet"]
EPS = 8.0


def _deltas() -> torch.Tensor:
    """Norms 0.3 (kept), 1.5 and 1e4 (clipped by the sender's encoder to 1)."""
    g = torch.Generator().manual_seed(11)
    rows = torch.randn(WORLD, D, generator=g, dtype=torch.float64)
    rows = rows / torch.linalg.vector_norm(rows, dim=1, keepdim=True) * torch.tensor([[0.3], [1.5], [1e4]],
                                                                                        dtype=torch.float64)
    return rows.to(torch.float32)


def _step_config() -> TrainConfig:
    return TrainConfig(participants=WORLD, outer_steps=3, dp="distributed", dp_epsilon=EPS, dp_clip=1.0, dp_bits=BITS)


def _config(**kw) -> TrainConfig:
    return TrainConfig(**{**TINY, **kw})


def _outer_steps(rank: int) -> dict:
    """Three outer steps on known deltas, recording what this rank sent, received and decoded:
    steps 1-2 with the shared test secret, step 3 with a random secret per rank and a NaN update
    from rank 2."""
    from tapestry.distributed.allreduce import Comm
    from tapestry.secure.ranks import MaskedSum
    from tapestry.train.dp import DistributedOuter

    seen = {}
    masked_sum, alltoall = MaskedSum.sum, Comm.alltoall

    def spy_sum(self, masked):
        seen["masked"] = masked.clone()
        return masked_sum(self, masked)

    def spy_alltoall(self, out, inp, *args):
        alltoall(self, out, inp, *args)
        seen["received"] = out.clone()
    MaskedSum.sum, Comm.alltoall = spy_sum, spy_alltoall
    try:
        cfg = _step_config()
        shared, own = DistributedOuter(cfg, D, secret=SECRET), DistributedOuter(cfg, D)
        delta = _deltas()[rank]
        out = {"secrets_differ": own.secret != SECRET, "steps": []}
        for step in (1, 2, 3):
            mech = shared if step < 3 else own
            x = delta if not (step == 3 and rank == 2) else torch.full_like(delta, float("nan"))
            mean, info = mech.outer_sum(x, step, timeout=30.0)
            codes = mech.encoder.encode(x if torch.isfinite(x).all() else torch.zeros(D), client=rank, rnd=step)
            public = DistributedDP(mech.plan, seed=cfg.seed).encode(delta, client=rank, rnd=step)
            out["steps"].append({"mean": mean, "codes": codes, "public_codes": public,
                                 "masked": seen["masked"].numpy().view(np.uint32).copy(),
                                 "received": seen["received"].numpy().view(np.uint32).copy(),
                                 "nonfinite": info.nonfinite, "bytes": info.bytes_sent})
        out["epsilon"] = shared.epsilons
        return out
    finally:
        MaskedSum.sum, Comm.alltoall = masked_sum, alltoall


def _everything(work, *, rank, world, device=None):
    """Rank ``rank``'s part: the outer steps on known deltas, then every training job; rank 0
    saves ``(steps, runs)`` to the file it returns (too large for the launcher's pipe)."""

    jobs, path = work
    steps = _outer_steps(rank)

    return run_jobs(jobs, path, steps, rank=rank, world=world, eps=EPS)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    return spawn_runs(tmp_path_factory.mktemp("ddp"), _config, "distributed", EPS, _everything, WORLD)


def test_masked_sum_is_the_plain_sum_of_the_codes(spawned):
    steps, _, _ = spawned
    for k in range(3):
        codes = [steps[r]["steps"][k]["codes"].astype(np.int64) for r in range(WORLD)]
        assert all(int(c.max()) < 2 ** BITS for c in codes)
        plain = sum(codes) % 2 ** 32
        masked = sum(steps[r]["steps"][k]["masked"].astype(np.int64) for r in range(WORLD)) % 2 ** 32
        assert np.array_equal(masked, plain)   # the masks cancel exactly, in Z_2^32 hence in Z_2^b


def test_no_rank_sends_or_receives_a_peers_codes(spawned):
    steps, _, _ = spawned
    n = -(-16384 // WORLD)
    for k in range(3):
        for r in range(WORLD):
            s = steps[r]["steps"][k]
            codes, masked = s["codes"], s["masked"]
            assert float(np.mean(masked == codes)) < 1e-3
            # codes live in [0, 2^20); a masked word is uniform in [0, 2^32): its top bit is a fair coin
            top = float(np.mean(masked >= 2 ** 31))
            assert abs(top - 0.5) < 0.03, top
            hist = np.bincount((masked >> 28).astype(np.int64), minlength=16)
            chi2 = float(((hist - masked.size / 16) ** 2 / (masked.size / 16)).sum())
            assert chi2 < 40, chi2   # 15 degrees of freedom: P(chi2 > 40) ~ 5e-4 for uniform words
            # what rank r received: shard r of every rank's masked vector (never its codes)
            got = s["received"].reshape(WORLD, n)
            for v in range(WORLD):
                theirs = steps[v]["steps"][k]
                a, b = r * n, min((r + 1) * n, 16384)
                assert np.array_equal(got[v, :b - a], theirs["masked"][a:b])
                if v != r:
                    assert float(np.mean(got[v, :b - a] == theirs["codes"][a:b])) < 1e-3


def test_decoded_mean_is_distributed_dps_secure_sum_on_every_rank(spawned):
    from tapestry.train.dp import DistributedOuter

    steps, _, _ = spawned
    mech = DistributedOuter(_step_config(), D)
    one_process = DistributedDP(mech.plan, seed=0, secret=SECRET)
    rows = _deltas()
    for k, rnd in ((0, 1), (1, 2)):
        want = (one_process.secure_sum(rows, rnd=rnd) / WORLD).to(torch.float32)
        for r in range(WORLD):
            assert torch.equal(steps[r]["steps"][k]["mean"], want)
        clipped = (rows.double() * torch.clamp(1.0 / torch.linalg.vector_norm(rows.double(), dim=1), max=1.0)[:, None])
        noise = want.double() - clipped.mean(0)   # rounding and the three noise shares, over the participants
        sd = mech.plan.noise_multiplier * mech.plan.delta2 / mech.plan.scale / WORLD
        assert float(noise.std()) == pytest.approx(sd, rel=0.1)


def test_noise_comes_from_each_ranks_secret_and_nonfinite_is_named(spawned):
    steps, _, _ = spawned
    for r in range(WORLD):
        assert steps[r]["secrets_differ"]
        last = steps[r]["steps"][2]
        assert last["nonfinite"] == [2]        # every rank names rank 2's NaN update
        assert torch.equal(last["mean"], steps[0]["steps"][2]["mean"])   # the same bits everywhere
        assert torch.isfinite(last["mean"]).all()
        if r != 2:   # a peer holding the public seed cannot recompute this rank's rounding and noise
            assert float(np.mean(last["codes"] == last["public_codes"])) < 0.5
        assert steps[r]["steps"][0]["bytes"] >= 2 * (WORLD - 1) * 5462 * 4


def test_epsilon_is_the_accountants(spawned):
    steps, runs, _ = spawned
    p = runs[2][0].privacy
    assert p["mechanism"] == "distributed" and p["target_epsilon"] == EPS and p["bits"] == BITS
    assert p["effective_noise_multiplier"] >= p["noise_multiplier"]
    want = [epsilon(p["effective_noise_multiplier"], delta=1e-5, rounds=k, population=WORLD, per_round=WORLD)
            for k in (1, 2, 3)]
    assert p["epsilon"] == pytest.approx(want, rel=1e-9)
    assert p["epsilon"][-1] <= EPS and p["epsilon"][-1] == pytest.approx(EPS, rel=0.02)
    assert steps[0]["epsilon"] == pytest.approx(want[:2], rel=1e-9)
    # against one curious rank, which knows its own noise share: two of the three shares protect the others
    z_peer = p["effective_noise_multiplier"] * math.sqrt((WORLD - 1) / WORLD)
    assert p["epsilon_against_one_rank"] == pytest.approx(
        epsilon(z_peer, delta=1e-5, rounds=3, population=WORLD, per_round=WORLD), rel=1e-6)
    assert p["epsilon_against_one_rank"] > p["epsilon"][-1]
    doc = runs[2][0].to_json()
    assert doc["privacy"]["epsilon"] == p["epsilon"] and doc["label"].endswith("-ddp8")
    json.dumps(doc, allow_nan=False)


def test_every_rank_ends_alike_and_dp_reaches_the_model(spawned):
    _, runs, _ = spawned
    plain_models, (_, models) = runs[0][1], runs[2]
    for m in models[1:]:
        assert torch.equal(m, models[0])
    assert not torch.equal(models[0], plain_models[0])


def test_epsilon_inf_is_the_run_without_dp(spawned):
    _, runs, _ = spawned
    (plain, plain_models), (inf, inf_models) = runs[0], runs[1]
    assert inf.loss == plain.loss
    assert torch.equal(inf_models[0], plain_models[0])
    assert inf.privacy["epsilon"] is None and inf.privacy["mechanism"] == "distributed"


def test_resume_is_exact(spawned):
    _, runs, base = spawned
    (straight, a), (resumed, b) = runs[2], runs[3]
    assert resumed.loss == straight.loss
    assert resumed.privacy == straight.privacy
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    doc = torch.load(base / "straight" / "checkpoints" / "diloco-mean-float32-none-ddp8.pt", weights_only=True)
    secrets = [r["dp_secret"] for r in doc["ranks"]]
    assert len(set(secrets)) == WORLD and all(len(s) == 32 for s in secrets)


def test_results_md_names_the_mechanism(spawned, tmp_path):
    from tapestry.train.cli import write_results

    _, runs, _ = spawned
    write_results(str(tmp_path), [runs[1][0], runs[2][0]], [])
    md = (tmp_path / "results.md").read_text()
    assert "mean distributed dp eps=8: noise multiplier" in md and "mean distributed dp eps=inf: non-private" in md


def test_a_group_that_may_lose_ranks_is_refused():
    from tapestry.secure.ranks import MaskedSum

    class ReplicaGroup:   # what torchft hands out: a wrapper, not a c10d ProcessGroup
        def rank(self):
            return 0

        def size(self):
            return 2
    with pytest.raises(ValueError, match="ReplicaGroup: its masks cancel only when every rank contributes"):
        MaskedSum(ReplicaGroup())


@pytest.mark.parametrize("argv, message", [
    (["--epsilon", "1e-4"], "epsilon 0.0001 at delta 1e-05 is unreachable for 3 rounds"),
    (["--epsilon", "4", "--delta", "0.5"], "delta 0.5 >= 1/population = 1/3"),
    (["--epsilon", "4", "--delta", "0"], "delta must be in (0, 1), got 0.0"),
    (["--epsilon", "0"], "--epsilon must be > 0, got 0.0"),
    (["--epsilon=-inf"], "--epsilon must be > 0, got -inf"),
    (["--epsilon", "4", "--dp-clip", "0"], "--dp-clip must be finite and > 0, got 0.0"),
    (["--epsilon", "4", "--dp-bits", "8"], "8 bits cannot hold 3 clients at d=6736 without likely wrap-around"),
    (["--epsilon", "4", "--dp-bits", "40"], "bits must be an int in [2, 32]"),
    (["--epsilon", "4", "--rule", "median"], "--dp distributed privatizes the mean (FedAvg), not rule 'median'"),
    (["--epsilon", "4", "--codec", "int8"], "--dp distributed cannot be combined with --codec int8"),
    (["--epsilon", "4", "--mode", "dataparallel"], "--dp distributed privatizes DiLoCo's outer step"),
    (["--epsilon", "4", "--dp-adaptive"], "--dp-adaptive is central DP's"),
    (["--epsilon", "4", "--attack", "signflip"], "nothing enforces a Byzantine rank's clip"),
    ([], "--dp distributed needs --epsilon"),
])
def test_bad_settings_refused_before_spawning(tmp_path, capsys, argv, message):
    t = time.perf_counter()
    assert main(["train", *TINY_ARGV, "--out", str(tmp_path), "--dp", "distributed", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert time.perf_counter() - t < 10 and not (tmp_path / "checkpoints").exists()
