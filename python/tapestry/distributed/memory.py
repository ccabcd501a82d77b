"""How much of a shard ``tapestry aggregate`` reads at a time, from the memory budget.

Memory model (per process, ``--memory-budget`` ``B``): a chunk of ``c`` columns costs
``c * (n * (b*s + t) + 16)`` bytes: ``b`` blocks (1, or 2 with read-ahead; ``s`` bytes per value read),
``t`` bytes per value of kernel temporaries (0 for the native kernels, 32 where the reference
backend runs: :func:`temp_bytes_per_value`) and the float32 result. Rules that are not
per-coordinate also keep ``resident_bytes(rule) * d_shard`` bytes (their aggregate, iterates) and,
for the iterative ones and NNM, float64 temporaries of ``65536`` columns. The interpreter, torch and
the loaded kernels come on top: a fixed overhead, measured at ~230 MB RSS on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..aggregators import Rule
from ..backends import ROBUST_OPS
from ..aggregators.coordinate import Mean, Median, TrimmedMean
from ..aggregators.distance import NNM, Bulyan, Krum, MultiKrum
from .formats import Layout

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
PY_CHUNK = 1 << 16  # columns: the rules' own Python-side passes (distances, NNM mixing) work this wide


def temp_bytes_per_value(device) -> int:
    """Kernel temporaries per value of a block: the native kernels allocate only their ``(c,)``
    result; the reference backend (the fallback where no native kernel exists) copies to float64."""
    from .. import ops

    for op in ROBUST_OPS:
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
    bounds = [align(r * d // world) for r in range(world)] + [d]
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
    chunk = max(smallest, min(shard, align((budget - resident) * 3 // 4 // per_column), align(cap // (n * s))))
    return Plan(lo, hi, chunk, resident, chunk * per_column)


def align(c: int) -> int:
    return c - c % ALIGN


def _fmt(b: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(b) < 1024 or unit == "TiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return str(b)
