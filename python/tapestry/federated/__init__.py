"""Federated training, simulated in one process: tasks, attacks and the loop behind ``tapestry simulate``.

    from tapestry.federated import Config, simulate
    run = simulate(Config(task="digits", rule="trimmed_mean", attack="signflip", byzantine=0.2))
    run.accuracy        # test accuracy after each round

Needs scikit-learn for the ``digits`` task.
"""

from __future__ import annotations

from .attacks import ATTACKS, Attack, alie_z, get_attack
from .loop import Config, RunResult, build_rule, local_train, simulate, validate
from .tasks import TASKS, Task, dirichlet_split, load_task

__all__ = ["ATTACKS", "Attack", "alie_z", "get_attack", "Config", "RunResult", "build_rule", "local_train",
           "simulate", "validate", "TASKS", "Task", "dirichlet_split", "load_task"]
