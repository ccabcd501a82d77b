"""The op table: every op declared once, every backend implementing it under the same name.

An op is plain arithmetic on tensors whose shapes, dtypes and parameters were already checked by
the caller (the rules in :mod:`tapestry.aggregators`, the codecs, the secure-sum protocol). A
backend is a module that defines a function named exactly like each op it implements:

=============  ===============================  ==============================================
backend        module                           takes
=============  ===============================  ==============================================
``cuda``       ``tapestry.backends.cuda``       CUDA tensors (needs ``tapestry._cuda`` + a GPU)
``triton``     ``tapestry.backends.triton``     CUDA tensors; CPU tensors under TRITON_INTERPRET=1
``cpu``        ``tapestry.backends.cpu``        CPU tensors (needs ``tapestry._C``)
``reference``  ``tapestry.reference``           anything: readable PyTorch, the executable docs/spec.md
=============  ===============================  ==============================================

``auto`` walks that list in order and takes the first backend that is available, implements the
op and accepts the inputs (the Triton interpreter is never chosen automatically: it is a test
vehicle, not a fast path). ``TAPESTRY_BACKEND=cpu`` or ``with tapestry.backend("cpu"):`` forces
one; forcing a backend that cannot run the op on these inputs raises :class:`BackendError` with
the reason. Every backend skipped, and why, is logged on the ``tapestry.ops`` logger at DEBUG
level, so a slow path is never silent; ``tapestry info`` prints the op x backend table.

Each backend module provides ``unavailable() -> str | None`` (why it cannot run at all) and
``rejects(op, device, args) -> str | None``: why it cannot run ``op`` on tensors on ``device``
with the arguments ``args`` (dtype, row count, sizes; ``args`` is empty when only the device is
known). A backend that accepts the inputs runs them itself: no backend falls back inside itself,
so the name dispatch returns (and ``info.backend``) is the backend that ran.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import os
from types import ModuleType
from collections.abc import Callable, Iterator

import torch

log = logging.getLogger(__name__)

# Every op, with its contract. The reference implementation in tapestry.reference is the
# executable form of each line.
OPS: dict[str, str] = {
    # -- robust aggregation (per coordinate; X is (n, d) float32/float16/bfloat16, any strides
    #    with unit stride along d; results are float32, float64 for float64 input)
    "weighted_mean": "(X, w: (n,) float64 on the CPU) -> (d,): sum_i w_i x_i; rows with w_i == 0 are not read",
    "trimmed_mean": "(X, f: int, 0 <= 2f < n) -> (d,): per coordinate, mean of the values ranked f .. n-f-1",
    "coord_median": "(X) -> (d,): per coordinate median, mean of the two middle values for even n",
    "mean_around_median": "(X, rows: (m,) int64, k: int) -> (d,): per coordinate over rows, mean of the k values closest to their median",
    "gram": "(X) -> (n, n) float64: Gram matrix of the rows after a common per-coordinate shift",
    "anchor_dots": "(X, z: (d,) float32) -> (n, 3) float64: per row, sum (x_i - z)^2, x_i . z, |x_i|^2 (float64 sums)",
    # -- compression (see tapestry.compression)
    #    blockwise symmetric absmax, float32 steps shared bit for bit by every backend (reference.py);
    #    key = (k0, k1) uint32 generator key for stochastic rounding, None for round to nearest;
    #    block even, 2..4096; the dequantize ops decode n rows per call (list arguments, one per row)
    "quantize_int8": "(x: (m,) float32/float16/bfloat16 contiguous, block, key, out=None: (q, scales) to fill) -> (q: (m,) int8, scales: (ceil(m/block),) float32)",
    "dequantize_int8": "(qs: [n x int8 codes], scales: [n x float32], block, outs: [n x (m,) float32 contiguous], start=0) -> outs: values start .. start+m-1 (start a multiple of block)",
    "quantize_int4": "(x: (m,) float32/float16/bfloat16 contiguous, block, key, out=None) -> (packed: (ceil(m/2),) uint8, scales)",
    "dequantize_int4": "(qs: [n x packed uint8], scales: [n x float32], block, outs: [n x (m,) float32], start=0) -> outs",
    #    fused decode-and-aggregate: the op on the rows that decoding n payloads of one codec gives
    #    (codec "int8": int8 codes, "int4": packed uint8, with float32 scales per block; "fp16" /
    #    "bf16": 16-bit values, scales None), bit for bit, without materialising them
    "weighted_mean_encoded": "(qs, scales, codec, block, d, w) -> (d,): weighted_mean of the n decoded rows",
    "gram_encoded": "(qs, scales, codec, block, d) -> (n, n) float64: gram of the n decoded rows",
    "trimmed_mean_encoded": "(qs, scales, codec, block, d, f) -> (d,): trimmed_mean of the n decoded rows",
    "coord_median_encoded": "(qs, scales, codec, block, d) -> (d,): coord_median of the n decoded rows",
    "mean_around_median_encoded": "(qs, scales, codec, block, d, rows, k) -> (d,): mean_around_median of the n decoded rows",
    # -- secure sum (see tapestry.secure)
    #    ring elements are uint32 stored as int32 bit patterns; key (8,) / keys (m, 8) and nonce (3,)
    #    are int32 words on the data's device; offsets count keystream words (docs/spec.md layout)
    "chacha20_keystream": "(key, nonce, offset: int, count: int) -> (count,) int32: ChaCha20 words offset .. offset+count-1",
    "chacha20_mask": "(x: (d,) int32, keys: (m, 8), signs: (m,) int8 of +-1, nonce, offset: int, out=None) -> (d,) int32: x + sum_j signs_j PRG(keys_j)[offset:offset+d] mod 2^32",
    # -- differential privacy (see tapestry.privacy)
    "fwht": "(x: (D,) float32 contiguous, D a power of two, signs: (ceil(D/32),) int32 sign words or None, scale: float, out=None, *, signs_after=False) -> (D,) float32: scale * H diag(signs) x (signs_after: diag(signs) scale H x), stages h = 1, 2, 4, ... in order",
}

BACKENDS: dict[str, str] = {
    "cuda": "tapestry.backends.cuda",
    "triton": "tapestry.backends.triton",
    "cpu": "tapestry.backends.cpu",
    "reference": "tapestry.reference",
}
AUTO = "auto"


class BackendError(RuntimeError):
    """A forced backend cannot run, or no backend can run an op on the given inputs."""


_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("tapestry_backend", default=None)
_modules: dict[str, ModuleType | Exception] = {}


def _module(name: str) -> ModuleType:
    """Import a backend module once; an import failure is kept and reported as its reason."""
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(BACKENDS[name])
        except Exception as exc:  # a broken optional backend must not break `import tapestry`
            _modules[name] = exc
    mod = _modules[name]
    if isinstance(mod, Exception):
        raise BackendError(f"backend {name!r} failed to import: {mod!r}")
    return mod


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run on this machine, or None when it can."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid: {', '.join([AUTO, *BACKENDS])}")
    try:
        return _module(name).unavailable()
    except BackendError as exc:
        return str(exc)


def available_backends() -> list[str]:
    """Backends that can run on this machine, fastest first."""
    return [b for b in BACKENDS if unavailable_reason(b) is None]


def _requested() -> str:
    name = _forced.get() or os.environ.get("TAPESTRY_BACKEND") or AUTO
    if name != AUTO and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid: {', '.join([AUTO, *BACKENDS])}")
    return name


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block: "reference", "cpu", "triton", "cuda" or "auto"."""
    if name != AUTO and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid: {', '.join([AUTO, *BACKENDS])}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def why_not(name: str, op: str, device: torch.device | str, args: tuple = ()) -> str | None:
    """Why backend ``name`` cannot run ``op`` on ``device`` with ``args``, or None when it can."""
    reason = unavailable_reason(name)
    if reason is not None:
        return reason
    mod = _module(name)
    if not hasattr(mod, op):
        return f"does not implement {op}"
    return mod.rejects(op, torch.device(device), args)


def auto_skip_reason(name: str, op: str, device: torch.device | str, args: tuple = ()) -> str | None:
    """Why ``auto`` passes over backend ``name`` for ``op`` (:func:`why_not`, and the Triton
    interpreter is never chosen for CPU tensors), or None when it would take it."""
    if name == "triton" and torch.device(device).type == "cpu":
        return "not chosen automatically for CPU tensors (interpreter only)"
    return why_not(name, op, device, args)


def resolve(op: str, device: torch.device | str, args: tuple = ()) -> tuple[str, Callable]:
    """The backend name and function that run ``op`` on tensors on ``device`` with arguments
    ``args`` (pass them where known: a backend may take the device but not the inputs)."""
    if op not in OPS:
        raise KeyError(f"unknown op {op!r}")
    device = torch.device(device)
    name = _requested()
    if name != AUTO:
        reason = why_not(name, op, device, args)
        if reason is not None:
            raise BackendError(f"backend {name!r} cannot run {op} on {device}: {reason}")
        return name, getattr(_module(name), op)
    reasons = []
    for candidate in BACKENDS:
        reason = auto_skip_reason(candidate, op, device, args)
        if reason is None:
            log.debug("%s on %s -> %s", op, device, candidate)
            return candidate, getattr(_module(candidate), op)
        log.debug("%s on %s: skipping %s (%s)", op, device, candidate, reason)
        reasons.append(f"  {candidate}: {reason}")
    raise BackendError(f"no backend can run {op} on {device}:\n" + "\n".join(reasons))


def call(op: str, *tensors_and_args, device: torch.device | str | None = None, **kwargs):
    """Run ``op`` on the backend chosen for the device of its first tensor argument."""
    if device is None:
        device = next(a.device for a in tensors_and_args if isinstance(a, torch.Tensor))
    _, fn = resolve(op, device, tensors_and_args)
    return fn(*tensors_and_args, **kwargs)

