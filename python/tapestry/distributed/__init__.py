"""Cluster aggregation on ``torch.distributed``: streamed from files, sharded over ranks.

* ``tapestry aggregate`` (:mod:`.cli`): client files in, one aggregate file out, under a memory
  budget, in one process, ``--nproc N`` local processes or ``torchrun`` ranks (gloo on CPUs, NCCL on
  GPUs). :func:`aggregate_files` is the same from Python.
* :func:`aggregate`: for updates already sharded across ranks (FSDP): each rank passes its
  ``(n, d_local)`` part and gets its part of the aggregate; distance-based rules all-reduce one
  small float64 partial per pass so every rank selects the same clients.
* :func:`all_reduce`: each rank is one participant with its whole update (DiLoCo's pseudo-gradients);
  every rank gets the same robust aggregate for the bytes of a plain ring all-reduce
  (:mod:`.allreduce`).
"""

from __future__ import annotations

from .allreduce import CollectiveError, all_reduce
from .formats import InputError, Layout, check_layouts, open_input
from .sharded import ShardColumns, aggregate
from .job import Job, Result, run_job
from .memory import plan
from .stream import FileColumns


def aggregate_files(inputs, output, rule, *, memory_budget: int = 1 << 30, nproc: int = 1, device: str = "auto",
                    progress: bool = False) -> Result | None:
    """Aggregate the client files ``inputs`` with ``rule`` into the safetensors file ``output``
    (see ``tapestry aggregate``); returns the run's :class:`Result` (None on non-zero ranks)."""
    from . import launch

    return launch.run(Job(list(map(str, inputs)), str(output), rule, int(memory_budget), progress=progress),
                      nproc=nproc, device=device)


__all__ = ["all_reduce", "CollectiveError", "aggregate", "aggregate_files", "ShardColumns", "FileColumns", "Job", "Result", "InputError", "Layout",
           "check_layouts", "open_input", "plan", "run_job"]
