"""Codecs: ``encode(update, codec) -> bytes`` and ``decode(payload) -> update``.

``update`` is one tensor or NumPy array (any shape; float32, float16, bfloat16 or float64), or a
parameter set (a ``state_dict`` with string keys, or a list of arrays as Flower sends them). It is
flattened to one float32 vector of ``d`` values, encoded, and :func:`decode` gives back the same
form, names, shapes and dtypes.

=========  ==========================================================  ===================
codec      what is sent                                                bytes per value
=========  ==========================================================  ===================
``fp16``   values cast to float16 (round to nearest)                   2
``bf16``   values cast to bfloat16 (round to nearest)                  2
``int8``   per block of ``block`` values: float32 absmax/127 scale,    1 + 4/block
           int8 codes; stochastic rounding (default) or to nearest
``int4``   as int8 with absmax/7 and 4-bit codes, two per byte         0.5 + 4/block
``topk``   the ``k`` largest magnitudes (``k = ceil(ratio * d)``,      8 per kept value
           default ratio 0.01) as uint32 index + float32 value
=========  ==========================================================  ===================

Stochastic rounding draws element ``j``'s uniform number from ``(seed, j)`` through a
counter-based generator (``tapestry.reference.quant_uniform``), so encoding is reproducible and
every backend produces the same bytes; ``seed=None`` draws a fresh seed from the OS.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .. import _pages, ops
from ..updates import all_finite
from .wire import (CODECS, DTYPE_NAMES, DTYPES, MAX_BLOCK, MAX_D, Payload, PayloadError, Spec, allocate, build,
                   parse)

ROUNDINGS = ("stochastic", "nearest")
DEFAULT_TOPK_RATIO = 0.01


def _mix32(x: int) -> int:
    """lowbias32 on a Python int in [0, 2^32) (tapestry.reference._mix32 for one value)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def seed_key(seed: int) -> tuple[int, int]:
    """The generator key ``(k0, k1)`` (two uint32) of a non-negative integer seed < 2^64. ``k0``,
    which selects the hash's input sequence, depends on all 64 bits of the seed."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2^64), got {seed!r}")
    lo, hi = seed & 0xFFFFFFFF, seed >> 32
    k0 = _mix32(_mix32(lo ^ 0x9E3779B9) ^ hi)
    k1 = _mix32(k0 ^ hi ^ 0x85EBCA6B)
    return k0, k1


# ---------------------------------------------------------------------------------------------
# update <-> flat float32 vector + Spec


def _tensor(x: Any, what: str) -> tuple[torch.Tensor, bool]:
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise TypeError(f"{what}: NumPy dtype {x.dtype} is not a floating type")
        return torch.from_numpy(np.ascontiguousarray(x)), True
    if isinstance(x, torch.Tensor):
        if x.dtype not in DTYPE_NAMES:
            raise TypeError(f"{what}: dtype {x.dtype} is not float32, float16, bfloat16 or float64")
        return x, False
    raise TypeError(f"{what}: expected a tensor or NumPy array, got {type(x).__name__}")


def flatten(update: Any) -> tuple[torch.Tensor, Spec]:
    """``(flat, spec)``: the update as a contiguous ``(d,)`` float32 CPU tensor (no copy when it
    already is one) and the spec that restores its form."""
    if isinstance(update, (torch.Tensor, np.ndarray)):
        t, is_np = _tensor(update, "update")
        spec = Spec("tensor", is_np, tuple(int(s) for s in t.shape), DTYPE_NAMES[t.dtype])
        flat = t.detach().reshape(-1).to(device="cpu", dtype=torch.float32).contiguous()
        return flat, spec
    if isinstance(update, Mapping):
        form, items = "state_dict", list(update.items())
        for k, _ in items:
            if not isinstance(k, str):
                raise TypeError(f"state_dict keys must be strings, got {type(k).__name__} {k!r}")
    elif isinstance(update, Sequence) and not isinstance(update, (str, bytes)):
        form, items = "arrays", list(enumerate(update))
    else:
        raise TypeError(f"update must be a tensor, an array, a state_dict or a list of arrays, got {type(update).__name__}")
    tensors, entries, is_np = [], [], False
    for k, v in items:
        t, v_np = _tensor(v, f"key {k!r}")
        is_np |= v_np
        tensors.append(t.detach().reshape(-1).to(device="cpu", dtype=torch.float32))
        entries.append((k, tuple(int(s) for s in t.shape), DTYPE_NAMES[t.dtype]))
    flat = torch.cat(tensors) if tensors else torch.empty(0, dtype=torch.float32)
    return flat, Spec(form, is_np and form == "arrays", entries=tuple(entries))


def unflatten(flat: torch.Tensor, spec: Spec) -> Any:
    """The ``(d,)`` vector ``flat`` in the form ``spec`` describes (each entry cast to its dtype)."""
    def finish(t: torch.Tensor, shape, dtype: str):
        t = t.reshape(shape).to(DTYPES[dtype])
        return t.numpy() if spec.numpy and t.dtype != torch.bfloat16 else t

    if spec.form == "tensor":
        return finish(flat, spec.shape, spec.dtype)
    parts, off = [], 0
    for key, shape, dtype in spec.entries:
        n = math.prod(shape)
        parts.append((key, finish(flat[off : off + n], shape, dtype)))
        off += n
    return dict(parts) if spec.form == "state_dict" else [p for _, p in parts]


# ---------------------------------------------------------------------------------------------
# encode / decode


def check_block(codec: str, block: Any) -> int:
    if isinstance(block, bool) or not isinstance(block, int) or not (2 <= block <= MAX_BLOCK and block % 2 == 0):
        raise ValueError(f"{codec}: block must be an even int in [2, {MAX_BLOCK}], got {block!r}")
    return block


def topk_count(d: int, k: int | None, ratio: float | None) -> int:
    """``k`` for a vector of ``d`` values: given, or ``ceil(ratio * d)`` (default ratio 0.01), at least 1."""
    if k is not None and ratio is not None:
        raise ValueError("topk: give k or ratio, not both")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or not (1 <= k <= max(d, 1)):
            raise ValueError(f"topk: k must be an int in [1, d={d}], got {k!r}")
        return min(k, d)
    ratio = DEFAULT_TOPK_RATIO if ratio is None else ratio
    if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise ValueError(f"topk: ratio must be in (0, 1], got {ratio!r}")
    return min(d, max(1, math.ceil(ratio * d)))


def encode_flat(flat: torch.Tensor, spec: Spec, codec: str, *, block: int = 256, rounding: str = "stochastic",
                seed: int | None = None, k: int | None = None, ratio: float | None = None,
                out: torch.Tensor | None = None) -> bytes | torch.Tensor:
    """Encode a contiguous ``(d,)`` float32 CPU vector (see :func:`encode`). ``out``: a uint8 CPU
    buffer to write the payload into (fp16, bf16, int8, int4); the payload is then that slice of it."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; valid: {', '.join(CODECS)}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    d = flat.numel()
    if d > MAX_D:
        raise ValueError(f"{codec}: a payload holds at most {MAX_D} values, got d={d}")
    if codec in ("fp16", "bf16"):
        payload, (values,) = allocate(codec, d, 0, 0, False, spec, out)
        v = values.view(torch.float16 if codec == "fp16" else torch.bfloat16)
        v.copy_(flat)  # the cast, written into the payload
        if not all_finite(v):  # a non-finite value, or a finite one beyond the format's range
            _raise_nonfinite(flat, codec, overflow=torch.isfinite(flat) & ~torch.isfinite(v))
        return payload
    if codec == "topk":
        if out is not None:
            raise ValueError("topk: encoding into out= is not supported (its size depends on the data)")
        kk = topk_count(d, k, ratio)
        if not all_finite(flat):
            _raise_nonfinite(flat, codec)
        if kk == 0:
            return build(codec, d, 0, 0, False, spec, [])
        idx = torch.topk(flat.abs(), kk, sorted=False).indices.sort().values
        return build(codec, d, 0, kk, False, spec, [idx.to(torch.int32).numpy(), flat[idx].numpy()])
    check_block(codec, block)
    key = None
    if rounding == "stochastic":
        key = seed_key(secrets.randbits(64) if seed is None else seed)
    payload, (scales, codes) = allocate(codec, d, block, 0, key is not None, spec, out)
    scales = scales.view(torch.float32)  # its offset is a multiple of 8
    name = "quantize_int8" if codec == "int8" else "quantize_int4"
    ops.call(name, flat, block, key, out=(codes.view(torch.int8) if codec == "int8" else codes, scales))
    if not all_finite(scales):
        _raise_nonfinite(flat, codec)
    return payload


def _raise_nonfinite(flat: torch.Tensor, codec: str, overflow: torch.Tensor | None = None) -> None:
    bad = overflow if overflow is not None and bool(overflow.any()) else ~torch.isfinite(flat)
    i = int(torch.nonzero(bad)[0])
    what = f"overflows {codec}" if overflow is not None and bool(overflow.any()) else "is not finite"
    raise ValueError(f"{codec}: update value {i} ({float(flat[i])}) {what}; refusing to encode it")


def encode(update: Any, codec: str, *, block: int = 256, rounding: str = "stochastic", seed: int | None = None,
           k: int | None = None, ratio: float | None = None, out: torch.Tensor | None = None) -> bytes | torch.Tensor:
    """Compress ``update`` (tensor, array, state_dict or list of arrays) into a payload.

    ``codec``: "fp16", "bf16", "int8", "int4" or "topk". ``block``: values per scale for int8/int4
    (even, 2..4096, default 256). ``rounding``: "stochastic" (unbiased; reproducible from ``seed``,
    a fresh random seed when None) or "nearest". ``k`` or ``ratio`` (default 0.01): values kept by
    topk. Non-finite values (or float16 overflow) are a ``ValueError``: a client never sends them.
    ``out``: a contiguous uint8 CPU tensor to write the payload into, reused round after round
    (:func:`tapestry.compression.wire.payload_nbytes` gives the size; not for topk); the result is
    then the slice of ``out`` that holds the payload.
    """
    flat, spec = flatten(update)
    return encode_flat(flat, spec, codec, block=block, rounding=rounding, seed=seed, k=k, ratio=ratio, out=out)


def decode_rows(ps: list[Payload], outs: list[torch.Tensor], start: int, stop: int) -> None:
    """Values ``start:stop`` of each payload into the matching float32 ``(stop-start,)`` view.
    Any ``start`` (for int8/int4 a multiple of the payload's block is fastest: an unaligned first
    block is decoded into a small scratch buffer and copied)."""
    groups: dict[tuple[str, int], list[int]] = {}
    for i, p in enumerate(ps):
        groups.setdefault((p.codec, p.block), []).append(i)
    for (codec, block), rows in groups.items():
        if codec in ("int8", "int4"):
            a = start - start % block
            if a != start and stop > start:  # an unaligned start: its block decoded apart (<= 16 KiB)
                end = min(a + block, ps[rows[0]].d)
                head = torch.empty(len(rows), end - a, dtype=torch.float32)
                ops.call("dequantize_" + codec, [ps[i].values for i in rows], [ps[i].scales for i in rows], block,
                         list(head.unbind(0)), a, device="cpu")
                cut = min(stop, end) - start
                for r, i in enumerate(rows):
                    outs[i][:cut].copy_(head[r, start - a : start - a + cut])
                if start + cut == stop:
                    continue
                rows_out, begin = [outs[i][cut:] for i in rows], start + cut
            else:
                rows_out, begin = [outs[i] for i in rows], start
            ops.call("dequantize_" + codec, [ps[i].values for i in rows], [ps[i].scales for i in rows], block,
                     rows_out, begin, device="cpu")
        elif codec in ("fp16", "bf16"):
            for i in rows:
                outs[i].copy_(ps[i].values[start:stop])
        else:
            for i in rows:
                p, o = ps[i], outs[i]
                o.zero_()
                lo, hi = torch.searchsorted(p.indices, torch.tensor([start, stop])).tolist()
                o.index_copy_(0, p.indices[lo:hi] - start, p.values[lo:hi])


def decode_flat(payload: bytes | bytearray | memoryview, *, max_values: int | None = None,
                out: torch.Tensor | None = None) -> tuple[torch.Tensor, Spec]:
    """``(flat float32 (d,), spec)`` of a payload; see :func:`decode`. ``out``: a contiguous
    float32 CPU tensor of ``d`` values to decode into (a server decoding round after round reuses
    one buffer instead of faulting in fresh pages each time)."""
    p = parse(payload, max_values=max_values)
    if out is None:
        out = _pages.empty(p.d)
    elif not (isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.device.type == "cpu"
              and out.is_contiguous() and out.numel() == p.d):
        what = f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"out must be a contiguous float32 CPU tensor of d={p.d} values, got {what}")
    out = out.reshape(-1)
    if p.d:
        decode_rows([p], [out], 0, p.d)
    return out, p.spec


def decode(payload: bytes | bytearray | memoryview, *, max_values: int | None = None) -> Any:
    """The update a payload describes, in its original form (tensor/array shape and dtype, or a
    parameter set with its names, shapes and dtypes). Raises :class:`PayloadError` (a
    ``ValueError``) for anything that is not a valid payload; see docs/wire-format.md."""
    flat, spec = decode_flat(payload, max_values=max_values)
    return unflatten(flat, spec)


__all__ = ["encode", "decode", "encode_flat", "decode_flat", "flatten", "unflatten", "PayloadError", "seed_key"]
