"""One training run's configuration, and its checks before any process starts."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch

MODES = ("diloco", "dataparallel")
# Fields that may change at a --resume: they say how far or how patiently to run, not what is trained
# (outer_steps not under --dp: the privacy budget is spread over them).
RESUMABLE = ("outer_steps", "timeout")


@dataclass
class TrainConfig:
    """DiLoCo (``mode="diloco"``): every participant runs ``inner_steps`` AdamW steps, then the
    pseudo-gradients ``local - global`` go through the robust all-reduce and the outer optimizer
    moves the global model. ``mode="dataparallel"``: the baseline that averages gradients at every
    inner step (``inner_steps * outer_steps`` steps in all, evaluated every ``inner_steps``)."""

    task: str = "charlm"
    mode: str = "diloco"
    participants: int = 4
    inner_steps: int = 25            # H
    outer_steps: int = 24
    outer: str = "nesterov"          # tapestry.optim server optimizer
    outer_lr: float | None = None    # None: the optimizer's default (nesterov: 0.7)
    outer_momentum: float | None = None
    rule: str = "mean"
    f: int | None = None             # None: the number of Byzantine participants
    tau: float = 1.0                 # centered_clipping's radius
    codec: str | None = None         # None: float32 on the wire
    block: int = 256                 # int8/int4 values per scale
    attack: str = "none"
    byzantine: float = 0.0           # fraction of participants whose pseudo-gradient the attack replaces
    strength: float | None = None    # the attack's parameter (None: its default)
    lr: float = 3e-3                 # inner AdamW learning rate (after warmup)
    warmup: int = 20                 # inner steps of linear warmup (counted per participant)
    weight_decay: float = 0.01
    clip: float = 1.0                # inner gradient-norm clip (0: none)
    batch_size: int = 32
    context: int = 64
    width: int = 64
    layers: int = 2
    heads: int = 4
    files: int = 6                   # standard-library files per participant
    chars_per_file: int = 40_000
    seed: int = 0
    timeout: float = 60.0            # seconds any collective waits for a peer
    # differential privacy on the outer step (train/dp.py, docs/privacy.md; rule mean only)
    dp: str | None = None            # "central": clipped pseudo-gradients, Gaussian noise on their sum;
                                     # "distributed": each rank's noise share inside a masked ring sum
    dp_epsilon: float | None = None  # epsilon of the whole run at dp_delta (inf: the non-private run)
    dp_delta: float = 1e-5
    dp_clip: float = 1.0             # L2 clip of each pseudo-gradient (adaptive: the initial clip)
    dp_adaptive: bool = False        # adapt the clip toward the median norm (Andrew et al. 2021)
    dp_bits: int = 20                # distributed: the ring Z_2^b
    dp_mechanism: str = "dgauss"     # distributed: "dgauss" | "skellam"

    # -- derived ----------------------------------------------------------------------------------
    @property
    def n_byzantine(self) -> int:
        return round(self.byzantine * self.participants)

    @property
    def rule_f(self) -> int:
        return self.n_byzantine if self.f is None else self.f

    @property
    def label(self) -> str:
        """A name unique to (mode, rule, attack, codec, DP mechanism and epsilon): the checkpoint's file and the run's key."""
        if self.mode == "dataparallel":
            return "dataparallel"
        dp = f"-{'d' if self.dp == 'distributed' else ''}dp{self.dp_epsilon:g}" if self.dp else ""
        return f"diloco-{self.rule}-{self.codec or 'float32'}-{self.attack}{dp}"

    @property
    def outer_hparams(self) -> dict:
        out = {}
        if self.outer_lr is not None:
            out["lr"] = self.outer_lr
        if self.outer_momentum is not None:
            out["momentum"] = self.outer_momentum
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in names})


def differences(saved: dict, now: TrainConfig) -> list[str]:
    """``"name: saved -> now"`` for every setting that a resume may not change (a setting added
    since the checkpoint was written counts as its default)."""
    mine, default = now.to_dict(), TrainConfig().to_dict()
    out = []
    for key in sorted(set(saved) | set(mine)):
        calibrated = key == "outer_steps" and now.dp  # the noise was calibrated to the whole run's steps
        if key in RESUMABLE and not calibrated:
            continue
        a, b = saved.get(key, default.get(key, "<absent>")), mine.get(key, "<absent>")
        if a != b:
            out.append(f"{key}: {a!r} in the checkpoint, {b!r} now" +
                       (" (--dp calibrated the noise to the run's outer steps)" if calibrated else ""))
    return out


def build_rule(config: TrainConfig):
    """The rule object (``federated.loop.build_rule`` reads only ``rule``, ``rule_f``, ``tau``)."""
    from ..federated.loop import build_rule as _build
    return _build(config)


def validate(config: TrainConfig) -> None:
    """Refuse a configuration before any process starts: names, sizes, and the rule's own
    requirement on the participant count (its check, run on a dummy input of that many rows)."""
    from ..distributed.allreduce import CODECS
    from ..federated.attacks import get_attack
    from ..optim import SERVER_OPTIMIZERS

    c = config
    if c.task != "charlm":
        raise ValueError(f"unknown task {c.task!r}; valid: charlm")
    if c.mode not in MODES:
        raise ValueError(f"unknown --mode {c.mode!r}; valid: {', '.join(MODES)}")
    attack = get_attack(c.attack)
    if attack.poisons_data:
        raise ValueError(f"attack {c.attack!r} needs a classification task, not {c.task!r}")
    checks = [
        (isinstance(c.participants, int) and c.participants >= 1, f"--participants must be >= 1, got {c.participants}"),
        (c.inner_steps >= 1, f"--inner-steps must be >= 1, got {c.inner_steps}"),
        (c.outer_steps >= 1, f"--outer-steps must be >= 1, got {c.outer_steps}"),
        (0 <= c.byzantine < 1, f"--byzantine must be in [0, 1), got {c.byzantine}"),
        (c.f is None or c.f >= 0, f"--f must be >= 0, got {c.f}"),
        (c.codec is None or c.codec in CODECS, f"unknown --codec {c.codec!r}; valid: {', '.join(CODECS)} (or none)"),
        (c.outer in SERVER_OPTIMIZERS, f"unknown --outer {c.outer!r}; valid: {', '.join(SERVER_OPTIMIZERS)}"),
        (c.lr > 0 and math.isfinite(c.lr), f"--lr must be > 0, got {c.lr}"),
        (c.warmup >= 0, f"--warmup must be >= 0, got {c.warmup}"),
        (c.weight_decay >= 0, f"--weight-decay must be >= 0, got {c.weight_decay}"),
        (c.clip >= 0, f"--clip must be >= 0, got {c.clip}"),
        (c.batch_size >= 1, f"--batch-size must be >= 1, got {c.batch_size}"),
        (c.context >= 2, f"--context must be >= 2, got {c.context}"),
        (c.width >= 1 and c.heads >= 1 and c.width % c.heads == 0,
         f"--width must be a positive multiple of --heads, got width {c.width}, heads {c.heads}"),
        (c.layers >= 1, f"--layers must be >= 1, got {c.layers}"),
        (c.files >= 1, f"--files must be >= 1, got {c.files}"),
        (c.chars_per_file > c.context + 1, f"--chars-per-file must exceed the context + 1, got {c.chars_per_file}"),
        (0 < c.timeout <= 3600, f"--timeout must be in (0, 3600] seconds, got {c.timeout}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    from .dp import check as check_dp
    check_dp(c)
    if c.n_byzantine >= c.participants:
        raise ValueError(f"--byzantine {c.byzantine} makes all {c.participants} participants Byzantine")
    if c.n_byzantine and c.attack == "none":
        raise ValueError(f"--byzantine {c.byzantine} without an --attack: say what the Byzantine participants send")
    if c.mode == "dataparallel":
        if c.attack != "none" or c.codec is not None or c.rule != "mean":
            raise ValueError("--mode dataparallel is the communication baseline: gradients averaged every inner step; "
                             f"it takes no --attack, --codec or --rule (got attack {c.attack!r}, codec {c.codec!r}, "
                             f"rule {c.rule!r})")
        return
    from ..optim import server_optimizer
    server_optimizer(c.outer, torch.zeros(1), **c.outer_hparams)  # its own hyperparameter checks
    rule = build_rule(c)
    try:
        rule(torch.zeros(c.participants, 1))
    except ValueError as exc:
        raise ValueError(f"{exc} (--rule {c.rule} with f={c.rule_f} and {c.participants} participants; "
                         f"add participants or lower --f / --byzantine)") from None
