"""Shared by the trainer's DP tests: every training job on one rank, spied on."""

from __future__ import annotations

import datetime
import math
import os

import torch
import torch.distributed as dist


def spawn_runs(base, config, dp: str, eps: float, target, world: int):
    """Spawn ``world`` ranks running ``target`` on four jobs: no DP, ``dp`` at epsilon inf, ``dp``
    at ``eps`` straight, and the same resumed from the straight run's step 2 (see :func:`run_jobs`);
    ``(steps, runs, base)`` as rank 0 saved them."""
    from tapestry.distributed import launch
    from tapestry.train import TrainJob

    straight, resumed = os.path.join(base, "straight"), os.path.join(base, "resumed")
    private = config(dp=dp, dp_epsilon=eps, dp_clip=0.05)
    jobs = [TrainJob(config()), TrainJob(config(dp=dp, dp_epsilon=math.inf)),
            TrainJob(private, out=straight), TrainJob(private, out=resumed, resume=True)]
    os.makedirs(resumed)
    path = launch.spawn((jobs, os.path.join(base, "out.pt")), world, "cpu", target=target,
                        timeout=datetime.timedelta(seconds=120))
    steps, runs = torch.load(path, weights_only=False)
    return steps, runs, base


def run_jobs(jobs, path: str, steps, *, rank: int, world: int, eps: float) -> str:
    """Run ``jobs`` on this rank, recording the global model after each outer step and keeping the
    step-2 checkpoint of the ``straight`` run at epsilon ``eps`` as the ``resumed`` run's start;
    rank 0 saves ``(every rank's steps, runs)`` to ``path`` (per job: the record and every rank's
    final model; too large for the launcher's pipe) and every rank returns ``path``."""
    from tapestry.train import checkpoint, loop, train_rank

    last = {}
    set_params, save = loop._set_params, checkpoint.save

    def spy_set(model, w):  # the global model every rank moves to after an outer step
        last["w"] = w.clone()
        set_params(model, w)

    def spy_save(path, doc):
        save(path, doc)
        if doc["step"] == 2 and doc["config"]["dp_epsilon"] == eps and "straight" in path:
            save(path.replace("straight", "resumed"), doc)
    loop._set_params, checkpoint.save = spy_set, spy_save

    runs = []
    for job in jobs:
        record = train_rank(job, rank=rank, world=world)
        models = [torch.empty_like(last["w"]) for _ in range(world)]
        dist.all_gather(models, last["w"])
        runs.append((record, models))
    gathered = [None] * world
    dist.all_gather_object(gathered, steps)
    if rank == 0:
        torch.save((gathered, runs), path)
    return path
