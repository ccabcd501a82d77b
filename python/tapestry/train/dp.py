"""``tapestry train --dp central``: :class:`~tapestry.privacy.CentralDP`'s clipping, noise and
accounting applied to DiLoCo's outer step over the sharded all-reduce (docs/privacy.md, "Central
DP in the trainer").

Every participant is in every outer step, so the accountant composes ``outer_steps`` rounds of
the Gaussian mechanism at full participation (add/remove-one participant; the sum's sensitivity is
the clip ``C``, and the sum is divided by the fixed count ``participants``). Per outer step:

1. every rank sends its pseudo-gradient as it is; the owner of each coordinate shard scales every
   participant's shard by ``min(1, C / ||delta||)``, the norm of the WHOLE update (the squared
   partial norms are summed over the ranks: :class:`~tapestry.privacy.ClippedSum`), so clipping is
   enforced by the aggregator, not trusted to the senders;
2. the all-gather brings the clipped sum to every rank;
3. every rank adds the same draw of ``N(0, (z C)^2)`` per coordinate (CentralDP's generator, seeded
   from (seed, outer step): :meth:`~tapestry.privacy.CentralDP.release`), divides by
   ``participants``, moves an adaptive clip and steps the accountant: one draw of the mechanism,
   the same bits, hence the same model, on every rank, and a ``--resume`` continues bit for bit.
"""

from __future__ import annotations

import math

import torch

from ..distributed import all_reduce
from ..privacy import CentralDP, ClippedSum, Schedule


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


def check(cfg) -> None:
    """Refuse a DP setting that cannot run or cannot be accounted, before any process starts."""
    if cfg.dp is None:
        if cfg.dp_epsilon is not None:
            raise ValueError("--epsilon needs --dp central")
        return
    if cfg.dp != "central":
        raise ValueError(f"--dp {cfg.dp!r}: tapestry train has central DP only (--dp central); distributed DP adds "
                         "its noise inside a secure sum, which the trainer's all-reduce is not")
    if cfg.mode != "diloco":
        raise ValueError("--dp central privatizes DiLoCo's outer step: --mode dataparallel averages gradients at "
                         "every inner step (that would be DP-SGD, with another accounting)")
    if cfg.rule != "mean":
        raise ValueError(f"--dp central privatizes the mean (FedAvg), not rule {cfg.rule!r}")
    if cfg.codec is not None:
        raise ValueError(f"--dp central cannot be combined with --codec {cfg.codec}: the noise is added after the "
                         "all-gather, whose encoding would round the noiseless clipped sum (not post-processing)")
    if cfg.dp_epsilon is None:
        raise ValueError("--dp central needs --epsilon (a number, or inf for the non-private run)")
    if not (cfg.dp_clip > 0 and math.isfinite(cfg.dp_clip)):
        raise ValueError(f"--dp-clip must be finite and > 0, got {cfg.dp_clip}")
    try:
        central(cfg)  # the accountant's calibration: bad delta, unreachable epsilon
    except ValueError as exc:
        raise ValueError(f"--dp central with {cfg.participants} participants, {cfg.outer_steps} outer steps: "
                         f"{exc}") from None


def outer_all_reduce(delta: torch.Tensor, rule, cdp: CentralDP | None, step: int, **kwargs):
    """``(aggregate, info)`` of outer step ``step``: ``rule`` over the all-reduce, or, with a private
    ``cdp``, the clipped sum (:class:`ClippedSum`; ``info.scores``: every update's norm, the same on
    every rank) plus the noise (:meth:`CentralDP.release`), the same bits on every rank."""
    if cdp is None or not cdp.private:  # epsilon = inf: exactly the run without --dp
        return all_reduce(delta, rule, return_info=True, **kwargs)
    total, info = all_reduce(delta, ClippedSum(cdp.clip), return_info=True, **kwargs)
    return cdp.release(total, info.scores, step).to(torch.float32), info
