"""``tapestry train --dp central|distributed``: differential privacy on DiLoCo's outer step
(docs/privacy.md, "Central DP in the trainer" and "Distributed DP in the trainer").

Every participant is in every outer step, so the accountant composes ``outer_steps`` rounds of
the Gaussian mechanism at full participation (add/remove-one participant; the sum is divided by
the fixed count ``participants``).

``--dp central`` (:class:`~tapestry.privacy.CentralDP`), per outer step:

1. every rank sends its pseudo-gradient as it is; the owner of each coordinate shard scales every
   participant's shard by ``min(1, C / ||delta||)``, the norm of the WHOLE update (the squared
   partial norms are summed over the ranks: :class:`~tapestry.privacy.ClippedSum`), so clipping is
   enforced by the aggregator, not trusted to the senders;
2. the all-gather brings the clipped sum to every rank;
3. every rank adds the same draw of ``N(0, (z C)^2)`` per coordinate (CentralDP's generator, seeded
   from (seed, outer step): :meth:`~tapestry.privacy.CentralDP.release`), divides by
   ``participants``, moves an adaptive clip and steps the accountant: one draw of the mechanism,
   the same bits, hence the same model, on every rank, and a ``--resume`` continues bit for bit.

``--dp distributed`` (:class:`DistributedOuter`, :class:`~tapestry.privacy.DistributedDP` on each
rank), per outer step: every rank encodes its own pseudo-gradient (clip, rotate, scale, round,
noise share from its own secret, ``Z_2^b``) with pairwise masks from an X25519 key agreement fused
in; the masked vectors are summed over the ranks (:class:`~tapestry.secure.ranks.MaskedSum`), and
every rank decodes the same sum.
"""

from __future__ import annotations

import math
import secrets

import torch

from ..aggregators.base import AggregationInfo
from ..distributed import all_reduce
from ..privacy import (Accountant, CentralDP, ClippedSum, DistributedDP, Schedule, epsilon, noise_for_epsilon,
                       plan)
from ..secure.ranks import MaskedSum, ring_words

MECHANISMS = ("central", "distributed")


def schedule(cfg) -> Schedule:
    """``outer_steps`` rounds of all ``participants`` (sampling rate 1), accounted with RDP."""
    return Schedule(population=cfg.participants, per_round=cfg.participants, rounds=cfg.outer_steps,
                    sampling="fixed", accountant="rdp")


def central(cfg) -> CentralDP | None:
    """The run's CentralDP (the noise multiplier calibrated to ``dp_epsilon``), None without ``--dp``."""
    if cfg.dp is None:
        return None
    return CentralDP(schedule(cfg), delta=cfg.dp_delta, epsilon=cfg.dp_epsilon, clip=cfg.dp_clip,
                     adaptive=cfg.dp_adaptive, seed=cfg.seed)


def mechanism(cfg, d: int):
    """The run's mechanism for a model of ``d`` parameters: CentralDP, DistributedOuter, or None
    without ``--dp``."""
    return DistributedOuter(cfg, d) if cfg.dp == "distributed" else central(cfg)


def model_size(cfg) -> int:
    from .data import make_model
    return sum(p.numel() for p in make_model(cfg).parameters())


def check(cfg) -> None:
    """Refuse a DP setting that cannot run or cannot be accounted, before any process starts."""
    if cfg.dp is None:
        if cfg.dp_epsilon is not None:
            raise ValueError("--epsilon needs --dp central or --dp distributed")
        return
    if cfg.dp not in MECHANISMS:
        raise ValueError(f"--dp {cfg.dp!r}: tapestry train has --dp central or --dp distributed")
    flag = f"--dp {cfg.dp}"
    if cfg.mode != "diloco":
        raise ValueError(f"{flag} privatizes DiLoCo's outer step: --mode dataparallel averages gradients at "
                         "every inner step (that would be DP-SGD, with another accounting)")
    if cfg.rule != "mean":
        raise ValueError(f"{flag} privatizes the mean (FedAvg), not rule {cfg.rule!r}")
    if cfg.codec is not None:
        why = ("the noise is added after the all-gather, whose encoding would round the noiseless clipped sum "
               "(not post-processing)" if cfg.dp == "central" else
               "its ring vectors are already integers in Z_2^b (--dp-bits sets their size)")
        raise ValueError(f"{flag} cannot be combined with --codec {cfg.codec}: {why}")
    if cfg.dp_epsilon is None:
        raise ValueError(f"{flag} needs --epsilon (a number, or inf for the non-private run)")
    if not cfg.dp_epsilon > 0:
        raise ValueError(f"--epsilon must be > 0, got {cfg.dp_epsilon}")
    if not (cfg.dp_clip > 0 and math.isfinite(cfg.dp_clip)):
        raise ValueError(f"--dp-clip must be finite and > 0, got {cfg.dp_clip}")
    if cfg.dp == "distributed":
        if cfg.dp_adaptive:
            raise ValueError("--dp-adaptive is central DP's (the clip moves with the norms the aggregator sees); "
                             "under --dp distributed no one sees the norms")
        if cfg.attack != "none":
            raise ValueError(f"--dp distributed with --attack {cfg.attack}: the secure sum hides every update, so "
                             "nothing enforces a Byzantine rank's clip (it could add anything in the ring); "
                             "attacks are simulated with --dp central or without --dp")
    try:
        if cfg.dp == "central":
            central(cfg)  # the accountant's calibration: bad delta, unreachable epsilon
        else:
            DistributedOuter(cfg, model_size(cfg))  # and the plan: ring too small, sampler limits
    except ValueError as exc:
        raise ValueError(f"{flag} with {cfg.participants} participants, {cfg.outer_steps} outer steps: "
                         f"{exc}") from None


class DistributedOuter:
    """``--dp distributed``: this rank's half of distributed DP in the outer step (docs/privacy.md,
    "Distributed DP in the trainer"). The noise multiplier ``z`` is calibrated to (epsilon, delta,
    outer steps) as for central DP; the plan (scale, noise share) is :func:`tapestry.privacy.plan`'s
    for ``participants`` clients, ``d`` coordinates, the clip and ``--dp-bits``; the accountant
    composes the plan's effective multiplier. ``secret`` keys this rank's rounding and noise: fresh
    random bytes for a new run (so no other rank can recompute its noise share), restored on
    ``--resume`` from the rank's own entry of the checkpoint. ``epsilon=inf``: not private (the
    loop then takes the plain all-reduce: the run without ``--dp``)."""

    def __init__(self, cfg, d: int, secret: bytes | None = None):
        self.cfg, self.d = cfg, d
        self.delta = cfg.dp_delta
        self.private = math.isfinite(cfg.dp_epsilon)
        self.secret = secret or secrets.token_bytes(32)
        self.epsilons: list[float] = []
        if not self.private:
            return
        sch = schedule(cfg)
        self.z = noise_for_epsilon(cfg.dp_epsilon, delta=cfg.dp_delta, schedule=sch)
        self.plan = plan(n=cfg.participants, d=d, clip=cfg.dp_clip, noise_multiplier=self.z, bits=cfg.dp_bits,
                         mechanism=cfg.dp_mechanism)
        self.accountant = Accountant(sch, self.plan.effective_noise_multiplier, cfg.dp_delta)

    @property
    def encoder(self) -> DistributedDP:
        return DistributedDP(self.plan, seed=self.cfg.seed, secret=self.secret)

    def outer_sum(self, delta: torch.Tensor, step: int, *, timeout: float, group=None):
        """``(mean, info)`` of outer step ``step``: this rank's ``delta`` encoded and masked, the
        masked sum over the ranks, decoded and divided by ``participants``: the same bits on every
        rank. A non-finite ``delta`` is sent as zeros (its noise share still counts) and named in
        ``info.nonfinite`` on every rank."""
        if len(self.epsilons) >= self.cfg.outer_steps:
            raise ValueError(f"outer step {step}: the {self.cfg.outer_steps} outer steps the noise was calibrated "
                             f"to are spent; the privacy budget does not cover another")
        ring = MaskedSum(group, timeout)
        if ring.size != self.plan.n:
            raise ValueError(f"{ring.size} ranks, the plan's noise shares are for {self.plan.n} participants")
        finite = bool(torch.isfinite(delta).all())
        seeds, signs, flags = ring.agree(step, flag=not finite)
        x = delta.detach().reshape(-1).float() if finite else torch.zeros(self.d)
        enc = self.encoder
        masked = enc.encode(x, client=ring.rank, rnd=step, mask_seeds=seeds, mask_signs=signs)
        total = ring.sum(ring_words(masked))
        mean = enc.decode(total.numpy(), rnd=step) / self.cfg.participants
        self.epsilons.append(self.accountant.step())
        info = AggregationInfo("distributed_dp", ring.size, nonfinite=[r for r, f in enumerate(flags) if f],
                               backend="cpu", bytes_sent=ring.bytes_sent)
        return mean.to(torch.float32), info

    @property
    def epsilon_spent(self) -> float:
        return self.epsilons[-1] if self.epsilons else 0.0

    def state_dict(self) -> dict:
        """The run's state (the same on every rank; the accountant is replayed from it)."""
        return {"epsilon": list(self.epsilons)}

    def load_state_dict(self, state: dict) -> None:
        self.epsilons = []
        if not self.private:
            return
        for _ in state["epsilon"]:
            self.epsilons.append(self.accountant.step())

    def summary(self) -> dict:
        """What results.json records about the run's privacy."""
        out = {"mechanism": "distributed", "target_epsilon": self.cfg.dp_epsilon if self.private else None,
               "delta": self.delta, "sampling": "fixed", "accountant": "rdp"}
        if not self.private:
            return {**out, "epsilon": None, "note": "epsilon = inf: the non-private run"}
        p = self.plan
        out.update(noise_multiplier=self.z, effective_noise_multiplier=self.accountant.z,
                   epsilon=list(self.epsilons), clip=p.clip, bits=p.bits, dg_mechanism=p.mechanism,
                   padded_length=p.D, scale=p.scale, delta2=p.delta2, local_variance=p.local_var,
                   wrap_bound=p.wrap_bound)
        if p.n > 1 and self.epsilons:
            # a curious rank subtracts its own contribution, noise share included: n - 1 shares protect the others
            z_peer = math.sqrt((p.n - 1) * p.local_var) / p.delta2
            out["epsilon_against_one_rank"] = epsilon(z_peer, delta=self.delta, rounds=len(self.epsilons),
                                                      population=p.n, per_round=p.n)
        return out


def rank_state(mech) -> dict:
    """What this rank alone must keep for a ``--resume`` (its entry of the checkpoint)."""
    return {"dp_secret": mech.secret} if isinstance(mech, DistributedOuter) else {}


def load_rank_state(mech, mine: dict) -> None:
    if isinstance(mech, DistributedOuter):
        mech.secret = mine["dp_secret"]


def outer_all_reduce(delta: torch.Tensor, rule, cdp, step: int, **kwargs):
    """``(aggregate, info)`` of outer step ``step``: ``rule`` over the all-reduce; with a private
    CentralDP, the clipped sum (:class:`ClippedSum`; ``info.scores``: every update's norm, the same
    on every rank) plus the noise (:meth:`CentralDP.release`); with a private DistributedOuter, its
    masked sum (:meth:`DistributedOuter.outer_sum`). The same bits on every rank."""
    if cdp is None or not cdp.private:  # epsilon = inf: exactly the run without --dp
        return all_reduce(delta, rule, return_info=True, **kwargs)
    if isinstance(cdp, DistributedOuter):
        return cdp.outer_sum(delta, step, timeout=kwargs.get("timeout", 60.0), group=kwargs.get("group"))
    total, info = all_reduce(delta, ClippedSum(cdp.clip), return_info=True, **kwargs)
    return cdp.release(total, info.scores, step).to(torch.float32), info
