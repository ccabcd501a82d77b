"""Privacy accounting with Google's ``dp-accounting`` (pinned 0.6.0): RDP or PLD, Poisson or
fixed-size sampling, epsilon at a given delta per round.

A round is one sampled Gaussian mechanism with noise multiplier ``z`` (noise stddev over the L2
sensitivity of the sum). Poisson sampling with rate ``q`` is ``PoissonSampledDpEvent(q, Gaussian(z))``
(add/remove-one neighbours); fixed-size sampling of ``m`` of ``N`` is
``SampledWithoutReplacementDpEvent(N, m, Gaussian(z))`` (replace-one neighbours, RDP only: the PLD
accountant has no such event, and asking for it is an error before training).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

ACCOUNTANTS = ("rdp", "pld")
# RDP orders: integers only (dp-accounting's fractional orders below 2 are slow and its series for
# them may not converge); the same list wherever RDP is used, so figures are reproducible.
RDP_ORDERS = tuple(range(2, 65)) + (80, 96, 128)
SAMPLINGS = ("poisson", "fixed")


def _dp():
    try:
        import dp_accounting
    except ImportError as exc:  # a clear error before training, never a silent run without privacy
        raise ImportError("differential privacy needs the dp-accounting package: pip install dp-accounting==0.6.0") \
            from exc
    return dp_accounting


@dataclass(frozen=True)
class Schedule:
    """What the accountant composes: ``rounds`` rounds, each sampling ``per_round`` of ``population``
    participants (``sampling``: "poisson" at rate per_round / population, or "fixed")."""

    population: int
    per_round: int
    rounds: int
    sampling: str = "poisson"
    accountant: str = "rdp"

    def __post_init__(self):
        for name in ("population", "per_round", "rounds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.per_round > self.population:
            raise ValueError(f"per_round={self.per_round} exceeds population={self.population}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if self.accountant == "pld" and self.sampling == "fixed" and self.per_round < self.population:
            raise ValueError("the PLD accountant cannot account fixed-size sampling (dp-accounting has no PLD for "
                             "SampledWithoutReplacementDpEvent): use accountant='rdp' or sampling='poisson'")

    @property
    def rate(self) -> float:
        return self.per_round / self.population

    def event(self, z: float, rounds: int | None = None):
        dp = _dp()
        rounds = self.rounds if rounds is None else rounds
        gauss = dp.GaussianDpEvent(z)
        if self.per_round == self.population:
            one = gauss
        elif self.sampling == "poisson":
            one = dp.PoissonSampledDpEvent(self.rate, gauss)
        else:
            one = dp.SampledWithoutReplacementDpEvent(self.population, self.per_round, gauss)
        return dp.SelfComposedDpEvent(one, rounds)

    def fresh(self):
        dp = _dp()
        if self.accountant == "pld":
            return dp.pld.PLDAccountant(dp.NeighboringRelation.ADD_OR_REMOVE_ONE)
        rel = (dp.NeighboringRelation.REPLACE_ONE if self.sampling == "fixed" and self.per_round < self.population
               else dp.NeighboringRelation.ADD_OR_REMOVE_ONE)
        return dp.rdp.RdpAccountant(RDP_ORDERS, neighboring_relation=rel)


def check_delta(delta: float, population: int | None = None) -> float:
    """``delta`` in (0, 1), and below ``1 / population`` when given: at ``delta >= 1/N`` publishing
    one participant's data outright is (0, delta)-DP, so the guarantee says nothing."""
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if population is not None and delta >= 1 / population:
        raise ValueError(f"delta {delta:g} >= 1/population = 1/{population}: publishing one participant's data "
                         f"outright meets that delta (no privacy); take delta < {1 / population:.3g}")
    return float(delta)


def epsilon(noise_multiplier: float, *, delta: float, rounds: int, population: int, per_round: int,
            sampling: str = "poisson", accountant: str = "rdp") -> float:
    """The accountant's epsilon at ``delta`` after ``rounds`` rounds of the sampled Gaussian
    mechanism with ``noise_multiplier``."""
    check_delta(delta)
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be finite and > 0 (zero noise gives no privacy), got {noise_multiplier}")
    sch = Schedule(population, per_round, rounds, sampling, accountant)
    acc = sch.fresh()
    acc.compose(sch.event(noise_multiplier))
    return float(acc.get_epsilon(delta))


def noise_for_epsilon(target_epsilon: float, *, delta: float, schedule: Schedule, max_noise: float = 1e3) -> float:
    return _noise_for_epsilon(float(target_epsilon), float(delta), schedule, float(max_noise))


@functools.lru_cache(maxsize=64)
def _noise_for_epsilon(target_epsilon: float, delta: float, schedule: Schedule, max_noise: float) -> float:
    """The smallest noise multiplier whose epsilon at ``delta`` after the schedule is at most
    ``target_epsilon`` (dp-accounting's ``calibrate_dp_mechanism``). Unreachable targets raise."""
    check_delta(delta, schedule.population)
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target epsilon must be finite and > 0, got {target_epsilon!r}")
    dp = _dp()
    eps_max = float(_fresh_eps(schedule, max_noise, delta))
    if eps_max > target_epsilon:
        raise ValueError(f"epsilon {target_epsilon:g} at delta {delta:g} is unreachable for {schedule.rounds} rounds "
                         f"at sampling rate {schedule.rate:g}: even noise multiplier {max_noise:g} gives epsilon "
                         f"{eps_max:.4g} > {target_epsilon:g}")
    lo, hi = 1e-3, max_noise
    if schedule.accountant == "pld":
        # A PLD at noise z spans privacy losses ~1/z^2 wide in 1e-4 steps: 10^10 values at z = 1e-3.
        # RDP is looser, so its calibration is an upper bound for PLD's; search just below it.
        hi = _noise_for_epsilon(target_epsilon, delta, replace(schedule, accountant="rdp"), max_noise)
        lo = hi / 4
    z = dp.calibrate_dp_mechanism(schedule.fresh, schedule.event, target_epsilon, delta,
                                  bracket_interval=dp.ExplicitBracketInterval(lo, hi), tol=1e-4)
    # calibrate_dp_mechanism returns a value within tol of the optimum: step up until it holds
    while _fresh_eps(schedule, z, delta) > target_epsilon:
        z += 1e-4
    return float(z)


def _fresh_eps(schedule: Schedule, z: float, delta: float) -> float:
    acc = schedule.fresh()
    acc.compose(schedule.event(z))
    return acc.get_epsilon(delta)


class Accountant:
    """Per-round accounting: :meth:`step` composes one round and returns epsilon so far.

    RDP composes by addition, so one round's RDP curve is computed once and round ``k`` reports
    dp-accounting's ``compute_epsilon`` of ``k`` times it (what its accountant does for ``k`` rounds)."""

    def __init__(self, schedule: Schedule, noise_multiplier: float, delta: float):
        check_delta(delta)
        self.schedule, self.z, self.delta = schedule, float(noise_multiplier), delta
        self._acc = schedule.fresh()
        if schedule.accountant == "rdp":
            self._acc.compose(schedule.event(self.z, rounds=1))
            self._rdp_one = self._acc.rdp.copy()
        self.rounds = 0
        self.history: list[float] = []

    def step(self) -> float:
        self.rounds += 1
        if self.schedule.accountant == "rdp":
            eps = float(_dp().rdp.rdp_privacy_accountant.compute_epsilon(
                self._acc.orders, self.rounds * self._rdp_one, self.delta)[0])
        else:
            self._acc.compose(self.schedule.event(self.z, rounds=1))
            eps = float(self._acc.get_epsilon(self.delta))
        self.history.append(eps)
        return eps
