"""Checkpoints: one file per run, written by rank 0 after every outer step, atomically.

The file holds the configuration, the outer step reached, the global model, the outer optimizer's
state, every participant's inner AdamW state, data position and RNG state (and, under ``--dp
distributed``, its noise secret), the DP state (epsilon so far) and the history (losses, bytes): everything a
``--resume`` needs to continue bit for bit.
"""

from __future__ import annotations

import os

import torch

from .config import TrainConfig, differences

VERSION = 1


def path_for(out: str, config: TrainConfig) -> str:
    return os.path.join(out, "checkpoints", f"{config.label}.pt")


def save(path: str, doc: dict) -> None:
    """Write ``doc`` to ``path`` through a temporary file and a rename: a crash leaves the old one."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save({"version": VERSION, **doc}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(path: str, config: TrainConfig) -> dict:
    """The checkpoint at ``path``, refused (ValueError naming every difference) when it was written
    by another configuration or for more outer steps than ``config`` asks."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no checkpoint {path} for run {config.label!r}")
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise ValueError(f"--resume: {path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise ValueError(f"--resume: {path} is not a tapestry train checkpoint of version {VERSION}")
    diff = differences(doc["config"], config)
    if diff:
        raise ValueError(f"--resume: the checkpoint {path} is of another configuration: " + "; ".join(diff))
    if doc["step"] > config.outer_steps:
        raise ValueError(f"--resume: the checkpoint {path} is at outer step {doc['step']}, beyond "
                         f"--outer-steps {config.outer_steps}")
    return doc
