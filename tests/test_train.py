"""``tapestry train`` end to end on spawned gloo ranks (loopback only), with a tiny model.

One configuration is trained three times (4 outer steps straight; 2 steps, then ``--resume`` to
4): the resumed run must equal the straight one bit for bit (losses, global model, every rank's
AdamW state), a NaN sender under the median must be named on every rank and never reach the
model, and the results files must be written. Refusals (another configuration at ``--resume``,
Krum with too few participants) happen before any rank starts. A rank that dies makes the
others fail within the timeout.
"""

from __future__ import annotations

import datetime
import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tapestry.cli import build_parser, main
from tapestry.distributed.launch import free_port
from tapestry.train import TrainConfig, TrainJob, train_rank

TINY = ["--participants", "3", "--inner-steps", "3", "--width", "16", "--heads", "2", "--layers", "1",
        "--context", "16", "--batch-size", "8", "--files", "1", "--chars-per-file", "5000", "--warmup", "2",
        "--quiet"]
NAN_MEDIAN = TINY + ["--rule", "median", "--attack", "nan", "--byzantine", "0.34"]


def _ckpt(out) -> dict:
    return torch.load(os.path.join(out, "checkpoints", "diloco-median-float32-nan.pt"), weights_only=True)


def _two_then_resume(jobs, *, rank, world, device=None):
    """One spawn for both halves (saves a start of every rank): 2 steps, then --resume to 4."""
    return [train_rank(job, rank=rank, world=world) for job in jobs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(straight 4 steps through the CLI, 2 steps then resumed to 4) output directories, and the
    record of the 2-step half."""
    from tapestry.distributed import launch
    from tapestry.train.cli import configs_from, write_results

    a, b = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("resumed")
    assert main(["train", *NAN_MEDIAN, "--outer-steps", "4", "--out", str(a)]) == 0
    cfg4 = configs_from(build_parser().parse_args(["train", *NAN_MEDIAN, "--outer-steps", "4"]))[0]
    cfg2 = TrainConfig.from_dict({**cfg4.to_dict(), "outer_steps": 2})
    two, four = launch.spawn([TrainJob(cfg2, out=str(b)), TrainJob(cfg4, out=str(b), resume=True)], 3, "cpu",
                             target=_two_then_resume)
    write_results(str(b), [four], [])
    return a, b, two.to_json()


def test_results_files_and_nan_sender_never_reaches_the_model(runs):
    a, _, _ = runs
    doc = json.loads((a / "results.json").read_text())
    (run,) = doc["runs"]
    assert {"rule", "attack", "codec", "loss", "bytes_sent", "seconds"} <= set(run)
    assert (run["rule"], run["attack"], run["codec"]) == ("median", "nan", "float32")
    assert len(run["loss"]) == 4 and all(isinstance(x, float) for x in run["loss"])
    assert run["loss"][-1] < run["initial_loss"]           # it learnt despite the NaN sender
    assert isinstance(run["bytes_sent"], int) and run["bytes_sent"] > 0 and isinstance(run["seconds"], float)
    # the NaN sender is named at every outer step (the same on every rank: checked on rank 0)
    (byz,) = run["byzantine_ranks"]
    assert run["nonfinite"] == [[s, [byz]] for s in range(1, 5)]
    assert run["nonfinite_steps"] == 0
    ck = _ckpt(a)
    assert torch.isfinite(ck["global"]).all()
    assert "median" in (a / "results.md").read_text()
    assert (a / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_is_exact(runs):
    a, b, two = runs
    straight = json.loads((a / "results.json").read_text())["runs"][0]
    resumed = json.loads((b / "results.json").read_text())["runs"][0]
    assert resumed["loss"][:2] == two["loss"]
    assert resumed["loss"] == straight["loss"]
    assert resumed["bytes_sent_by_rank"] == straight["bytes_sent_by_rank"]
    ca, cb = _ckpt(a), _ckpt(b)
    assert ca["step"] == cb["step"] == 4
    assert torch.equal(ca["global"], cb["global"])
    for key, value in ca["outer"].items():
        if key != "name":
            assert repr(value) == repr(cb["outer"][key])
    for ra, rb in zip(ca["ranks"], cb["ranks"]):
        assert ra["data"] == rb["data"] and torch.equal(ra["rng"], rb["rng"])
        for pa, pb in zip(ra["inner"]["state"].values(), rb["inner"]["state"].values()):
            assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_resume_with_another_configuration_is_refused(runs, capsys):
    _, b, _ = runs
    before = (b / "results.json").read_text()
    argv = [x if x != "3" else "4" for x in NAN_MEDIAN]  # --inner-steps 4 (and --participants 4)
    assert main(["train", *argv, "--outer-steps", "5", "--out", str(b), "--resume", "--lr", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err
    assert "inner_steps: 3 in the checkpoint, 4 now" in err and "lr: 0.003 in the checkpoint, 0.01 now" in err
    assert (b / "results.json").read_text() == before


def test_resume_without_a_checkpoint_is_refused(tmp_path, capsys):
    assert main(["train", *TINY, "--out", str(tmp_path), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--rule", "krum", "--f", "1"], "krum needs n >= 2f+3, got n=3, f=1"),
    (["--rule", "trimmed_mean", "--f", "2"], "trimmed_mean needs 2f < n, got n=3, f=2"),
    (["--attack", "labelflip"], "classification"),
    (["--mode", "dataparallel", "--codec", "int8"], "--mode dataparallel"),
    (["--byzantine", "0.9", "--attack", "signflip"], "makes all 3 participants Byzantine"),
])
def test_bad_configurations_refused_before_training(tmp_path, capsys, argv, message):
    t = time.perf_counter()
    assert main(["train", *TINY, "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert time.perf_counter() - t < 5 and not (tmp_path / "checkpoints").exists()


def _dying(rank, world, port, out, queue):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=5))
    if rank == 1:
        os._exit(3)  # dies without a word
    cfg = TrainConfig(participants=2, inner_steps=2, outer_steps=3, width=16, heads=2, layers=1, context=16,
                      batch_size=8, files=1, chars_per_file=5000, timeout=5.0)
    t = time.perf_counter()
    try:
        train_rank(TrainJob(cfg, out=out), rank=rank, world=world)
        queue.put(("no error", 0.0))
    except Exception as exc:
        queue.put((f"{type(exc).__name__}: {exc}", time.perf_counter() - t))


def test_a_dead_rank_fails_the_others_within_the_timeout(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_dying, args=(r, 2, port, str(tmp_path), queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    message, seconds = queue.get()
    assert message.startswith("CollectiveError: tapestry train: rank 0: the all-reduce of outer step 1 failed"), message
    assert seconds < 20
