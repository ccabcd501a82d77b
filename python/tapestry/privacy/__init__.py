"""Differential privacy for aggregation (docs/privacy.md; docs/spec.md, "Differential privacy").

* :func:`sample_discrete_gaussian`, :func:`sample_skellam`: exact integer noise driven by ChaCha20
  (int64 tensors; the same draws from the C++ kernel and the pure-Python reference).
* :func:`rotate`, :func:`unrotate`: the seeded randomized Hadamard rotation (padding to 2^k).
* :func:`epsilon`, :class:`Schedule`, :class:`Accountant`, :func:`noise_for_epsilon`: accounting
  with dp-accounting (RDP or PLD, Poisson or fixed-size sampling).
* :class:`CentralDP` (clip, Gaussian noise, adaptive clipping, per-round epsilon) and
  :func:`privatize_mean`, the hook a strategy calls; :class:`DPMean`, the same as a rule
  (``TapestryStrategy(DPMean(dp), server_optimizer="fedavg")`` is DP-FedAvg in Flower);
  :class:`ClippedSum`, its clipping half as a rule for the sharded all-reduce, whose sum
  :meth:`CentralDP.release` noises (``tapestry train --dp central``).
* :func:`plan`, :class:`DistributedDP`: distributed discrete Gaussian / Skellam inside secure sum.
"""

from .accounting import Accountant, Schedule, epsilon, noise_for_epsilon
from .central import CentralDP, ClippedSum, DPMean, privatize_mean
from .distributed import DistributedDP, Plan, plan
from .rotation import rotate, unrotate
from .samplers import sample_discrete_gaussian, sample_skellam

__all__ = ["Accountant", "Schedule", "epsilon", "noise_for_epsilon", "CentralDP", "ClippedSum", "DPMean", "privatize_mean", "DistributedDP",
           "Plan", "plan", "rotate", "unrotate", "sample_discrete_gaussian", "sample_skellam"]
