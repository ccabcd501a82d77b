"""Central differential privacy for mean aggregation (DP-FedAvg, McMahan et al. 2018; adaptive
clipping, Andrew et al. 2021).

Per round: clip each participant's update to L2 norm ``C``; sum; add ``N(0, (z_data * S)^2)`` per
coordinate, where ``S`` is the sum's sensitivity (``C`` under add/remove-one neighbours, i.e.
Poisson sampling; ``2C`` under replace-one, i.e. fixed-size sampling); divide by the expected
number of participants (``q N`` for Poisson sampling, ``m`` for fixed size). With adaptive
clipping, ``C`` then moves geometrically toward the target quantile ``gamma`` of the update norms:
``C <- C exp(-eta (b~ - gamma))`` with ``b~`` the noised fraction of unclipped updates (noise
``N(0, sigma_b^2)`` on their count). That count is a second Gaussian query; the two together are
accounted as one Gaussian of noise multiplier ``z = (z_data^-2 + (2 sigma_b)^-2)^(-1/2)`` (Andrew et
al., Theorem 1), so ``z_data = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` and ``2 sigma_b > z`` is required.

The noise here is floating point (torch's seeded normal): the usual central-DP practice. The exact
integer samplers serve the distributed mechanism (:mod:`.distributed`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from ..aggregators.base import AggregationInfo, Rule
from ..aggregators.columns import Columns, InMemory
from .accounting import Accountant, Schedule, check_delta, noise_for_epsilon


@dataclass
class RoundReport:
    round: int
    epsilon: float
    clip: float
    clipped_fraction: float
    participants: int


@dataclass
class CentralDP:
    """Server-side central DP for a run described by ``schedule``. Give either ``epsilon`` (the
    noise multiplier is calibrated so that the whole schedule spends at most it at ``delta``) or
    ``noise_multiplier``. ``epsilon=inf`` is the non-private run: updates pass unchanged."""

    schedule: Schedule
    delta: float = 1e-5
    epsilon: float | None = None
    noise_multiplier: float | None = None
    clip: float = 1.0
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_stddev: float | None = None   # sigma_b; default per_round / 20 (Andrew et al.)
    seed: int = 0
    reports: list = field(default_factory=list)

    def __post_init__(self):
        check_delta(self.delta, self.schedule.population)
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ValueError(f"clip must be finite and > 0, got {self.clip}")
        if (self.epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("give exactly one of epsilon and noise_multiplier")
        if self.epsilon is not None:
            if not self.epsilon > 0:
                raise ValueError(f"epsilon must be > 0, got {self.epsilon}")
            self.private = math.isfinite(self.epsilon)
            self.z = noise_for_epsilon(self.epsilon, delta=self.delta, schedule=self.schedule) if self.private else 0.0
        else:
            if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
                raise ValueError(f"noise_multiplier must be finite and > 0 (zero noise gives no privacy), "
                                 f"got {self.noise_multiplier}")
            self.private, self.z = True, float(self.noise_multiplier)
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"target_quantile must be in (0, 1), got {self.target_quantile}")
        if self.count_stddev is None:
            self.count_stddev = self.schedule.per_round / 20
        self.z_data = self.z
        if self.private and self.adaptive:
            if not 2 * self.count_stddev > self.z:
                raise ValueError(f"adaptive clipping needs 2 sigma_b > z: 2 x {self.count_stddev:g} <= {self.z:.4g} "
                                 f"(raise count_stddev or the epsilon)")
            self.z_data = (self.z ** -2 - (2 * self.count_stddev) ** -2) ** -0.5
        self.accountant = Accountant(self.schedule, self.z, self.delta) if self.private else None
        self.rounds_done = 0

    @property
    def sensitivity_factor(self) -> float:
        fixed = self.schedule.sampling == "fixed" and self.schedule.per_round < self.schedule.population
        return 2.0 if fixed else 1.0

    @property
    def denominator(self) -> float:
        return float(self.schedule.per_round)  # q N for Poisson sampling (= per_round), m for fixed size

    def _gen(self, rnd: int, purpose: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + rnd) * 8 + purpose)

    def aggregate(self, deltas: torch.Tensor, rnd: int) -> torch.Tensor:
        """The private mean of the rows of ``deltas`` (``(n, d)``; ``n`` may be 0 under Poisson
        sampling) for round ``rnd``; records the epsilon spent so far in :attr:`reports`."""
        if not isinstance(deltas, torch.Tensor) or deltas.dim() != 2:
            raise ValueError("deltas must be an (n, d) tensor")
        if not self.private:
            self._spend(rnd)
            self.reports.append(RoundReport(rnd, math.inf, self.clip, 0.0, deltas.shape[0]))
            return deltas.mean(0)
        total, norms = clipped_sum(InMemory(deltas), self.clip)
        if not bool(torch.isfinite(norms).all()):
            bad = int((~torch.isfinite(norms)).nonzero()[0])
            raise ValueError(f"participant row {bad}: non-finite update cannot be clipped")
        return self.release(total, norms, rnd).to(deltas.dtype)

    def release(self, total: torch.Tensor, norms: torch.Tensor, rnd: int) -> torch.Tensor:
        """Round ``rnd``'s private mean (float64) from ``total``, the sum of the updates clipped to
        :attr:`clip` (:func:`clipped_sum`, or the :class:`ClippedSum` rule over a sharded
        all-reduce), and ``norms``, every update's norm (non-finite: left out of the sum): add the
        noise once, divide by the expected count, move an adaptive clip, account the round."""
        self._spend(rnd)
        std = self.z_data * self.sensitivity_factor * self.clip
        total = total.to(torch.float64) + torch.randn(total.shape, generator=self._gen(rnd, 0),
                                                      dtype=torch.float64) * std
        n = int(torch.isfinite(norms).sum())
        unclipped = float((norms <= self.clip).sum())
        clip_used = self.clip
        if self.adaptive:  # Andrew et al.: geometric step toward the target quantile
            noisy = (unclipped + float(torch.randn((), generator=self._gen(rnd, 1), dtype=torch.float64))
                     * self.count_stddev) / self.denominator
            self.clip = self.clip * math.exp(-self.clip_lr * (noisy - self.target_quantile))
        eps = self.accountant.step()
        self.reports.append(RoundReport(rnd, eps, clip_used, 1 - unclipped / n if n else 0.0, n))
        return total / self.denominator

    def _spend(self, rnd: int) -> None:
        if self.rounds_done >= self.schedule.rounds and self.private:
            raise ValueError(f"round {rnd}: the schedule's {self.schedule.rounds} rounds are spent; the privacy "
                             f"budget does not cover another")
        self.rounds_done += 1

    def state_dict(self) -> dict:
        """What a resumed run needs (the clip moves under adaptive clipping; the accountant is
        replayed from the reports)."""
        return {"clip": self.clip, "reports": [asdict(r) for r in self.reports]}

    def load_state_dict(self, state: dict) -> None:
        self.clip = float(state["clip"])
        self.reports = [RoundReport(**r) for r in state["reports"]]
        self.rounds_done = len(self.reports)
        if self.accountant is not None:
            for _ in self.reports:
                self.accountant.step()

    def summary(self) -> dict:
        """What results.json records about the run's privacy (``tapestry simulate`` and ``train``)."""
        s = self.schedule
        out = {"mechanism": "central", "target_epsilon": self.epsilon if self.private else None, "delta": self.delta,
               "sampling": s.sampling, "accountant": s.accountant}
        if not self.private:
            return {**out, "epsilon": None, "note": "epsilon = inf: the non-private run"}
        return {**out, "noise_multiplier": self.z, "noise_multiplier_data": self.z_data, "adaptive": self.adaptive,
                "epsilon": [r.epsilon for r in self.reports], "clip": [r.clip for r in self.reports],
                "clipped_fraction": [r.clipped_fraction for r in self.reports]}

    @property
    def epsilon_spent(self) -> float:
        return self.reports[-1].epsilon if self.reports else 0.0


def clipped_sum(src: Columns, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 sum of the rows of ``src``, each scaled to L2 norm at most ``clip``, and every
    row's norm (float64). A row's norm is over all its coordinates: on a coordinate shard of
    :func:`tapestry.distributed.all_reduce`, ``src.reduce`` sums the squared partial norms over the
    ranks, so every shard scales a participant by the same factor. Rows holding NaN/Inf (their
    norm is not finite) are left out of the sum."""
    x = src.read(0, src.d).to(torch.float64)
    norms = torch.linalg.vector_norm(x, dim=1)
    if _sharded(src):  # the whole update's norm (one process keeps vector_norm's own bits)
        norms = torch.sqrt(src.reduce(norms * norms))
    finite = torch.isfinite(norms)
    factor = torch.clamp(clip / torch.clamp(norms[finite], min=1e-300), max=1.0)
    rows = x if bool(finite.all()) else x[finite]
    return (rows * factor[:, None]).sum(0), norms


def _sharded(src: Columns) -> bool:
    """Whether ``src`` is one shard of the coordinates (its ``reduce`` sums over other shards)."""
    return type(src).reduce is not Columns.reduce


class ClippedSum(Rule):
    """The clipping half of :class:`CentralDP` as a rule, for the sharded all-reduce
    (``tapestry train --dp central``): the sum of the updates, each scaled to whole-update L2 norm
    at most ``clip`` (:func:`clipped_sum`); updates holding NaN/Inf are left out and named in
    ``info.nonfinite``; ``info.scores`` holds every update's norm, the same on every rank.
    :meth:`CentralDP.release` then adds the noise, once, to the reduced sum."""

    name = "clipped_sum"
    deltas_only = True

    def __init__(self, clip: float):
        if not (clip > 0 and math.isfinite(clip)):
            raise ValueError(f"clipped_sum: clip must be finite and > 0, got {clip}")
        self.clip = float(clip)

    def aggregate(self, src: Columns, *, want_info: bool) -> tuple[torch.Tensor, AggregationInfo]:
        total, norms = clipped_sum(src, self.clip)
        info = AggregationInfo(self.name, src.n, scores=norms, backend="reference",
                               nonfinite=torch.nonzero(~torch.isfinite(norms)).flatten().tolist())
        return total.to(torch.float32), info


def privatize_mean(deltas, dp: CentralDP, rnd: int) -> torch.Tensor:
    """The hook a strategy calls in place of its mean (Flower: on the stacked client deltas
    ``local - global`` of one round): clip, sum, noise, divide, account."""
    return dp.aggregate(torch.as_tensor(deltas), rnd)


class DPMean(Rule):
    """Central DP's mean (:class:`CentralDP`) as a rule on deltas, for callers that take a rule:
    ``TapestryStrategy(DPMean(dp), server_optimizer="fedavg")`` is DP-FedAvg in Flower (a server
    optimizer makes the strategy hand the rule deltas ``local - global``, which is what is
    clipped). Each call is one round of ``dp``'s schedule. A reply holding NaN/Inf cannot be
    clipped: it is left out of the sum (as a participant that did not answer) and named in
    ``info.nonfinite``. Clipping needs each update's whole norm, so the updates must be in one
    process (not sharded, streamed from files or compressed)."""

    name = "dp_mean"
    deltas_only = True

    def __init__(self, dp: CentralDP):
        if not isinstance(dp, CentralDP):
            raise TypeError(f"DPMean takes a tapestry.privacy.CentralDP, got {type(dp).__name__}")
        self.dp = dp
        self.rounds = 0

    def aggregate(self, src: Columns, *, want_info: bool) -> tuple[torch.Tensor, AggregationInfo]:
        if not isinstance(src, InMemory) or _sharded(src):
            raise ValueError("dp_mean clips each update by its whole norm: the updates must be in memory in one "
                             "process (not sharded, streamed or compressed; over tapestry.distributed.all_reduce "
                             "use ClippedSum and CentralDP.release)")
        X = src.read(0, src.d)
        finite = torch.isfinite(X).all(1)
        self.rounds += 1
        agg = self.dp.aggregate(X[finite], self.rounds).to(torch.float32)
        info = AggregationInfo(self.name, src.n, nonfinite=torch.nonzero(~finite).flatten().tolist(),
                               backend="reference")
        return agg, info
