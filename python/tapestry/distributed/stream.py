"""Aggregating client files that need not fit in memory, on one rank or sharded over many.

The ``n`` files define one flattened coordinate space of ``d`` values (every key, in layout order).
Rank ``r`` of ``W`` owns coordinates ``[r*d//W, (r+1)*d//W)`` (boundaries rounded down to multiples
of :data:`ALIGN`) and never reads the others.

* Per-coordinate rules (mean, trimmed mean, median) run chunk by chunk: a chunk of ``c`` columns
  of every client is read (optionally the next one by a helper thread meanwhile), aggregated by
  the rule on an in-memory view, and written to the output at its offsets. Any chunking and any ``W``
  give bit-identical results, since every coordinate sees exactly the same values and kernel.
* Every other rule gets a :class:`FileColumns` over the rank's whole shard: it reads blocks of
  ``c`` columns on demand (as many passes as the rule needs) and its ``reduce`` all-reduces the
  small float64 per-client partials (Gram matrices, distances, flags), so that every rank selects
  the same clients. Such rules return the shard's ``(d_shard,)`` float32 aggregate, which is held
  in memory until written (see :func:`plan`).

Memory model (per process, ``--memory-budget`` ``B``): a chunk of ``c`` columns costs
``c * (n * (b*s + t) + 16)`` bytes: ``b`` blocks (1, or 2 with read-ahead; ``s`` bytes per value read),
``t`` bytes per value of kernel temporaries (0 for the native kernels, 32 where the reference
backend runs: :func:`temp_bytes_per_value`) and the float32 result. Rules that are not
per-coordinate also keep ``resident_bytes(rule) * d_shard`` bytes (their aggregate, iterates) and,
for the iterative ones and NNM, float64 temporaries of ``65536`` columns. The interpreter, torch and
the loaded kernels come on top: a fixed overhead, measured at ~230 MB RSS on CPU.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from ..aggregators import Rule
from ..aggregators.base import AggregationInfo
from ..aggregators.columns import Columns, InMemory
from ..aggregators.coordinate import Mean, Median, TrimmedMean
from ..aggregators.distance import NNM, Bulyan, Krum, MultiKrum
from .formats import InputError, Layout, OutputWriter, check_layouts, open_input, write_header

PER_COORDINATE = (Mean, TrimmedMean, Median)
MIN_CHUNK = 4096  # columns: smaller chunks would spend their time in system calls
# Chunk sizes and shard boundaries are multiples of ALIGN columns: a vectorised kernel then treats
# every column alike whatever the blocking (torch's reductions, which the reference backend uses,
# take another summation order in a block's last few columns than in its vectorised body).
ALIGN = 64
# Blocks larger than this gain nothing on a CPU (system-call and kernel-launch costs are amortised
# long before) and fall out of the last-level cache between the read and the kernel.
MAX_BLOCK_BYTES = 4 << 20
MAX_BLOCK_BYTES_GPU = 64 << 20  # host-to-device copies want large transfers
REFERENCE_TEMP_BYTES = 32  # per value: the reference backend's float64 copy, sort values and indices
RULE_OPS = ("weighted_mean", "trimmed_mean", "coord_median", "gram", "mean_around_median")
PY_CHUNK = 1 << 16  # columns: the rules' own Python-side passes (distances, NNM mixing) work this wide


def temp_bytes_per_value(device) -> int:
    """Kernel temporaries per value of a block: the native kernels allocate only their ``(c,)``
    result; the reference backend (the fallback where no native kernel exists) copies to float64."""
    from .. import ops

    for op in RULE_OPS:
        try:
            if ops.resolve(op, device)[0] == "reference":
                return REFERENCE_TEMP_BYTES
        except Exception:
            return REFERENCE_TEMP_BYTES
    return 0


def resident_bytes(rule: Rule) -> int:
    """Bytes per coordinate of the shard that ``rule`` keeps in memory for the whole run."""
    if isinstance(rule, PER_COORDINATE):
        return 0
    if isinstance(rule, NNM):
        return 4 + resident_bytes(rule.rule)
    if isinstance(rule, (Krum, MultiKrum, Bulyan)):
        return 4  # the float32 aggregate
    return 40  # iterative rules: centre, next centre, their difference, float64 copies and squares


@dataclass
class Plan:
    lo: int
    hi: int
    chunk: int
    resident: int
    per_chunk: int


def plan(layout: Layout, n: int, rule: Rule, budget: int, rank: int, world: int, device="cpu", *,
         read_ahead: bool = False) -> Plan:
    """This rank's coordinate range and chunk size under ``budget`` bytes; a ``ValueError`` when the
    budget cannot hold one chunk of ``MIN_CHUNK`` columns (or the whole shard if smaller)."""
    d = layout.d
    bounds = [_align(r * d // world) for r in range(world)] + [d]
    lo, hi = bounds[rank], bounds[rank + 1]
    shard = hi - lo
    s = layout.stack_dtype.itemsize
    blocks = 2 if read_ahead and isinstance(rule, PER_COORDINATE) else 1  # the read-ahead block
    per_column = n * (blocks * s + temp_bytes_per_value(device)) + 16  # block(s), temporaries, result
    resident = resident_bytes(rule) * shard
    if not isinstance(rule, (*PER_COORDINATE, Krum, MultiKrum, Bulyan)):
        resident += n * min(shard, PY_CHUNK) * 24  # float64 distance / mixing temporaries of the rule itself
    smallest = max(1, min(MIN_CHUNK, shard))
    if budget < resident + smallest * per_column:
        need = resident + smallest * per_column
        detail = (f"{rule.name} keeps this rank's {shard} aggregated values in memory ({_fmt(resident)}), and "
                  if resident else "")
        raise ValueError(f"--memory-budget {_fmt(budget)} is too small: {detail}one chunk of {smallest} columns of "
                         f"{n} clients needs {_fmt(smallest * per_column)}; give at least {_fmt(need)}"
                         + (" or more processes" if resident else ""))
    # chunks use 3/4 of what is left: the rest is room for the allocator, the reader thread and
    # the kernels' per-thread scratch (measured: ~1.5 MB at 8 clients)
    cap = MAX_BLOCK_BYTES_GPU if torch.device(device).type == "cuda" else MAX_BLOCK_BYTES
    chunk = max(smallest, min(shard, _align((budget - resident) * 3 // 4 // per_column), _align(cap // (n * s))))
    return Plan(lo, hi, chunk, resident, chunk * per_column)


def _align(c: int) -> int:
    return c - c % ALIGN


def _fmt(b: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(b) < 1024 or unit == "TiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return str(b)


class FileColumns(Columns):
    """Columns ``lo:hi`` of the flattened space of ``files``, read block by block from disk.

    ``reduce`` sums a partial over ``group`` (every rank holding one shard) with one all-reduce;
    ``on_read(nbytes)`` is told how many bytes each read took from the files."""

    def __init__(self, files: Sequence, layout: Layout, lo: int, hi: int, chunk: int, *,
                 device: torch.device | str = "cpu", group=None, distributed: bool = False,
                 on_read: Callable[[int], None] | None = None):
        self.files, self.layout, self.lo, self.hi = files, layout, lo, hi
        self.n, self.d, self.chunk = len(files), hi - lo, max(ALIGN, _align(chunk))  # see ALIGN
        self.device = torch.device(device)
        self.dtype = layout.stack_dtype
        self.group, self.distributed, self.on_read = group, distributed, on_read

    def buffer(self, width: int | None = None) -> torch.Tensor:
        """A fresh ``(n, width)`` block buffer (``width``: the chunk) for :meth:`read`'s ``out``."""
        return torch.empty((self.n, width or min(self.chunk, self.d)), dtype=self.dtype)

    def read(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Columns ``start:stop``, read into ``out`` (a :meth:`buffer`) or, by default, into one
        buffer reused by every call: the block is valid until the next read (rules consume each
        block before reading the next, as with ``tapestry.compression.Compressed``). Reusing the
        memory keeps the resident set flat instead of at the allocator's mercy."""
        if out is None:
            if getattr(self, "_buf", None) is None or self._buf.shape[1] < stop - start:
                self._buf = self.buffer(max(stop - start, min(self.chunk, self.d)))
            out = self._buf
        out = out.view(-1)[: self.n * (stop - start)].view(self.n, stop - start)  # contiguous, like a fresh block
        nbytes, width, size = 0, stop - start, self.dtype.itemsize
        raw = memoryview(out.view(torch.uint8).numpy().reshape(-1)) if out.numel() else None  # byte view, made once
        for ki, a, b, col in self.layout.pieces(self.lo + start, self.lo + stop):
            key = self.layout.keys[ki]
            c0 = col - self.lo - start
            for i, f in enumerate(self.files):
                native = f.native_dtype(key)
                if native == self.dtype and f.reads_bytes:  # pread straight into the block's row
                    at = (i * width + c0) * size
                    nbytes += f.read_into(key, a, b, raw[at : at + (b - a) * size])
                elif native == self.dtype:
                    nbytes += f.read_into(key, a, b, out[i, c0 : c0 + b - a])
                else:  # mixed dtypes: read the file's own dtype, cast like as_matrix does
                    scratch = torch.empty(b - a, dtype=native)
                    nbytes += f.read_into(key, a, b, scratch)
                    out[i, c0 : c0 + b - a].copy_(scratch)
        if self.on_read is not None:
            self.on_read(nbytes)
        if self.device.type != "cpu":
            out = out.pin_memory().to(self.device, non_blocking=True)
        return out

    def blocks(self):
        if self.d == 0:
            yield 0, 0
        for start in range(0, self.d, self.chunk):
            yield start, min(start + self.chunk, self.d)

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            partial = partial.contiguous()
            dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=self.group)
        return partial


def aggregate_shard(src: FileColumns, rule: Rule, write: Callable[[int, torch.Tensor], None], *,
                    read_ahead: bool = False) -> AggregationInfo:
    """Aggregate this rank's shard ``src`` and hand each piece of the result to ``write(start, values)``
    (``start`` relative to the shard). Per-coordinate rules stream chunk by chunk without any
    communication; the others run once over ``src``.

    ``read_ahead``: a helper thread reads the next chunk into a second buffer while this one is
    aggregated. Off by default: measured on a loaded 2-core machine it made runs 1.3-1.8x slower
    (the reader's many short system calls each wait to retake the GIL from the main thread);
    it can pay off where cores are free and the kernel's time is close to the read's."""
    if not isinstance(rule, PER_COORDINATE):
        agg, info = rule.aggregate(src, want_info=True)
        write(0, agg)
        return info
    ranges = list(src.blocks())
    nonfinite: set[int] = set()
    info = None
    prefetch = read_ahead and len(ranges) > 1
    bufs = [src.buffer(), src.buffer() if prefetch else None]  # double buffering when reading ahead
    with ThreadPoolExecutor(max_workers=1) if prefetch else contextlib.nullcontext() as pool:
        pending = pool.submit(src.read, *ranges[0], bufs[0]) if prefetch else None
        for i, (a, b) in enumerate(ranges):
            if prefetch:
                block = pending.result()
                # read the next chunk into the other buffer (pread releases the GIL) while this
                # one is aggregated; that buffer's previous chunk is already written out
                if i + 1 < len(ranges):
                    pending = pool.submit(src.read, *ranges[i + 1], bufs[(i + 1) % 2])
            else:
                block = src.read(a, b, bufs[0])
            # no diagnostics pass per chunk (it would cost as much as the rule); mean still names
            # the clients behind a non-finite result
            agg, info = rule.aggregate(InMemory(block), want_info=False)
            nonfinite.update(info.nonfinite)
            del block
            write(a, agg)
    info.nonfinite = sorted(nonfinite)
    return info


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
            _unlink(tmp)
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
        bar = _Progress(job.progress and rank == 0, len(files) * (pl.hi - pl.lo) * layout.stack_dtype.itemsize,
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
            _unlink(tmp)
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
                _unlink(tmp)
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


def _unlink(path: str | None) -> None:
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


class _Progress:
    """A rich progress bar of bytes read and throughput (rank 0, on a terminal only)."""

    def __init__(self, enabled: bool, total: int, *, per_coordinate: bool, world: int):
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TransferSpeedColumn)
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                TimeElapsedColumn(), console=Console(stderr=True), transient=False)
            what = "reading" if per_coordinate else "reading (several passes)"
            self.task = self.bar.add_task(f"{what}" + (f" [rank 0 of {world}]" if world > 1 else ""),
                                          total=total if per_coordinate else None)

    def advance(self, nbytes: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, nbytes)

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False
