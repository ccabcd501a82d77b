"""Server (outer) optimizers: how the aggregate of the participants' updates moves the global model.

    from tapestry.optim import server_optimizer
    opt = server_optimizer("nesterov", model.parameters())       # DiLoCo's outer step (lr 0.7, momentum 0.9)
    opt.step(tp.trimmed_mean(deltas, f=2))                       # deltas: local - global, one per participant
    torch.save(opt.state_dict(), "outer.pt")                     # ... later: opt.load_state_dict(torch.load(...))

The aggregate is the combined *update* ``delta = local - global`` (the direction the participants
moved); the pseudo-gradient of DiLoCo and Reddi et al. is its negative (docs/spec.md, "Server (outer)
optimizers"). With ``t`` the 1-based step count and ``a`` the aggregate:

* ``fedavg``:     ``x += lr * a``.
* ``fedavgm``:    ``torch.optim.SGD(lr, momentum)`` stepped with ``grad = -a`` (Flower's FedAvgM:
                  ``m = momentum * m + (-a)`` with ``m = -a`` at the first step, ``x -= lr * m``).
* ``nesterov``:   ``torch.optim.SGD(lr, momentum, nesterov=True)`` stepped with ``grad = -a``.
* ``fedadagrad``: ``torch.optim.Adagrad(lr, eps=tau)`` stepped with ``grad = -a``
                  (``v += a^2``, ``x += lr * a / (sqrt(v) + tau)``, as Flower's FedAdagrad).
* ``fedadam``:    ``m = beta1 m + (1 - beta1) a``, ``v = beta2 v + (1 - beta2) a^2``,
                  ``x += lr * sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1)) * m / (sqrt(v) + tau)``
                  (Flower's FedAdam, whose bias correction uses the exponent ``round + 1``).
* ``fedyogi``:    ``m`` as FedAdam, ``v = v - (1 - beta2) a^2 sign(v - a^2)``,
                  ``x += lr * m / (sqrt(v) + tau)`` (Flower's FedYogi: no bias correction).

``m`` and ``v`` start at zero. What ``torch.optim`` computes exactly is delegated to it; FedAdam
and FedYogi are written here, in the parameters' dtype (float32 for lower precisions).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .updates import all_finite

# name -> {canonical hyperparameter: default}; defaults are Flower's (FedOpt strategies), DiLoCo's
# for nesterov; FedAvgM's momentum is 0.9 (Hsu et al. 2019), since Flower's 0.0 is plain FedAvg.
DEFAULTS: dict[str, dict[str, float]] = {
    "fedavg": {"lr": 1.0},
    "fedavgm": {"lr": 1.0, "momentum": 0.9},
    "nesterov": {"lr": 0.7, "momentum": 0.9},
    "fedadam": {"lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedyogi": {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedadagrad": {"lr": 0.1, "tau": 1e-3},
}
SERVER_OPTIMIZERS: tuple[str, ...] = tuple(DEFAULTS)

# Flower's and torch's spellings of the same hyperparameters.
ALIASES = {"eta": "lr", "server_learning_rate": "lr", "server_momentum": "momentum", "beta_1": "beta1",
           "beta_2": "beta2", "eps": "tau"}

# state entries (lists of tensors shaped like the parameters) each optimizer keeps
STATE_KEYS = {"fedavg": (), "fedavgm": ("momentum_buffer",), "nesterov": ("momentum_buffer",),
              "fedadagrad": ("sum",), "fedadam": ("m", "v"), "fedyogi": ("m", "v")}


def _resolve(name: str, hparams: dict) -> dict[str, float]:
    if not isinstance(name, str) or name not in DEFAULTS:
        raise ValueError(f"unknown server optimizer {name!r}; valid: {', '.join(SERVER_OPTIMIZERS)}")
    out = dict(DEFAULTS[name])
    given: dict[str, str] = {}
    for key, value in hparams.items():
        canon = ALIASES.get(key, key)
        if key == "eta_l":
            raise ValueError("eta_l is Flower's client learning rate; the server step does not use it")
        if canon not in out:
            valid = ", ".join(out) + "".join(f", {a} (= {c})" for a, c in ALIASES.items() if c in out)
            raise ValueError(f"{name} takes no hyperparameter {key!r}; valid: {valid}")
        if canon in given:
            raise ValueError(f"{name}: {given[canon]!r} and {key!r} both set {canon}")
        given[canon] = key
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise TypeError(f"{name}: {key} must be a number, got {type(value).__name__}")
        out[canon] = float(value)
    for key, value in out.items():
        label = given.get(key, key)
        if not math.isfinite(value):
            raise ValueError(f"{name}: {label} must be finite, got {value}")
        if key in ("lr", "tau") and not value > 0:
            raise ValueError(f"{name}: {label} must be > 0, got {value}")
        if key in ("momentum", "beta1", "beta2") and not 0 <= value < 1:
            raise ValueError(f"{name}: {label} must satisfy 0 <= {label} < 1, got {value}")
    if name == "nesterov" and out["momentum"] == 0:
        raise ValueError(f"nesterov: {given.get('momentum', 'momentum')} must satisfy 0 < momentum < 1, got 0.0 "
                         "(use fedavg for plain SGD)")
    return out


def _leaf(x: Any, what: str) -> torch.Tensor:
    """A leaf tensor sharing ``x``'s storage (so steps land in the caller's object)."""
    if isinstance(x, np.ndarray):
        if not x.flags.writeable:
            raise ValueError(f"{what}: the NumPy array is read-only; the optimizer updates it in place")
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected a tensor or NumPy array, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{what}: dtype {x.dtype} is not a floating type")
    return x.detach()


def _as_params(params: Any) -> tuple[str, list, list[torch.Tensor]]:
    """(form, keys, leaf tensors) for the three accepted forms of ``params``."""
    if isinstance(params, (torch.Tensor, np.ndarray)):
        return "tensor", [0], [_leaf(params, "params")]
    if isinstance(params, Mapping):
        keys = list(params)
        return "state_dict", keys, [_leaf(params[k], f"params[{k!r}]") for k in keys]
    if isinstance(params, (str, bytes)) or not isinstance(params, Iterable):
        raise TypeError(f"params must be tensors, a tensor or a state_dict, got {type(params).__name__}")
    tensors = list(params)
    return "list", list(range(len(tensors))), [_leaf(p, f"params[{i}]") for i, p in enumerate(tensors)]


class ServerOptimizer:
    """One server optimizer over ``params`` (see the module docstring; build with :func:`server_optimizer`)."""

    names = SERVER_OPTIMIZERS

    def __init__(self, name: str, params: Any, **hparams: Any) -> None:
        self.hparams = _resolve(name, hparams)
        self.name = name
        self.form, self.keys, self.params = _as_params(params)
        if not self.params:
            raise ValueError("params is empty: nothing to optimize")
        self.d = sum(p.numel() for p in self.params)
        self.steps = 0
        h = self.hparams
        self._torch: torch.optim.Optimizer | None = None
        if name in ("fedavg", "fedavgm", "nesterov"):
            self._torch = torch.optim.SGD(self.params, lr=h["lr"], momentum=h.get("momentum", 0.0),
                                          nesterov=name == "nesterov")
        elif name == "fedadagrad":
            self._torch = torch.optim.Adagrad(self.params, lr=h["lr"], eps=h["tau"])
        self._m: list[torch.Tensor] | None = None
        self._v: list[torch.Tensor] | None = None

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v:g}" for k, v in self.hparams.items())
        return f"ServerOptimizer({self.name!r}, {hp}, d={self.d}, steps={self.steps})"

    # -- the aggregate, in any form, as one tensor per parameter --------------------------------
    def _pieces(self, aggregate: Any) -> list[torch.Tensor]:
        shapes = [tuple(p.shape) for p in self.params]
        if isinstance(aggregate, (torch.Tensor, np.ndarray)):
            a = _read(aggregate) if isinstance(aggregate, np.ndarray) else aggregate
            self._check_dtype(a, "aggregate")
            if self.form == "tensor" and tuple(a.shape) == shapes[0]:
                return [a]
            if a.dim() != 1 or a.numel() != self.d:
                want = f"a flat ({self.d},) vector" + (f" or shape {shapes[0]}" if self.form == "tensor" else "")
                raise ValueError(f"aggregate has shape {tuple(a.shape)}; expected {want}")
            return [a[o:o + p.numel()].reshape(p.shape) for o, p in zip(self._offsets(), self.params)]
        if isinstance(aggregate, Mapping):
            if self.form != "state_dict":
                raise TypeError(f"aggregate is a mapping but params were a {self.form}; pass a flat tensor or a list")
            missing = [k for k in self.keys if k not in aggregate]
            extra = [k for k in aggregate if k not in self.keys]
            if missing or extra:
                raise ValueError(f"aggregate keys differ from the parameters': missing {missing[:5]}, unexpected {extra[:5]}")
            items = [(k, aggregate[k]) for k in self.keys]
        elif isinstance(aggregate, Sequence) and not isinstance(aggregate, (str, bytes)):
            if len(aggregate) != len(self.params):
                raise ValueError(f"aggregate has {len(aggregate)} arrays, the parameters {len(self.params)}")
            items = list(zip(self.keys, aggregate))
        else:
            raise TypeError(f"aggregate must be a tensor, an array, a state_dict or a list, got {type(aggregate).__name__}")
        out = []
        for (key, value), shape in zip(items, shapes):
            if isinstance(value, np.ndarray):
                value = _read(value)
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"aggregate[{key!r}]: expected a tensor or NumPy array, got {type(value).__name__}")
            self._check_dtype(value, f"aggregate[{key!r}]")
            if tuple(value.shape) != shape:
                raise ValueError(f"aggregate[{key!r}] has shape {tuple(value.shape)}, the parameter {shape}")
            out.append(value)
        return out

    @staticmethod
    def _check_dtype(t: torch.Tensor, what: str) -> None:
        if not t.dtype.is_floating_point:
            raise TypeError(f"{what}: dtype {t.dtype} is not a floating type")

    def _offsets(self) -> list[int]:
        offs, o = [], 0
        for p in self.params:
            offs.append(o)
            o += p.numel()
        return offs

    # -- one step ---------------------------------------------------------------------------------
    def step(self, aggregate: Any, *, allow_nonfinite: bool = False) -> None:
        """Move the parameters in place by one step from ``aggregate`` (local - global).

        A NaN or Inf in the aggregate is a ValueError (the parameters untouched) unless
        ``allow_nonfinite``: then the step runs and the parameters (and state) take the NaN/Inf."""
        # the aggregate as each parameter's dtype and device (no copy when they already match)
        pieces = [a.to(device=p.device, dtype=p.dtype) for a, p in zip(self._pieces(aggregate), self.params)]
        if not allow_nonfinite:
            for key, a in zip(self.keys, pieces):
                if not all_finite(a):
                    bad = int((~torch.isfinite(a)).sum())
                    where = "" if self.form == "tensor" else f" in {key!r}"
                    raise ValueError(f"aggregate holds {bad} NaN/Inf value(s){where}; parameters left unchanged "
                                     "(pass allow_nonfinite=True to apply it anyway)")
        self.steps += 1
        if self._torch is not None:
            for p, a in zip(self.params, pieces):
                p.grad = torch.neg(a)  # torch.optim's gradient is the pseudo-gradient -aggregate
            try:
                self._torch.step()
            finally:
                for p in self.params:
                    p.grad = None
            return
        self._adaptive_step(pieces)

    def _adaptive_step(self, pieces: list[torch.Tensor]) -> None:
        """FedAdam / FedYogi: Flower's formulas, with at most two temporaries per parameter."""
        h, t = self.hparams, self.steps
        b1, b2, tau = h["beta1"], h["beta2"], h["tau"]
        if self._m is None:
            self._m = [torch.zeros_like(p, dtype=_state_dtype(p)) for p in self.params]
            self._v = [torch.zeros_like(p, dtype=_state_dtype(p)) for p in self.params]
        if self.name == "fedadam":
            # Flower's bias-corrected step size (Kingma & Ba's alpha_t) with the exponent round + 1
            eta = h["lr"] * math.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
        else:
            eta = h["lr"]
        for p, a, m, v in zip(self.params, pieces, self._m, self._v):
            a = a.to(m.dtype)
            m.mul_(b1).add_(a, alpha=1 - b1)
            if self.name == "fedadam":
                v.mul_(b2).addcmul_(a, a, value=1 - b2)
                den = v.sqrt()
            else:  # Yogi: v moves by (1 - beta2) a^2 toward a^2 (additively, unlike Adam's average)
                a2 = a.square()
                step = torch.sub(v, a2).sign_().mul_(a2).mul_(1 - b2)
                v.sub_(step)
                den = torch.sqrt(v, out=a2)
            den.add_(tau)
            if p.dtype == m.dtype:
                p.addcdiv_(m, den, value=eta)
            else:  # lower-precision parameters: the state and the step stay in float32
                p.add_(den.reciprocal_().mul_(m).mul_(eta).to(p.dtype))

    # -- state ------------------------------------------------------------------------------------
    def _state_lists(self) -> dict[str, list[torch.Tensor]]:
        if self._torch is not None:
            out: dict[str, list[torch.Tensor]] = {}
            for key in STATE_KEYS[self.name]:
                vals = [self._torch.state.get(p, {}).get(key) for p in self.params]
                if all(v is not None for v in vals):
                    out[key] = vals
            return out
        return {} if self._m is None else {"m": self._m, "v": self._v}

    def state_dict(self) -> dict:
        """Name, hyperparameters, step count, parameter keys and shapes, and cloned state tensors."""
        return {"name": self.name, "hparams": dict(self.hparams), "steps": self.steps,
                "keys": list(self.keys), "shapes": [tuple(p.shape) for p in self.params],
                "state": {k: [t.detach().clone() for t in ts] for k, ts in self._state_lists().items()}}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore moments and step count saved by :meth:`state_dict` of the same optimizer over
        parameters of the same keys and shapes. The hyperparameters stay this object's."""
        if not isinstance(state, Mapping) or not {"name", "steps", "shapes", "state"} <= set(state):
            raise ValueError("not a server optimizer state: expected the keys name, steps, shapes, state")
        if state["name"] != self.name:
            raise ValueError(f"the state is of server optimizer {state['name']!r}, this one is {self.name!r}")
        shapes = [tuple(s) for s in state["shapes"]]
        mine = [tuple(p.shape) for p in self.params]
        if len(shapes) != len(mine):
            raise ValueError(f"the state holds {len(shapes)} parameters, this optimizer {len(mine)}")
        if "keys" in state and list(state["keys"]) != list(self.keys):
            diff = next(i for i, (a, b) in enumerate(zip(state["keys"], self.keys)) if a != b)
            raise ValueError(f"parameter {diff}: the state's key {state['keys'][diff]!r}, this optimizer's {self.keys[diff]!r}")
        for i, (a, b) in enumerate(zip(shapes, mine)):
            if a != b:
                raise ValueError(f"parameter {self.keys[i]!r}: the state's shape {a}, this optimizer's {b}")
        steps = state["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        tensors = dict(state["state"])
        unknown = set(tensors) - set(STATE_KEYS[self.name])
        if unknown:
            raise ValueError(f"{self.name} keeps {list(STATE_KEYS[self.name])}, the state holds {sorted(unknown)}")
        for key, ts in tensors.items():
            if len(ts) != len(self.params) or any(tuple(t.shape) != s for t, s in zip(ts, mine)):
                raise ValueError(f"state {key!r}: shapes {[tuple(t.shape) for t in ts]}, parameters {mine}")
        self.steps = steps
        copy = {k: [t.detach().to(device=p.device, dtype=_state_dtype(p) if self._torch is None else p.dtype).clone()
                    for t, p in zip(ts, self.params)] for k, ts in tensors.items()}
        if self._torch is None:
            self._m, self._v = (copy["m"], copy["v"]) if copy else (None, None)
            return
        for i, p in enumerate(self.params):
            st = self._torch.state[p]
            for key in STATE_KEYS[self.name]:
                if key in copy:
                    st[key] = copy[key][i]
                else:
                    st.pop(key, None)
            if "step" in st:  # Adagrad counts its steps in a tensor of its own
                st["step"] = torch.tensor(float(steps), dtype=st["step"].dtype, device=st["step"].device)


def _read(x: np.ndarray) -> torch.Tensor:
    """A tensor viewing ``x`` that is only ever read (so a read-only array, as Flower's
    ``Array.numpy()`` returns, is fine: torch's warning about writing to it does not apply)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(x))


def _state_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.promote_types(p.dtype, torch.float32)


def server_optimizer(name: str, params: Any, **hparams: Any) -> ServerOptimizer:
    """A server optimizer ``name`` (one of :data:`SERVER_OPTIMIZERS`) moving ``params`` in place.

    ``params``: tensors (``model.parameters()``) or writable NumPy arrays, one tensor, or a
    ``state_dict`` of float tensors. ``hparams``: ``lr``, ``momentum``, ``beta1``, ``beta2``,
    ``tau`` as the optimizer takes them (Flower's ``eta``, ``beta_1``, ``beta_2``,
    ``server_learning_rate``, ``server_momentum`` and torch's ``eps`` are accepted too)."""
    return ServerOptimizer(name, params, **hparams)


__all__ = ["server_optimizer", "ServerOptimizer", "SERVER_OPTIMIZERS", "DEFAULTS", "ALIASES"]
