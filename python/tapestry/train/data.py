"""Each participant's shard of the ``charlm`` data, read in epochs from a position that a checkpoint keeps."""

from __future__ import annotations

import torch

from ..federated.loop import _gen
from ..federated.tasks import CharLM, load_charlm


def load_shards(config, participants: int):
    """``(shards, (test_inputs, test_targets))``: participant ``r`` owns ``config.files``
    standard-library files of its own (``load_charlm``'s per-client files ``r*files ..``), none of
    which is held out; the test windows come from files no participant reads."""
    k = config.files
    task = load_charlm(participants * k, 0.0, config.seed, chars_per_client=config.chars_per_file)
    shards = [torch.cat([task.clients[r * k + i][1] for i in range(k)]) for r in range(participants)]
    held = task.held_text  # cut into windows of this run's context
    starts = torch.arange(0, len(held) - config.context - 1, config.context + 1)
    idx = starts[:, None] + torch.arange(config.context + 1)
    w = held[idx]
    return shards, (w[:, :-1], w[:, 1:])


def make_model(config) -> CharLM:
    return CharLM(config.context, width=config.width, heads=config.heads, layers=config.layers)


class Batches:
    """Mini-batches of one shard: each epoch cuts the text into ``context + 1`` windows from a
    seeded offset and visits them in a seeded order; ``state()`` (epoch, position) resumes exactly."""

    def __init__(self, text: torch.Tensor, context: int, batch_size: int, seed: int, rank: int):
        self.text, self.context, self.batch_size = text, context, batch_size
        self.seed, self.rank = seed, rank
        self.epoch, self.pos = 0, 0
        if (len(text) - 1) // (context + 1) - 1 < batch_size:
            raise ValueError(f"participant {rank}'s shard holds {len(text)} characters: too few for one batch of "
                             f"{batch_size} windows of {context + 1}; lower --batch-size or raise --chars-per-file")
        self._cut()

    def _cut(self) -> None:
        g = _gen(self.seed, 7, self.rank, self.epoch)
        offset = int(torch.randint(self.context + 1, (1,), generator=g))
        starts = torch.arange(offset, len(self.text) - self.context - 1, self.context + 1)
        self.order = starts[torch.randperm(len(starts), generator=g)]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos + self.batch_size > len(self.order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._cut()
        starts = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        w = self.text[starts[:, None] + torch.arange(self.context + 1)]
        return w[:, :-1], w[:, 1:]

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._cut()


@torch.no_grad()
def evaluate(model: torch.nn.Module, test) -> dict[str, float]:
    """Held-out loss (nats per character) and next-character accuracy, in chunks of 128 windows."""
    x, y = test
    total, correct = 0.0, 0
    for a in range(0, len(x), 128):
        logits = model(x[a:a + 128]).reshape(-1, 128)
        t = y[a:a + 128].reshape(-1)
        total += float(torch.nn.functional.cross_entropy(logits, t, reduction="sum"))
        correct += int((logits.argmax(1) == t).sum())
    n = y.numel()
    return {"loss": total / n, "accuracy": correct / n}
