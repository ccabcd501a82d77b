"""Starting the ranks of an aggregation job: one process, ``torchrun``, or ``--nproc`` spawned here.

The process-group backend follows the device: NCCL when kernels run on GPUs, gloo on CPUs.
Spawned local ranks talk over loopback only (127.0.0.1, a free port, ``GLOO_SOCKET_IFNAME=lo``).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pickle
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .._native import set_num_threads
from .job import Job, Result, Terminated, run_job, terminate_raises, tmp_path_for, unlink

TIMEOUT = datetime.timedelta(minutes=30)


def _device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA GPU is visible")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def run(job: Job, *, nproc: int = 1, device: str = "auto", target=run_job,
        timeout: datetime.timedelta = TIMEOUT) -> Result | None:
    """Run ``job`` in this process, as a torchrun rank, or over ``nproc`` spawned local ranks;
    the result comes back on rank 0 (this process for ``nproc``). ``target(job, rank=, world=,
    device=)`` does the work on every rank (default: an aggregation job); ``timeout``: the process
    group's, for every collective."""
    if dist.is_available() and dist.is_initialized():
        dev = _device(device, int(os.environ.get("LOCAL_RANK", "0")))
        return target(job, rank=dist.get_rank(), world=dist.get_world_size(), device=dev)
    if under_torchrun():
        if nproc != 1:
            raise ValueError("--nproc is for local runs; under torchrun use --nproc-per-node")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        dev = _device(device, local)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(_backend(dev), timeout=timeout)
        try:
            return target(job, rank=dist.get_rank(), world=dist.get_world_size(), device=dev)
        finally:
            dist.destroy_process_group()
    if nproc == 1 and target is run_job:
        return run_job(job, device=_device(device, 0))
    return spawn(job, nproc, device, target=target, timeout=timeout)


def spawn(job: Job, nproc: int, device: str = "auto", *, target=run_job, timeout: datetime.timedelta = TIMEOUT) -> Result:
    """``nproc`` local ranks (spawned, loopback only); errors come back with their own type."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    # the temporary output's name is chosen here, so that this process can remove it on SIGTERM
    if isinstance(job, Job):
        job = dataclasses.replace(job, tmp=job.tmp or tmp_path_for(os.path.abspath(job.output)))
    procs = None
    messages = []

    def drain():  # read while waiting: a result larger than the pipe's buffer blocks its writer until read
        while not queue.empty():
            messages.append(queue.get())

    try:
        with terminate_raises():
            threads = max(1, torch.get_num_threads() // nproc)
            procs = mp.start_processes(_worker, args=(nproc, port, job, device, queue, threads, target, timeout), nprocs=nproc,
                                       join=False, start_method="spawn")
            while not procs.join(timeout=0.1):
                drain()
    except mp.ProcessRaisedException:
        pass  # the worker's error is in the queue
    except mp.ProcessExitedException as exc:
        raise RuntimeError(f"an aggregation process died ({exc})") from None
    except Terminated:
        for p in procs.processes if procs else []:
            if p.is_alive():
                p.terminate()  # SIGTERM: each rank stops and rank 0 removes the temporary file
        for p in procs.processes if procs else []:
            p.join(10)
            if p.is_alive():
                p.kill()
        unlink(getattr(job, "tmp", None))
        raise
    drain()
    result, errors = None, []
    for kind, rank, payload in messages:
        if kind == "result":
            result = pickle.loads(payload)
        else:
            errors.append((rank, payload))
    if errors:
        rank, (etype, message) = min(errors)
        raise {"ValueError": ValueError, "TypeError": TypeError, "KeyboardInterrupt": KeyboardInterrupt}.get(
            etype, RuntimeError)(message)
    if result is None:
        raise RuntimeError("rank 0 returned no result")
    return result


def _worker(rank: int, world: int, port: int, job: Job, device: str, queue, threads: int, target, timeout) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    set_num_threads(threads)  # the parent's cores, shared: no oversubscription
    dev = _device(device, rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(_backend(dev), init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timeout)
    try:
        result = target(job, rank=rank, world=world, device=dev)
        if rank == 0:
            # plain pickle: torch's queue reducers would share tensors through this process's fds
            queue.put(("result", rank, pickle.dumps(result)))
    except BaseException as exc:
        queue.put(("error", rank, (type(exc).__name__, str(exc))))
        raise
    finally:
        dist.destroy_process_group()
