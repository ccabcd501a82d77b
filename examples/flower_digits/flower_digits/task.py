"""The model (digits MLP 64-64-10, 4,810 parameters), each client's data, training and the test."""

from __future__ import annotations

from functools import lru_cache

import torch

from tapestry.federated.tasks import load_digits


@lru_cache(maxsize=4)
def task(num_partitions: int):
    """scikit-learn's digits split across ``num_partitions`` clients (Dirichlet 1.0, seed 0)."""
    return load_digits(num_partitions, alpha=1.0, seed=0)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return task(1).make_model()


def train(model: torch.nn.Module, partition: int, num_partitions: int, steps: int, lr: float, seed: int) -> int:
    """``steps`` of SGD on the partition's data; returns its number of examples."""
    t = task(num_partitions)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = t.batch(partition, gen, 32)
        opt.zero_grad()
        t.loss(model, x, y).backward()
        opt.step()
    return len(t.clients[partition][1])


def evaluate(model: torch.nn.Module) -> dict[str, float]:
    """Accuracy and loss on the held-out test images (the same for every partitioning)."""
    return task(1).evaluate(model)
