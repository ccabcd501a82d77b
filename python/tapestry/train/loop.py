"""One participant's training loop: this process is rank ``r`` of ``participants`` ranks.

DiLoCo (Douillard et al. 2023), one outer step:

1. ``inner_steps`` AdamW steps on mini-batches of this rank's own shard, from the global model;
2. the pseudo-gradient ``delta = local - global``; a Byzantine rank replaces it with the attack's
   (``alie`` and ``ipm`` need the honest pseudo-gradients of every rank: they are all-gathered for
   them, a convenience of the simulation that is not counted in ``bytes_sent``);
3. :func:`tapestry.distributed.all_reduce` with the rule and codec: every rank gets the same
   aggregate, the same :class:`AggregationInfo` (non-finite participants named on every rank), and
   the bytes it sent;
4. the outer optimizer (default Nesterov SGD, lr 0.7, momentum 0.9) moves the global model, the
   same on every rank; every rank restarts from it (its AdamW state carries over);
5. rank 0 scores the global model on held-out files and writes the checkpoint (every rank's
   inner-optimizer state, data position and RNG state gathered to it).

With ``--dp central`` step 3 is the clipped sum and the noise is added after it; with ``--dp
distributed`` it is a masked sum of every rank's noised integer encoding (:mod:`.dp`).

``mode="dataparallel"``: the gradients are averaged over the ranks after every inner step (one
gloo all-reduce) and there is no outer step; its bytes follow the ring all-reduce model
``2 (n-1)/n * 4 d`` per step and rank. Everything is deterministic under ``seed`` (deterministic
algorithms, one thread per rank), so a resumed run continues bit for bit.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.utils import parameters_to_vector

from ..distributed import CollectiveError
from ..federated.attacks import get_attack
from ..federated.loop import _gen
from . import checkpoint, dp
from ..optim import server_optimizer
from .config import TrainConfig, build_rule
from .data import Batches, evaluate, load_shards, make_model


@dataclass
class TrainJob:
    """What every rank is handed (picklable: spawned ranks receive it)."""

    config: TrainConfig
    out: str | None = None        # checkpoints under OUT/checkpoints; None: none written
    resume: bool = False
    progress: bool = False


@dataclass
class RunRecord:
    """One run's outcome (built on rank 0)."""

    config: dict
    loss: list[float]                       # held-out loss after each outer step
    accuracy: list[float]                   # held-out next-character accuracy
    initial_loss: float
    bytes_by_rank: list[int]                # bytes each rank sent (dataparallel: the ring model)
    seconds: float
    byzantine_ranks: list[int]
    nonfinite: list[list]                   # [outer step, [participants]] where any sent NaN/Inf
    rejected: list[list] = field(default_factory=list)   # [outer step, [participants]] (selecting rules)
    nonfinite_steps: int = 0                # outer steps whose aggregate held NaN/Inf (it reached the model)
    privacy: dict | None = None             # --dp: epsilon after each outer step, noise multiplier, clip

    @property
    def rule(self) -> str:
        return self.config["rule"] if self.config["mode"] == "diloco" else "dataparallel"

    @property
    def attack(self) -> str:
        return self.config["attack"]

    @property
    def codec(self) -> str:
        return self.config["codec"] or "float32"

    @property
    def bytes_sent(self) -> int:
        return self.bytes_by_rank[0]

    def to_json(self) -> dict:
        import math

        def clean(xs):
            return [x if math.isfinite(x) else None for x in xs]
        c = self.config
        out = {"label": TrainConfig.from_dict(c).label, "mode": c["mode"], "rule": self.rule, "attack": self.attack,
               "codec": self.codec, "loss": clean(self.loss), "final_loss": clean(self.loss)[-1],
               "accuracy": clean(self.accuracy), "initial_loss": self.initial_loss,
               "bytes_sent": int(self.bytes_sent), "bytes_sent_by_rank": [int(b) for b in self.bytes_by_rank],
               "bytes_model": "ring all-reduce model 2(n-1)/n*4d per step" if c["mode"] == "dataparallel"
               else "measured by tapestry.distributed.all_reduce",
               "seconds": round(self.seconds, 3), "inner_steps_total": c["inner_steps"] * c["outer_steps"],
               "byzantine_ranks": self.byzantine_ranks, "nonfinite": self.nonfinite, "rejected": self.rejected,
               "nonfinite_steps": self.nonfinite_steps,
               "config": {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v  # --epsilon inf
                          for k, v in c.items()}}
        if self.privacy is not None:
            out["privacy"] = self.privacy
        return out


def _set_params(model: torch.nn.Module, w: torch.Tensor) -> None:
    """Copy the flat vector ``w`` into the model's parameters (never sharing its storage)."""
    with torch.no_grad():
        a = 0
        for p in model.parameters():
            p.copy_(w[a:a + p.numel()].view_as(p))
            a += p.numel()


def _seed(*keys: int) -> int:
    return int(torch.randint(2 ** 62, (1,), generator=_gen(*keys)))


@contextlib.contextmanager
def _peers(rank: int, what: str, timeout: float):
    """A failed collective names this rank and what it was doing: a peer died, hung or raised
    (gloo raises at once when a peer's connection closes, or after the group's timeout)."""
    try:
        yield
    except RuntimeError as exc:  # CollectiveError included: this names the outer step
        raise CollectiveError(f"tapestry train: rank {rank}: {what} failed: a peer died, hung or raised "
                              f"(timeout {timeout:g} s): {exc}") from None


def _gather(obj, rank: int, world: int) -> list | None:
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def train_rank(job: TrainJob, *, rank: int, world: int, device=None) -> RunRecord | None:
    """Run ``job.config`` as rank ``rank`` of ``world`` (torch.distributed already initialised when
    ``world > 1``); returns the :class:`RunRecord` on rank 0, None elsewhere."""
    cfg = job.config
    if world != cfg.participants:
        raise ValueError(f"{world} ranks for --participants {cfg.participants}: start one rank per participant")
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    diloco = cfg.mode == "diloco"
    shards, test = load_shards(cfg, world)
    torch.manual_seed(cfg.seed)
    model = make_model(cfg)                 # the same initial model on every rank
    w = parameters_to_vector(model.parameters()).detach().clone()   # the global model
    d = w.numel()
    inner = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = Batches(shards[rank], cfg.context, cfg.batch_size, cfg.seed, rank)
    outer = server_optimizer(cfg.outer, w, **cfg.outer_hparams) if diloco else None
    rule = build_rule(cfg) if diloco else None
    cdp = dp.mechanism(cfg, d)   # CentralDP, DistributedOuter, or None without --dp
    attack = get_attack(cfg.attack)
    strength = attack.default if cfg.strength is None else cfg.strength
    byzantine = sorted(torch.randperm(world, generator=_gen(cfg.seed, 1))[:cfg.n_byzantine].tolist())
    hist = {"loss": [], "accuracy": [], "nonfinite": [], "rejected": [], "nonfinite_steps": 0, "seconds": 0.0}
    sent, start_step = 0, 0
    path = checkpoint.path_for(job.out, cfg) if job.out else None
    if job.resume:
        doc = checkpoint.load(path, cfg)
        w.copy_(doc["global"])
        if diloco:
            outer.load_state_dict(doc["outer"])
        mine = doc["ranks"][rank]
        inner.load_state_dict(mine["inner"])
        batches.load_state(mine["data"])
        torch.set_rng_state(mine["rng"])
        sent = int(mine["bytes"])
        hist = doc["history"]
        hist["nonfinite"] = mine["nonfinite"]  # what THIS rank's all_reduce said
        start_step = int(doc["step"])
        if cdp is not None:
            cdp.load_state_dict(doc["dp"])
            dp.load_rank_state(cdp, mine)
    _set_params(model, w)
    if start_step == 0 and rank == 0:
        model.eval()
        hist["initial_loss"] = evaluate(model, test)["loss"]
        model.train()

    bar = _progress(job, cfg, start_step) if rank == 0 else None
    began = time.perf_counter()
    ring = 2 * (world - 1) / world * 4 * d    # bytes per rank of one float32 ring all-reduce of d values
    try:
        for step in range(start_step + 1, cfg.outer_steps + 1):
            for h in range(cfg.inner_steps):
                t = (step - 1) * cfg.inner_steps + h
                for group in inner.param_groups:
                    group["lr"] = cfg.lr * min(1.0, (t + 1) / cfg.warmup) if cfg.warmup else cfg.lr
                x, y = batches.next()
                model.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, 128), y.reshape(-1))
                loss.backward()
                if not diloco:
                    grads = [p.grad for p in model.parameters()]
                    flat = torch.cat([g.reshape(-1) for g in grads])
                    with _peers(rank, f"the gradient all-reduce of inner step {t + 1}", cfg.timeout):
                        dist.all_reduce(flat)
                    flat /= world
                    _set_grads(grads, flat)
                    sent += ring
                if cfg.clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                inner.step()
                if bar is not None:
                    bar.inner(float(loss))
            with torch.no_grad():
                if diloco:
                    delta = parameters_to_vector(model.parameters()) - w
                    with _peers(rank, f"the all-reduce of outer step {step}", cfg.timeout):
                        delta = _attack(delta, attack, strength, byzantine, rank, world, cfg, step)
                        agg, info = dp.outer_all_reduce(delta, rule, cdp, step, codec=cfg.codec, block=cfg.block,
                                                        seed=_seed(cfg.seed, 9, step), timeout=cfg.timeout)
                    sent += info.bytes_sent
                    if info.nonfinite:
                        hist["nonfinite"].append([step, list(info.nonfinite)])
                    if info.rejected:
                        hist["rejected"].append([step, list(info.rejected)])
                    if not bool(torch.isfinite(agg).all()):
                        hist["nonfinite_steps"] += 1   # plain mean lets a NaN sender through: shown, not hidden
                    outer.step(agg, allow_nonfinite=True)
                    _set_params(model, w)
                else:
                    w = parameters_to_vector(model.parameters()).detach().clone()
            if rank == 0:
                model.eval()
                metrics = evaluate(model, test)
                model.train()
                hist["loss"].append(metrics["loss"])
                hist["accuracy"].append(metrics["accuracy"])
                if bar is not None:
                    bar.outer(step, metrics["loss"], hist["nonfinite"][-1][1] if hist["nonfinite"]
                              and hist["nonfinite"][-1][0] == step else None,
                              cdp.epsilon_spent if cdp and cdp.private else None)
            mine = {"inner": inner.state_dict(), "data": batches.state(), "rng": torch.get_rng_state(),
                    "bytes": int(sent), "nonfinite": hist["nonfinite"], **(dp.rank_state(cdp) if path else {})}
            with _peers(rank, f"the checkpoint gather of outer step {step}", cfg.timeout):
                ranks = _gather(mine, rank, world)
            if rank == 0:
                hist["seconds"] += time.perf_counter() - began
                began = time.perf_counter()
                if path:
                    checkpoint.save(path, {"config": cfg.to_dict(), "step": step, "global": w,
                                           "outer": outer.state_dict() if diloco else None,
                                           "dp": cdp.state_dict() if cdp is not None else None,
                                           "ranks": ranks, "history": hist})
    finally:
        if bar is not None:
            bar.close()
    with _peers(rank, "the final gather", cfg.timeout):
        final = _gather({"bytes": int(sent), "nonfinite": hist["nonfinite"]}, rank, world)
    if rank != 0:
        return None
    hist["seconds"] += time.perf_counter() - began
    for r, doc in enumerate(final):
        if doc["nonfinite"] != hist["nonfinite"]:   # all_reduce promises the same info on every rank
            raise RuntimeError(f"rank {r} saw non-finite participants {doc['nonfinite']}, rank 0 {hist['nonfinite']}")
    return RunRecord(cfg.to_dict(), hist["loss"], hist["accuracy"], hist.get("initial_loss", float("nan")),
                     [int(doc["bytes"]) for doc in final], hist["seconds"], byzantine, hist["nonfinite"],
                     hist["rejected"], hist["nonfinite_steps"], cdp.summary() if cdp is not None else None)


def _set_grads(grads: list[torch.Tensor], flat: torch.Tensor) -> None:
    a = 0
    for g in grads:
        g.copy_(flat[a:a + g.numel()].view_as(g))
        a += g.numel()


def _attack(delta, attack, strength, byzantine, rank, world, cfg, step):
    """This rank's pseudo-gradient after the attack (unchanged for honest ranks)."""
    if attack.name == "none" or not byzantine:
        return delta
    honest = None
    if attack.name in ("alie", "ipm"):  # omniscient attacks: every rank's honest pseudo-gradient
        rows = [torch.empty_like(delta) for _ in range(world)]
        dist.all_gather(rows, delta)
        honest = torch.stack(rows)
    if rank not in byzantine:
        return delta
    gen = _gen(cfg.seed, 5, step, rank)
    return attack.craft(delta[None], honest, strength, gen, world, cfg.rule_f)[0].contiguous()


class _Bar:
    """Rank 0's progress bar: inner steps, the last training loss, the held-out loss."""

    def __init__(self, cfg: TrainConfig, done: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.cfg = cfg
        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[m]}"), TimeElapsedColumn(), console=self.console)
        self.progress.start()
        total = cfg.outer_steps * cfg.inner_steps
        self.task = self.progress.add_task(f"{cfg.label:>36}", total=total, completed=done * cfg.inner_steps, m="")
        self.held = ""

    def inner(self, loss: float) -> None:
        self.progress.update(self.task, advance=1, m=f"train {loss:.3f}{self.held}")

    def outer(self, step: int, loss: float, nonfinite, epsilon: float | None) -> None:
        self.held = f" held-out {loss:.3f} (outer {step})" + ("" if epsilon is None else f" epsilon {epsilon:.3g}")
        if nonfinite:
            self.progress.console.print(f"outer step {step}: non-finite pseudo-gradient from participant(s) {nonfinite}")

    def close(self) -> None:
        self.progress.stop()


def _progress(job: TrainJob, cfg: TrainConfig, done: int):
    return _Bar(cfg, done) if job.progress and not os.environ.get("TAPESTRY_NO_PROGRESS") else None
