"""One ``tapestry aggregate`` job on one rank or many: every input validated on every rank before
any output exists, the ranks' outcomes agreed (all fail together, never a hang), the shard streamed
(:mod:`.stream`) into a temporary file that rank 0 renames into place only when every rank
succeeded, and removed on any failure or SIGTERM.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..aggregators import Rule
from ..aggregators.base import AggregationInfo
from ..aggregators.columns import InMemory
from .formats import InputError, OutputWriter, check_layouts, open_input, write_header
from .memory import PER_COORDINATE, plan
from .progress import Progress
from .stream import FileColumns, aggregate_shard

@dataclass
class Job:
    """One ``tapestry aggregate`` run, as every rank sees it."""

    inputs: list[str]
    output: str
    rule: Rule
    memory_budget: int
    progress: bool = True
    read_ahead: bool = False  # see aggregate_shard
    metadata: dict | None = None
    tmp: str | None = None  # the temporary output's path (a launcher sets it to remove it on SIGTERM)


@dataclass
class Result:
    info: AggregationInfo
    d: int
    n: int
    bytes_read: int
    seconds: float
    chunk: int


def _check_output(inputs: list[str], output: str) -> str:
    out = os.path.abspath(output)
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise InputError(f"output directory {parent} does not exist")
    if os.path.isdir(out):
        raise InputError(f"output {output} is a directory")
    for p in inputs:
        same = os.path.realpath(p) == os.path.realpath(out)
        if not same and os.path.exists(out) and os.path.exists(p):
            same = os.path.samefile(p, out)
        if same:
            raise InputError(f"output {output} is also an input; write the aggregate elsewhere")
    return out


def _agree(local_error: str | None, signature, world: int, group) -> None:
    """Every rank learns every rank's validation outcome, so that all fail together (no hang)."""
    if world == 1:
        if local_error:
            raise InputError(local_error)
        return
    gathered = [None] * world
    dist.all_gather_object(gathered, (local_error, signature), group=group)
    for r, (err, _) in enumerate(gathered):
        if err:
            raise InputError(err if world == 1 else f"rank {r}: {err}")
    count0, layout0 = gathered[0][1]
    for r, (_, (count, layout)) in enumerate(gathered):
        if count != count0:
            raise InputError(f"rank {r} has {count} input files, rank 0 has {count0}; every rank must get the same inputs")
        if layout != layout0:
            raise InputError(f"rank {r}'s input files hold other keys, shapes or dtypes than rank 0's")


def run_job(job: Job, *, rank: int = 0, world: int = 1, group=None, device: torch.device | str = "cpu") -> Result | None:
    """Run ``job`` as ``rank`` of ``world`` (``torch.distributed`` initialised when ``world > 1``).
    Every input is validated, on every rank, before the output's temporary file exists; the result
    is renamed into place by rank 0 only when every rank wrote its part. Returns the result on
    rank 0 (None elsewhere)."""
    files, error, signature, layout = [], None, None, None
    try:
        if len(set(map(os.path.realpath, job.inputs))) != len(job.inputs):
            raise InputError("an input file is given twice")
        out = _check_output(job.inputs, job.output)
        for p in job.inputs:
            files.append(open_input(p))
        layout = check_layouts(files)
        pl = plan(layout, len(files), job.rule, job.memory_budget, rank, world, device, read_ahead=job.read_ahead)
        # the rule's requirements (2f < n, n >= 2f+3...) on a copy, before any output exists
        copy.deepcopy(job.rule).aggregate(InMemory(torch.zeros(len(files), 1)), want_info=False)
        signature = (len(files), layout.signature())
    except (ValueError, TypeError) as exc:
        error = str(exc)
    try:
        _agree(error, signature, world, group)
        return _run(job, files, layout, pl, out, rank, world, group, device)
    finally:
        for f in files:
            f.close()


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: the run stops and removes its temporary output (exit status 143)."""

    exit_code = 143


@contextlib.contextmanager
def terminate_raises():
    """While active (main thread only), SIGTERM raises :class:`Terminated`, so that ``finally``
    blocks run and no temporary output is left behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(f"terminated by signal {signum}; no output written")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def tmp_path_for(out: str) -> str:
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.{uuid.uuid4().hex[:12]}.tmp")


def _run(job, files, layout, pl, out, rank, world, group, device):
    with terminate_raises():
        return _run_guarded(job, files, layout, pl, out, rank, world, group, device)


def _run_guarded(job, files, layout, pl, out, rank, world, group, device):
    # rank 0 creates the temporary file (header written, data area preallocated) in the output's
    # directory and tells every rank its name and the keys' byte offsets, or why it could not
    tmp, starts, error = None, None, None
    if rank == 0:
        tmp = job.tmp or tmp_path_for(out)
        meta = {"tapestry": f"aggregate rule={job.rule!r} n={len(files)}", **(job.metadata or {})}
        try:
            _, starts = write_header(tmp, layout, {k: str(v) for k, v in meta.items()})
        except OSError as exc:
            error = f"cannot create {tmp}: {exc.strerror}"
        except BaseException:
            unlink(tmp)
            raise
    if world > 1:
        box = [(tmp, starts, error)]
        dist.broadcast_object_list(box, src=0, group=group)
        tmp, starts, error = box[0]
    if error:
        raise InputError(error)
    ok = terminated = False
    try:
        writer = OutputWriter(tmp, layout, starts)
        read_total = [0]
        bar = Progress(job.progress and rank == 0, len(files) * (pl.hi - pl.lo) * layout.stack_dtype.itemsize,
                        per_coordinate=isinstance(job.rule, PER_COORDINATE), world=world)
        lock = threading.Lock()

        def on_read(nbytes):
            with lock:
                read_total[0] += nbytes
            bar.advance(nbytes)

        src = FileColumns(files, layout, pl.lo, pl.hi, pl.chunk, device=device, group=group,
                          distributed=world > 1, on_read=on_read)
        t0 = time.perf_counter()
        try:
            with bar:
                info = aggregate_shard(src, job.rule, lambda start, v: writer.write(pl.lo + start, v),
                                       read_ahead=job.read_ahead)
        finally:
            writer.close(sync=True)
        seconds = time.perf_counter() - t0
        ok = True
    except Terminated:
        terminated = True
        if rank == 0:  # no agreement with the other ranks: they are being stopped too
            unlink(tmp)
        raise
    finally:
        # every rank reports; rank 0 publishes the file only if all succeeded
        flags = [ok] * world
        if world > 1 and not terminated:
            try:
                dist.all_gather_object(flags, ok, group=group)
            except Exception:
                flags = [False]
        if rank == 0:
            if ok and all(flags):
                os.replace(tmp, out)
                _fsync_dir(os.path.dirname(out))
            else:
                unlink(tmp)
    if not all(flags):
        bad = [r for r, f in enumerate(flags) if not f]
        raise RuntimeError(f"aggregation failed on rank(s) {bad}; no output written")
    if world > 1:
        info.nonfinite = _gather_union(info.nonfinite, world, group)
        totals = [0] * world
        dist.all_gather_object(totals, read_total[0], group=group)
        read_total[0] = sum(totals)
    return Result(info, layout.d, len(files), read_total[0], seconds, pl.chunk) if rank == 0 else None


def _gather_union(items: list[int], world: int, group) -> list[int]:
    gathered = [None] * world
    dist.all_gather_object(gathered, list(items), group=group)
    return sorted(set().union(*map(set, gathered)))


def unlink(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
