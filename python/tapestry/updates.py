"""Client updates in every form docs/spec.md accepts, normalised to one ``(n, d)`` tensor.

Accepted forms (all clients must use the same one):

* a stacked ``(n, d)`` tensor (or NumPy array): used as it is, without a copy, when its rows have
  unit stride; the result is a ``(d,)`` tensor;
* a list of ``n`` 1-D tensors or NumPy arrays: stacked; the result is a ``(d,)`` tensor (or array);
* a list of ``n`` parameter sets: PyTorch ``state_dict``s (mappings from names to tensors) or
  lists of NumPy arrays as Flower sends them. They are flattened with one :class:`UpdateSpec`
  (names, shapes, dtypes, offsets) and the result is unflattened the same way, each entry cast
  back to its own dtype.

Floating dtypes float32, float16 and bfloat16 are kept as they are (kernels read them natively);
float64 is rounded to float32 (all arithmetic accumulates in float64 anyway); parameter sets whose
entries mix dtypes are stacked in float32. Integer, boolean and complex data are a ``TypeError``.
Nothing here modifies the caller's tensors.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Entry:
    """One named tensor inside a parameter set."""

    key: str | int
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    numel: int


@dataclass(frozen=True)
class UpdateSpec:
    """How one client's update maps to a flat vector of ``d`` values, and back.

    ``form`` is the caller's form: "stacked", "vectors", "state_dict" or "arrays".
    ``numpy`` says whether the caller gave NumPy arrays (the result is then NumPy too).
    """

    form: str
    d: int
    entries: tuple[Entry, ...] = ()
    numpy: bool = False

    def flatten(self, update: Any, *, client: int | str = "?", dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> torch.Tensor:
        """One client's update as a flat ``(d,)`` tensor, checked against this spec."""
        if self.form in ("stacked", "vectors"):
            t = _as_tensor(update, f"client {client}")
            if t.device != torch.device(device):
                raise ValueError(f"client {client}: on {t.device}, expected {device}")
            if t.dim() != 1 or t.numel() != self.d:
                raise ValueError(f"client {client}: expected a 1-D update of {self.d} values, got shape {tuple(t.shape)}")
            return t.to(dtype)
        items = _items(update, self.form, client)
        if len(items) != len(self.entries):
            names = _describe_keys(self.entries, items)
            raise ValueError(f"client {client}: {names}")
        out = torch.empty(self.d, dtype=dtype, device=device)
        for entry, (key, value) in zip(self.entries, items):
            if value.device != out.device:
                raise ValueError(f"client {client}, key {key!r}: on {value.device}, client 0 is on {out.device}")
            if key != entry.key:
                raise ValueError(f"client {client}: key {key!r} where client 0 has {entry.key!r}")
            if tuple(value.shape) != entry.shape:
                raise ValueError(f"client {client}, key {key!r}: shape {tuple(value.shape)}, client 0 has {entry.shape}")
            if value.dtype != entry.dtype:
                raise ValueError(f"client {client}, key {key!r}: dtype {value.dtype}, client 0 has {entry.dtype}")
            out[entry.offset : entry.offset + entry.numel] = value.reshape(-1)
        return out

    def unflatten(self, flat: torch.Tensor) -> Any:
        """The aggregate ``flat`` (shape ``(d,)``) in the caller's form."""
        if self.form in ("stacked", "vectors"):
            return flat.cpu().numpy() if self.numpy else flat
        parts = [flat[e.offset : e.offset + e.numel].reshape(e.shape).to(e.dtype) for e in self.entries]
        if self.form == "state_dict":
            return {e.key: p for e, p in zip(self.entries, parts)}
        return [p.cpu().numpy() if self.numpy else p for p in parts]


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``: one pass, no temporary (min and max propagate NaN; torch's
    ``isfinite(t).all()`` materialises a mask and is 20x slower on a CPU)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def _as_tensor(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        if x.dtype.kind not in "f":
            raise TypeError(f"{what}: NumPy dtype {x.dtype} is not a floating type (float16/32/64 expected)")
        if not x.flags.c_contiguous:  # (not np.ascontiguousarray: it turns a 0-dim array into shape (1,))
            x = x.copy(order="C")
        if x.flags.writeable:
            t = torch.from_numpy(x)
        else:  # read-only (Flower's arrays): never written here, so torch's warning does not apply
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                t = torch.from_numpy(x)
    else:
        raise TypeError(f"{what}: expected a tensor or NumPy array, got {type(x).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{what}: dtype {t.dtype} is not a floating type (float32, float16 or bfloat16 expected)")
    return t


def _items(update: Any, form: str, client: int | str) -> list[tuple[str | int, torch.Tensor]]:
    if form == "state_dict":
        if not isinstance(update, Mapping):
            raise TypeError(f"client {client}: expected a state_dict like client 0, got {type(update).__name__}")
        return [(k, _as_tensor(v, f"client {client}, key {k!r}")) for k, v in update.items()]
    if isinstance(update, (torch.Tensor, np.ndarray)) or not isinstance(update, Sequence):
        raise TypeError(f"client {client}: expected a list of arrays like client 0, got {type(update).__name__}")
    return [(i, _as_tensor(v, f"client {client}, array {i}")) for i, v in enumerate(update)]


def _describe_keys(entries: tuple[Entry, ...], items: list) -> str:
    have = [k for k, _ in items]
    want = [e.key for e in entries]
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    parts = [f"{len(have)} entries, client 0 has {len(want)}"]
    if missing:
        parts.append(f"missing {missing[:5]}")
    if extra:
        parts.append(f"unexpected {extra[:5]}")
    return "; ".join(parts)


def _stack_dtype(dtypes: set[torch.dtype]) -> torch.dtype:
    if len(dtypes) == 1:
        (dt,) = dtypes
        if dt in KERNEL_DTYPES:
            return dt
    return torch.float32


def _check_devices(tensors: list[torch.Tensor], what: str) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        first = tensors[0].device
        other = next(i for i, t in enumerate(tensors) if t.device != first)
        raise ValueError(f"{what} are on different devices: client 0 on {first}, client {other} on {tensors[other].device}")


def as_matrix(updates: Any) -> tuple[torch.Tensor, UpdateSpec]:
    """Normalise ``updates`` to ``(X, spec)``: ``X`` is ``(n, d)`` with unit stride along ``d``."""
    if isinstance(updates, (torch.Tensor, np.ndarray)):
        X = _as_tensor(updates, "updates")
        if X.dim() != 2:
            raise ValueError(f"stacked updates must be 2-D (n, d), got shape {tuple(X.shape)}")
        if X.shape[0] == 0:
            raise ValueError("no updates: the stacked tensor has n = 0 rows")
        X = X.to(_stack_dtype({X.dtype}))
        if X.shape[1] > 1 and X.stride(1) != 1:
            X = X.contiguous()
        return X, UpdateSpec("stacked", X.shape[1], numpy=isinstance(updates, np.ndarray))

    if isinstance(updates, Mapping) or not isinstance(updates, Sequence) or isinstance(updates, (str, bytes)):
        raise TypeError(f"updates must be a stacked tensor or a list of client updates, got {type(updates).__name__}")
    if len(updates) == 0:
        raise ValueError("no updates: the list of client updates is empty")

    first = updates[0]
    if isinstance(first, (torch.Tensor, np.ndarray)):
        vecs = [_as_tensor(u, f"client {i}") if isinstance(u, (torch.Tensor, np.ndarray)) else _bad_client(i, u, "a 1-D tensor or array")
                for i, u in enumerate(updates)]
        for i, v in enumerate(vecs):
            if v.dim() != 1:
                raise ValueError(f"client {i}: a list of tensors must hold 1-D updates, got shape {tuple(v.shape)}")
            if v.shape[0] != vecs[0].shape[0]:
                raise ValueError(f"client {i}: {v.shape[0]} values, client 0 has {vecs[0].shape[0]}")
        _check_devices(vecs, "updates")
        X = torch.stack([v.to(_stack_dtype({u.dtype for u in vecs})) for v in vecs])
        return X, UpdateSpec("vectors", X.shape[1], numpy=isinstance(first, np.ndarray))

    form = "state_dict" if isinstance(first, Mapping) else "arrays"
    items = _items(first, form, 0)
    entries, offset = [], 0
    for key, value in items:
        entries.append(Entry(key, tuple(value.shape), value.dtype, offset, value.numel()))
        offset += value.numel()
    numpy = form == "arrays" and any(isinstance(v, np.ndarray) for v in first)
    spec = UpdateSpec(form, offset, tuple(entries), numpy)
    dtype = _stack_dtype({e.dtype for e in entries})
    device = items[0][1].device if items else torch.device("cpu")
    X = torch.empty(len(updates), spec.d, dtype=dtype, device=device)
    for i, u in enumerate(updates):
        X[i] = spec.flatten(u, client=i, dtype=dtype, device=device)
    return X, spec


def _bad_client(i: int, u: Any, want: str):
    raise TypeError(f"client {i}: expected {want} like client 0, got {type(u).__name__}")
