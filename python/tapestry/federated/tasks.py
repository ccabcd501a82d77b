"""Training tasks that need no download: data split across clients, a model, an evaluation.

* ``digits`` (default): scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes),
  a 64-64-10 MLP; 25% of the images (stratified) are the server's test set, the rest is split
  across clients by a Dirichlet(``alpha``) draw of each class's share per client (small ``alpha``:
  each client sees few classes; ``alpha=inf``: an even, IID split). Metric: test accuracy.
* ``charlm``: a tiny character-level transformer trained on the Python standard library's own
  source files: each client owns different files (so their data really differ), and held-out
  files the clients never see give the test loss (nats per character) and next-character accuracy.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class Task:
    """Data and model of one task. ``clients[i]`` is client ``i``'s data; ``test`` the server's."""

    name: str
    clients: list
    test: tuple
    metric: str  # "accuracy" (higher is better) or "loss" (lower is better)

    def make_model(self) -> nn.Module:
        raise NotImplementedError

    def batch(self, client: int, gen: torch.Generator, size: int, *, flip_labels: bool = False):
        """A random mini-batch ``(inputs, targets)`` of client ``client``'s data."""
        raise NotImplementedError

    def loss(self, model: nn.Module, inputs, targets) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """``{"accuracy", "loss"}`` of ``model`` on the test set (a NaN model scores NaN loss)."""
        raise NotImplementedError


# -- digits ----------------------------------------------------------------------------------------

def dirichlet_split(labels: np.ndarray, clients: int, alpha: float, rng: np.random.Generator,
                    min_size: int = 5) -> list[np.ndarray]:
    """Indices of ``labels`` per client: each class's examples are shared out by proportions drawn
    from Dirichlet(alpha, ..., alpha); redrawn (up to 100 times) until every client has
    ``min_size`` examples. ``alpha=inf`` deals the examples round-robin after a shuffle (IID)."""
    n = len(labels)
    if math.isinf(alpha) and clients <= n:  # round-robin: every client gets n // clients or one more
        perm = rng.permutation(n)
        return [np.sort(perm[i::clients]) for i in range(clients)]
    if clients * min_size > n:
        raise ValueError(f"{clients} clients need at least {clients * min_size} examples ({min_size} each), the task has "
                         f"{n}" + ("" if math.isinf(alpha) else " (--alpha inf deals them out IID, down to 1 each)"))
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * len(idx)).astype(int)[:-1]
            for i, chunk in enumerate(np.split(idx, cuts)):
                parts[i].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"Dirichlet alpha={alpha} leaves some of {clients} clients with fewer than {min_size} examples "
                     f"in 100 draws; raise --alpha or lower --clients")


class Digits(Task):
    hidden = 64

    def make_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(64, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 10))

    def batch(self, client, gen, size, *, flip_labels=False):
        x, y = self.clients[client]
        pick = torch.randint(len(y), (min(size, len(y)),), generator=gen)
        y = y[pick]
        return x[pick], (9 - y) if flip_labels else y  # label flipping: class c trains as 9 - c

    def loss(self, model, inputs, targets):
        return nn.functional.cross_entropy(model(inputs), targets)

    @torch.no_grad()
    def evaluate(self, model):
        x, y = self.test
        logits = model(x)
        return {"accuracy": float((logits.argmax(1) == y).double().mean()),
                "loss": float(nn.functional.cross_entropy(logits, y))}


def load_digits(clients: int, alpha: float, seed: int) -> Digits:
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    data = sk_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    # The test split is fixed (seed 0) so that runs with different seeds score the same images.
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    parts = dirichlet_split(y_tr, clients, alpha, np.random.default_rng(seed))
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    return Digits("digits", [(xt[p], yt[p]) for p in parts], (torch.from_numpy(x_te), torch.from_numpy(y_te)), "accuracy")


# -- charlm ----------------------------------------------------------------------------------------

class CharLM(nn.Module):
    """A 2-layer causal transformer over bytes 0..127 (pre-norm, learned positions)."""

    def __init__(self, context: int, width: int = 48, heads: int = 2, layers: int = 2, vocab: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(context, width))
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


class CharText(Task):
    context = 32

    def make_model(self) -> nn.Module:
        return CharLM(self.context)

    def _windows(self, text: torch.Tensor, starts: torch.Tensor):
        idx = starts[:, None] + torch.arange(self.context + 1)
        w = text[idx]
        return w[:, :-1], w[:, 1:]

    def batch(self, client, gen, size, *, flip_labels=False):
        if flip_labels:
            raise ValueError("label flipping needs a classification task (digits), not charlm")
        text = self.clients[client][1]
        starts = torch.randint(len(text) - self.context - 1, (size,), generator=gen)
        return self._windows(text, starts)

    def loss(self, model, inputs, targets):
        return nn.functional.cross_entropy(model(inputs).reshape(-1, 128), targets.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model):
        x, y = self.test
        logits = model(x).reshape(-1, 128)
        y = y.reshape(-1)
        return {"accuracy": float((logits.argmax(1) == y).double().mean()),
                "loss": float(nn.functional.cross_entropy(logits, y))}


def _read_ascii(path: str, limit: int) -> bytes:
    with open(path, "rb") as fh:
        raw = fh.read(limit)
    return bytes(b if b < 128 else 63 for b in raw)  # non-ASCII bytes become '?'


def load_charlm(clients: int, alpha: float, seed: int, *, chars_per_client: int = 20_000,
                test_chars: int = 40_000) -> CharText:
    """Client ``i`` reads Python standard-library source files (``alpha`` is not used: the split is
    by file, so it is non-IID by nature); held-out files form the test set (fixed windows)."""
    import json  # a stdlib module whose directory is the stdlib's

    libdir = os.path.dirname(os.path.dirname(json.__file__))
    files = sorted(f for f in os.listdir(libdir) if f.endswith(".py") and os.path.getsize(os.path.join(libdir, f)) > 4000)
    order = np.random.default_rng(seed).permutation(len(files))
    files = [os.path.join(libdir, files[i]) for i in order]
    need = clients + 2
    if len(files) < need:
        raise ValueError(f"charlm: {clients} clients need {need} standard-library files, found {len(files)} in {libdir}")
    texts = []
    for path in files[:clients]:
        texts.append(torch.frombuffer(bytearray(_read_ascii(path, chars_per_client)), dtype=torch.uint8).long())
    held = b"".join(_read_ascii(p, test_chars // 2) for p in files[clients:clients + 2])
    task = CharText("charlm", [(None, t) for t in texts], (None, None), "loss")
    held_t = torch.frombuffer(bytearray(held), dtype=torch.uint8).long()
    task.held_text = held_t  # the whole held-out text (tapestry train cuts its own windows)
    starts = torch.arange(0, len(held_t) - task.context - 1, task.context + 1)[:256]
    task.test = task._windows(held_t, starts)
    return task


TASKS = {"digits": load_digits, "charlm": load_charlm}


def load_task(name: str, clients: int, alpha: float = 1.0, seed: int = 0) -> Task:
    """The task ``name`` split over ``clients`` clients. Unknown names list the valid ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(TASKS)}")
    if not isinstance(clients, int) or clients < 1:
        raise ValueError(f"need at least 1 client, got {clients}")
    if not alpha > 0:
        raise ValueError(f"Dirichlet alpha must be > 0 (inf for IID), got {alpha}")
    return TASKS[name](clients, alpha, seed)
