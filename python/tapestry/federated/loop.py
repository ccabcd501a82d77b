"""The federated training loop: sample clients, train locally, attack, (compress | mask), aggregate.

One round, in order:

1. the server samples ``round(sample * clients)`` clients (a seeded draw per round);
2. each sampled client loads the global model, runs ``local_steps`` SGD steps on mini-batches of
   its own data (its own seeded generator) and returns ``delta = local - global``;
3. a ``dropout`` fraction of the sample never answers;
4. the Byzantine clients among the rest replace their delta by the attack's (:mod:`.attacks`);
5. with a codec, every delta travels compressed (honest clients keep an error-feedback residual);
   with ``secure``, deltas are masked and the server learns only their sum (FedAvg only);
6. the server aggregates the deltas with the rule, moves the global model by the server optimizer
   (:mod:`tapestry.optim`; the default ``fedavg`` with lr 1 adds the aggregate) and evaluates it on
   the test set.

Everything is deterministic under ``seed`` (model init, splits, sampling, batches, attacks).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from dataclasses import asdict, dataclass, field
from collections.abc import Callable

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ..aggregators import ARC, NNM, RULES, Bucketing, Rule, make_rule
from ..optim import server_optimizer
from . import hooks
from .attacks import craft, get_attack
from .tasks import Task, load_task


@dataclass
class Config:
    """One simulated training run. ``f=None`` derives the rule's ``f`` from ``byzantine``."""

    task: str = "digits"
    rule: str = "mean"
    attack: str = "none"
    byzantine: float = 0.0          # fraction of all clients that are Byzantine
    clients: int = 20
    sample: float = 1.0             # fraction of clients sampled per round
    rounds: int = 30
    local_steps: int = 10
    batch_size: int = 32
    lr: float = 0.5                 # client SGD learning rate (first round)
    lr_decay: str = "cosine"        # "cosine": lr * (1 + cos(pi * (round - 1) / rounds)) / 2; "none"
    alpha: float = 100.0            # Dirichlet concentration of the non-IID split (inf: IID; 1: strongly
                                    # skewed, where Krum, which keeps one client's update, falls behind)
    dropout: float = 0.0            # fraction of each round's sample that never answers
    f: int | None = None
    strength: float | None = None   # the attack's parameter (None: its documented default)
    tau: float = 1.0                # centered_clipping's radius
    codec: str | None = None        # tapestry.compression codec, None: dense float32
    secure: bool = False            # pairwise-masked secure sum (FedAvg only)
    seed: int = 0
    server_opt: str = "fedavg"      # tapestry.optim server optimizer; hyperparameters below (None: its default)
    server_lr: float | None = None
    server_momentum: float | None = None
    server_beta1: float | None = None
    server_beta2: float | None = None
    server_tau: float | None = None
    # differential privacy (tapestry.privacy, docs/privacy.md; rule mean only)
    dp: str | None = None           # "central" (server clips + noises) | "distributed" (noise inside secure sum)
    dp_epsilon: float = math.inf    # epsilon for the whole run at dp_delta (inf: the non-private run)
    dp_delta: float = 1e-5
    dp_clip: float = 1.0            # L2 clip of each delta (adaptive: the initial clip)
    dp_adaptive: bool = False       # central: adaptive clipping toward the median update norm
    dp_sampling: str = "fixed"      # "fixed": the loop's draw of per_round clients; "poisson": each w.p. sample
    dp_accountant: str = "rdp"      # "rdp" | "pld"
    dp_bits: int = 20               # distributed: the ring Z_2^b
    dp_mechanism: str = "dgauss"    # distributed: "dgauss" | "skellam"
    extra: dict = field(default_factory=dict)  # reserved for hooks (codec block size, ...)

    # Derived sizes, the same in every round (the rule's requirements are checked against them).
    @property
    def per_round(self) -> int:
        return max(1, round(self.sample * self.clients))

    @property
    def dropped(self) -> int:
        return math.floor(self.dropout * self.per_round)

    @property
    def answering(self) -> int:
        return self.per_round - self.dropped

    @property
    def n_byzantine(self) -> int:
        return round(self.byzantine * self.clients)

    @property
    def server_hparams(self) -> dict:
        """The server optimizer's hyperparameters that were set (the rest take its defaults)."""
        given = {"lr": self.server_lr, "momentum": self.server_momentum, "beta1": self.server_beta1,
                 "beta2": self.server_beta2, "tau": self.server_tau}
        return {k: v for k, v in given.items() if v is not None}

    @property
    def rule_f(self) -> int:
        """``f`` handed to the rule: given, or the Byzantine count expected among answering clients."""
        if self.f is not None:
            return self.f
        return math.ceil(self.byzantine * self.answering - 1e-9)


# The pre-aggregators the loop can build from the run's settings alone (clipping would need its
# threshold c): NNM and ARC take the rule's f, Bucketing buckets of s = 2 seeded by the run.
LOOP_PREAGGREGATORS = ("nnm", "arc", "bucketing")


def build_rule(config: Config) -> Rule:
    """The rule object for ``config`` (``f`` passed to rules that take it); ``<pre>+<rule>`` (chains
    allowed, ``arc+nnm+krum``) wraps it in the pre-aggregators of :data:`LOOP_PREAGGREGATORS`."""
    name = config.rule
    *pres, base = name.split("+")
    if base not in RULES or any(p not in LOOP_PREAGGREGATORS for p in pres):
        raise ValueError(f"unknown rule {name!r}; valid: {', '.join(RULES)}, or <pre>+<rule> with <pre> one of "
                         f"{', '.join(LOOP_PREAGGREGATORS)}")
    params = inspect.signature(RULES[base].__init__).parameters
    kwargs = {}
    if "f" in params:
        kwargs["f"] = config.rule_f
    if "tau" in params:
        kwargs["tau"] = config.tau
    if base == "centered_clipping":
        kwargs["iterations"] = 3
    rule = make_rule(base, **kwargs)
    # wrappers built here: make_rule("nnm+median", f=...) would hand f to rules that take none
    for pre in reversed(pres):
        rule = (NNM(config.rule_f, rule) if pre == "nnm" else ARC(config.rule_f, rule) if pre == "arc"
                else Bucketing(2, rule, seed=config.seed))
    return rule


def validate(config: Config) -> None:
    """Refuse a configuration before any training: names, sizes, and whether the rule tolerates
    the Byzantine fraction (the rule's own check, run on a dummy round of the real size)."""
    attack = get_attack(config.attack)
    from .tasks import TASKS
    if config.task not in TASKS:
        raise ValueError(f"unknown task {config.task!r}; valid: {', '.join(TASKS)}")
    if attack.poisons_data and config.task != "digits":
        raise ValueError(f"attack {attack.name!r} needs a classification task (digits), not {config.task!r}")
    checks = [
        (isinstance(config.clients, int) and config.clients >= 1, f"need at least 1 client, got clients={config.clients}"),
        (0 <= config.byzantine < 1, f"the Byzantine fraction must be in [0, 1), got {config.byzantine}"),
        (0 < config.sample <= 1, f"the sampled fraction must be in (0, 1], got {config.sample}"),
        (0 <= config.dropout < 1, f"the dropout fraction must be in [0, 1), got {config.dropout}"),
        (config.rounds >= 1, f"need at least 1 round, got rounds={config.rounds}"),
        (config.local_steps >= 1, f"need at least 1 local step, got {config.local_steps}"),
        (config.batch_size >= 1, f"need a batch size >= 1, got {config.batch_size}"),
        (config.lr > 0, f"the learning rate must be > 0, got {config.lr}"),
        (config.lr_decay in ("cosine", "none"), f"unknown lr_decay {config.lr_decay!r}; valid: cosine, none"),
        (config.f is None or config.f >= 0, f"f must be >= 0, got f={config.f}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    if config.answering < 1:
        raise ValueError(f"dropout {config.dropout} leaves no client of {config.per_round} per round")
    if config.n_byzantine >= config.clients:
        raise ValueError(f"byzantine {config.byzantine} makes all {config.clients} clients Byzantine")
    hooks.check(config)
    hooks.check_dp(config)
    try:  # names and ranges of the server optimizer's settings, on a one-value model
        server_optimizer(config.server_opt, torch.zeros(1), **config.server_hparams)
    except (ValueError, TypeError) as exc:
        flags = ", ".join(f"--server-{k}" for k in config.server_hparams)
        raise ValueError(f"--server-opt {config.server_opt}: {exc}" + (f" (set by {flags})" if flags else "")) from None
    rule = build_rule(config)
    try:  # the rule's own requirement, with the numbers of a real round
        rule(torch.zeros(config.answering, 1))
    except ValueError as exc:
        raise ValueError(f"{exc} (--byzantine {config.byzantine} of {config.answering} answering clients per round "
                         f"gives f={config.rule_f}; lower --byzantine, pass a smaller --f, or sample more clients)") from None


@contextlib.contextmanager
def deterministic():
    """Deterministic algorithms and one intra-op thread for the duration (both restored afterwards):
    the models are tiny, so threads only add overhead, and a fixed thread count keeps results
    bit-identical from run to run."""
    before, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
        torch.set_num_threads(threads)


def _gen(*keys: int) -> torch.Generator:
    """A generator seeded from integers (seed, round, client, purpose), independent of each other."""
    g = torch.Generator()
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = (h ^ (k + 0x632BE59BD9B4E019 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return g.manual_seed(h & 0x7FFFFFFFFFFFFFFF)


def round_lr(config: Config, rnd: int) -> float:
    """The clients' learning rate in round ``rnd`` (1-based)."""
    if config.lr_decay == "none":
        return config.lr
    return config.lr * (1 + math.cos(math.pi * (rnd - 1) / config.rounds)) / 2


def local_train(task: Task, model: torch.nn.Module, w: torch.Tensor, client: int, config: Config,
                gen: torch.Generator, *, lr: float | None = None, flip_labels: bool = False) -> torch.Tensor:
    """Client ``client``'s delta after ``local_steps`` SGD steps from the global weights ``w``."""
    lr = config.lr if lr is None else lr
    vector_to_parameters(w.clone(), model.parameters())  # the parameters become views: never of w itself
    model.train()
    for _ in range(config.local_steps):
        inputs, targets = task.batch(client, gen, config.batch_size, flip_labels=flip_labels)
        model.zero_grad(set_to_none=True)
        task.loss(model, inputs, targets).backward()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.grad, alpha=-lr)
    with torch.no_grad():
        return parameters_to_vector(model.parameters()) - w


@dataclass
class RunResult:
    rule: str
    attack: str
    metric: str
    accuracy: list[float]
    loss: list[float]
    config: dict
    seconds: float
    nonfinite_rounds: int = 0  # rounds whose aggregate held a NaN/Inf (FedAvg under nan/inf)
    privacy: dict | None = None  # with --dp: epsilon per round, noise multiplier, ... (hooks.Transport.privacy)

    @property
    def final_accuracy(self) -> float:
        return self.accuracy[-1]

    @property
    def final_loss(self) -> float:
        return self.loss[-1]

    def to_json(self) -> dict:
        """A JSON-ready record; NaN and Inf (a model destroyed by NaN senders) become null."""
        def clean(xs):
            return [x if math.isfinite(x) else None for x in xs]
        acc, loss = clean(self.accuracy), clean(self.loss)
        out = {"rule": self.rule, "attack": self.attack, "accuracy": acc, "final_accuracy": acc[-1],
               "loss": loss, "final_loss": loss[-1],
               "metric": self.metric, "seconds": round(self.seconds, 3), "nonfinite_rounds": self.nonfinite_rounds,
               "config": {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)  # --alpha/--epsilon inf
                          for k, v in self.config.items()}}
        if self.privacy is not None:
            out["privacy"] = self.privacy
        return out


def simulate(config: Config, *, task: Task | None = None,
             on_round: Callable[[int, dict], None] | None = None) -> RunResult:
    """Run ``config`` and return per-round test accuracy and loss (after each round's update).

    ``task``: an already loaded task to reuse (it must match ``config``'s task, clients, alpha and
    seed); ``on_round(round, metrics)`` is called after each round (progress bars)."""
    validate(config)
    task = task or load_task(config.task, config.clients, config.alpha, config.seed)
    if len(task.clients) != config.clients:
        raise ValueError(f"the task has {len(task.clients)} clients, the config {config.clients}")
    attack = get_attack(config.attack)
    rule = build_rule(config)
    start = time.perf_counter()
    with deterministic():
        torch.manual_seed(config.seed)
        model = task.make_model()
        w = parameters_to_vector(model.parameters()).detach().clone()
        opt = server_optimizer(config.server_opt, w, **config.server_hparams)  # moves w in place
        order = torch.randperm(config.clients, generator=_gen(config.seed, 1))
        byzantine = set(order[:config.n_byzantine].tolist())
        transport = hooks.Transport(config)
        transport.start(w.numel())  # plans that need the model size (distributed DP) fail here, before training
        accuracy, loss, bad_rounds = [], [], 0
        for rnd in range(1, config.rounds + 1):
            sampled = torch.randperm(config.clients, generator=_gen(config.seed, 2, rnd))[:config.per_round]
            sampled = sorted(sampled.tolist())
            if config.dp and config.dp_sampling == "poisson":  # each client independently w.p. `sample`
                sampled = (torch.rand(config.clients, generator=_gen(config.seed, 2, rnd)) < config.sample).nonzero()
                sampled = sampled.reshape(-1).tolist()
            drop_pick = torch.randperm(len(sampled), generator=_gen(config.seed, 3, rnd))[:config.dropped].tolist()
            dropped = sorted(sampled[i] for i in drop_pick)
            answering = [c for c in sampled if c not in dropped]
            if not transport.masks_dropouts:
                sampled = answering  # dropped clients never train nor send anything
            deltas = w.new_zeros((0, w.numel())) if not sampled else torch.stack([
                local_train(task, model, w, c, config, _gen(config.seed, 4, rnd, c), lr=round_lr(config, rnd),
                            flip_labels=attack.poisons_data and c in byzantine)
                for c in sampled])
            byz_rows = [i for i, c in enumerate(sampled) if c in byzantine and c not in dropped]
            deltas = craft(attack, deltas, byz_rows, config.strength, _gen(config.seed, 5, rnd), config.rule_f, rule=rule)
            agg = transport.aggregate(rule, deltas, sampled, dropped, byzantine, rnd)
            if not bool(torch.isfinite(agg).all()):
                bad_rounds += 1
            opt.step(agg, allow_nonfinite=True)  # FedAvg under NaN senders: the model takes the NaN (counted above)
            vector_to_parameters(w.clone(), model.parameters())
            model.eval()
            metrics = task.evaluate(model)
            accuracy.append(metrics["accuracy"])
            loss.append(metrics["loss"])
            if on_round is not None:
                on_round(rnd, metrics)
    cfg = asdict(config)
    cfg.update(f=config.rule_f, n_byzantine=config.n_byzantine, per_round=config.per_round)
    return RunResult(config.rule, config.attack, task.metric, accuracy, loss, cfg, time.perf_counter() - start, bad_rounds,
                     privacy=transport.privacy())
