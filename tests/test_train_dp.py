"""``tapestry train --dp central`` on spawned gloo ranks (loopback only).

One spawn of three ranks does everything that needs ranks: the DP outer step on known deltas
(:func:`tapestry.train.dp.outer_all_reduce`, the call the loop makes) and four tiny training runs
(without --dp; epsilon inf; epsilon 8 straight; epsilon 8 resumed from its step-2 checkpoint). The
checks: every update is clipped by its WHOLE norm (a row whose every shard is under the clip is
clipped all the same), a huge update adds exactly the clip; the noise is added once, the draw
CentralDP makes in one process (the aggregate equals CentralDP applied by hand to the same deltas,
and its deviation from the clipped mean has the calibrated std); every rank ends with the same
bits; the epsilon reported after each outer step is dp-accounting's for that many rounds; epsilon
inf is the run without --dp, bit for bit; a resumed DP run continues bit for bit. Bad settings
are refused before any rank starts, with the failing inequality in the message.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from tapestry.cli import main
from tapestry.privacy import CentralDP, Schedule, epsilon
from tapestry.train import TrainConfig
from train_spy import run_jobs, spawn_runs

WORLD, D, CLIP = 3, 10_001, 1.0   # three coordinate shards of 3344, 3344 and 3313
TINY = dict(participants=WORLD, inner_steps=2, outer_steps=3, width=16, heads=2, layers=1, context=16,
            batch_size=8, files=1, chars_per_file=5000, warmup=2)
TINY_ARGV = ["--participants", "3", "--inner-steps", "2", "--outer-steps", "3", "--width", "16", "--heads", "2",
             "--layers", "1", "--context", "16", "--batch-size", "8", "--files", "1", "--chars-per-file", "5000",
             "--quiet"]
EPS = 8.0


def _deltas() -> torch.Tensor:
    """Row 0: norm 0.3 (kept as it is); row 1: norm 1.5 spread evenly, so each rank's shard of it has
    norm ~0.87 < CLIP (only the whole norm clips it); row 2: norm 1e4 (a Byzantine-sized update)."""
    g = torch.Generator().manual_seed(11)
    rows = torch.randn(WORLD, D, generator=g, dtype=torch.float64)
    rows[1] = torch.where(rows[1] > 0, 1.0, -1.0)
    rows = rows / torch.linalg.vector_norm(rows, dim=1, keepdim=True) * torch.tensor([[0.3], [1.5], [1e4]],
                                                                                        dtype=torch.float64)
    return rows.to(torch.float32)


def _quiet_dp() -> CentralDP:
    return CentralDP(Schedule(WORLD, WORLD, 2, sampling="fixed"), noise_multiplier=1e-4, clip=CLIP, seed=5)


def _noisy_dp() -> CentralDP:  # adaptive: the clip moves, the same way on every rank
    return CentralDP(Schedule(WORLD, WORLD, 3, sampling="fixed"), noise_multiplier=0.25, clip=CLIP, adaptive=True,
                     seed=5)


def _config(**kw) -> TrainConfig:
    return TrainConfig(**{**TINY, **kw})


def _everything(work, *, rank, world, device=None):
    """Rank ``rank``'s part: the DP step on known deltas, then every training job. Rank 0 saves
    ``(steps, runs)`` (every rank's aggregates; per job, the record and every rank's final model)
    to the file it returns (a result that large would not fit through the launcher's pipe)."""
    from tapestry.train import dp

    jobs, path = work

    delta = _deltas()[rank]
    steps = {}
    for name, cdp in (("quiet", _quiet_dp()), ("noisy", _noisy_dp())):
        out = []
        for step in range(1, cdp.schedule.rounds + 1):
            agg, info = dp.outer_all_reduce(delta, None, cdp, step, timeout=30.0)
            out.append((agg, info.scores, cdp.reports[-1].clip))
        steps[name] = out

    return run_jobs(jobs, path, steps, rank=rank, world=world, eps=EPS)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    return spawn_runs(tmp_path_factory.mktemp("dp"), _config, "central", EPS, _everything, WORLD)


def test_every_update_is_clipped_by_its_whole_norm(spawned):
    from tapestry.distributed.allreduce import shard_bounds

    steps, _, _ = spawned
    rows = _deltas().double()
    norms = torch.linalg.vector_norm(rows, dim=1)
    clipped = rows * torch.clamp(CLIP / norms, max=1.0)[:, None]
    by_shard = rows.clone()   # what clipping each rank's shard by its own norm would give
    for a, b in shard_bounds(D, WORLD, 16):
        by_shard[:, a:b] *= torch.clamp(CLIP / torch.linalg.vector_norm(rows[:, a:b], dim=1), max=1.0)[:, None]
    for agg, scores, _ in steps[0]["quiet"]:
        assert torch.allclose(scores, norms, rtol=1e-6)          # the whole norm, on every rank
        # noise 1e-4 per coordinate, far below the ~5e-3 by which row 1 would exceed the clip per shard
        assert float((agg.double() * WORLD - clipped.sum(0)).abs().max()) < 1e-3
        assert float((agg.double() * WORLD - by_shard.sum(0)).abs().max()) > 3e-3


def test_noise_is_added_once_and_every_rank_gets_the_same_bits(spawned):
    steps, _, _ = spawned
    for name in ("quiet", "noisy"):
        for r in range(1, WORLD):
            for (a, s, c), (a0, s0, c0) in zip(steps[r][name], steps[0][name]):
                assert torch.equal(a, a0) and torch.equal(s, s0) and c == c0
    by_hand = _noisy_dp()
    rows = _deltas()
    clips = []
    for rnd, (agg, _, clip) in enumerate(steps[0]["noisy"], start=1):
        clips.append(by_hand.clip)
        assert clip == pytest.approx(by_hand.clip, rel=1e-12)   # the adaptive clip moved the same way
        ref = by_hand.aggregate(rows, rnd)
        assert torch.allclose(agg, ref, atol=1e-6), float((agg - ref).abs().max())
        # the deviation from the clipped mean: N(0, (z_data C / n)^2) per coordinate, once
        norms = torch.linalg.vector_norm(rows.double(), dim=1)
        mean = (rows.double() * torch.clamp(clip / norms, max=1.0)[:, None]).sum(0) / WORLD
        noise = agg.double() - mean
        assert float(noise.std()) == pytest.approx(by_hand.z_data * clip / WORLD, rel=0.04)
        assert abs(float(noise.mean())) < 4 * by_hand.z_data * clip / WORLD / math.sqrt(D)
    assert len(set(clips)) == 3   # adaptive clipping did move the clip


def test_epsilon_inf_is_the_run_without_dp(spawned):
    _, runs, _ = spawned
    (plain, plain_models), (inf, inf_models) = runs[0], runs[1]
    assert inf.loss == plain.loss
    assert torch.equal(inf_models[0], plain_models[0])
    assert inf.privacy["epsilon"] is None and plain.privacy is None


def test_dp_run_reports_the_accountants_epsilon_and_every_rank_ends_alike(spawned):
    _, runs, _ = spawned
    plain_models, (private, models) = runs[0][1], runs[2]
    for m in models[1:]:
        assert torch.equal(m, models[0])
    assert not torch.equal(models[0], plain_models[0])   # clipping and noise did reach the model
    p = private.privacy
    assert p["target_epsilon"] == EPS and p["delta"] == 1e-5 and p["clip"] == [0.05] * 3
    want = [epsilon(p["noise_multiplier"], delta=1e-5, rounds=k, population=WORLD, per_round=WORLD)
            for k in (1, 2, 3)]
    assert p["epsilon"] == pytest.approx(want, rel=1e-9)
    assert p["epsilon"][-1] <= EPS and p["epsilon"][-1] == pytest.approx(EPS, rel=1e-3)
    assert p["clipped_fraction"] == [1.0] * 3   # clip 0.05 is below every pseudo-gradient's norm
    doc = private.to_json()
    assert doc["privacy"]["epsilon"] == p["epsilon"] and doc["label"].endswith("-dp8")
    json.dumps(doc, allow_nan=False)


def test_dp_resume_is_exact(spawned):
    _, runs, _ = spawned
    (straight, a), (resumed, b) = runs[2], runs[3]
    assert resumed.loss == straight.loss
    assert resumed.privacy == straight.privacy
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_results_files_show_epsilon(spawned, tmp_path):
    from tapestry.train.cli import write_results

    _, runs, _ = spawned
    write_results(str(tmp_path), [runs[1][0], runs[2][0]], [])
    doc = json.loads((tmp_path / "results.json").read_text())
    assert [r["label"] for r in doc["runs"]] == ["diloco-mean-float32-none-dpinf", "diloco-mean-float32-none-dp8"]
    assert doc["runs"][0]["config"]["dp_epsilon"] == "inf"
    md = (tmp_path / "results.md").read_text()
    assert "mean dp eps=8: noise multiplier" in md and "mean dp eps=inf: non-private" in md


def test_resume_with_other_outer_steps_is_refused_under_dp(spawned, capsys):
    _, _, base = spawned
    argv = [*TINY_ARGV, "--dp", "central", "--epsilon", "8", "--dp-clip", "0.05"]
    argv[argv.index("--outer-steps") + 1] = "4"
    assert main(["train", *argv, "--out", str(base / "straight"), "--resume"]) == 2
    assert "outer_steps: 3 in the checkpoint, 4 now (--dp calibrated the noise" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--dp", "central", "--epsilon", "1e-4"], "epsilon 0.0001 at delta 1e-05 is unreachable for 3 rounds at "
                                               "sampling rate 1: even noise multiplier 1000 gives epsilon"),
    (["--dp", "central", "--epsilon", "4", "--delta", "0.5"], "delta 0.5 >= 1/population = 1/3"),
    (["--dp", "central", "--epsilon", "4", "--delta", "0"], "delta must be in (0, 1), got 0.0"),
    (["--dp", "central", "--epsilon", "0"], "epsilon must be > 0, got 0.0"),
    (["--dp", "central", "--epsilon", "4", "--dp-clip", "0"], "--dp-clip must be finite and > 0, got 0.0"),
    (["--dp", "central", "--epsilon", "4", "--dp-adaptive"], "adaptive clipping needs 2 sigma_b > z: 2 x 0.15 <="),
    (["--dp", "central", "--epsilon", "4", "--rule", "median"], "privatizes the mean (FedAvg), not rule 'median'"),
    (["--dp", "central", "--epsilon", "4", "--codec", "int8"], "--dp central cannot be combined with --codec int8"),
    (["--dp", "central", "--epsilon", "4", "--mode", "dataparallel"], "--mode dataparallel"),
    (["--dp", "local", "--epsilon", "4"], "--dp 'local': tapestry train has --dp central or --dp distributed"),
    (["--dp", "central"], "--dp central needs --epsilon"),
])
def test_bad_dp_settings_refused_before_spawning(tmp_path, capsys, argv, message):
    t = time.perf_counter()
    assert main(["train", *TINY_ARGV, "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert time.perf_counter() - t < 10 and not (tmp_path / "checkpoints").exists()
