"""TEMPORARY stand-in for ``tapestry.optim.server_optimizer`` until it lands on main (then deleted).

Only what the trainer uses: ``fedavg``, ``fedavgm`` and ``nesterov`` on one flat tensor, as
``torch.optim.SGD`` stepped with ``grad = -aggregate``; ``state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

import torch

_DEFAULTS = {"fedavg": {"lr": 1.0, "momentum": 0.0}, "fedavgm": {"lr": 1.0, "momentum": 0.9},
             "nesterov": {"lr": 0.7, "momentum": 0.9}}
SERVER_OPTIMIZERS = tuple(_DEFAULTS)


class ServerOptimizer:
    def __init__(self, name: str, params: torch.Tensor, **hparams) -> None:
        if name not in _DEFAULTS:
            raise ValueError(f"unknown server optimizer {name!r}; valid (stand-in): {', '.join(_DEFAULTS)}")
        self.name = name
        self.hparams = {**_DEFAULTS[name], **hparams}
        self.param = params
        self._p = torch.nn.Parameter(params.detach())  # shares storage with ``params``
        self._opt = torch.optim.SGD([self._p], lr=self.hparams["lr"], momentum=self.hparams["momentum"],
                                    nesterov=name == "nesterov")

    def step(self, aggregate: torch.Tensor, *, allow_nonfinite: bool = False) -> None:
        if not allow_nonfinite and not bool(torch.isfinite(aggregate).all()):
            raise ValueError("the aggregate holds NaN or Inf")
        self._p.grad = -aggregate.reshape(self._p.shape).to(self._p.dtype)
        self._opt.step()
        self._p.grad = None

    def state_dict(self) -> dict:
        return {"name": self.name, "opt": self._opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["name"] != self.name:
            raise ValueError(f"state of {state['name']!r}, optimizer {self.name!r}")
        self._opt.load_state_dict(state["opt"])
        for group in self._opt.param_groups:  # the constructor's hyperparameters win
            group["lr"], group["momentum"] = self.hparams["lr"], self.hparams["momentum"]


def server_optimizer(name: str, params: torch.Tensor, **hparams) -> ServerOptimizer:
    return ServerOptimizer(name, params, **hparams)
