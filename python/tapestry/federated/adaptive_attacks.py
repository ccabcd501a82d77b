"""Attacks that adapt to the honest updates or to the rule in use (the strongest in the literature).

Each function takes the benign updates ``benign`` (``(h, d)``: the round's non-Byzantine clients,
ByzFL's and the papers' omniscient attacker) and returns the one ``(d,)`` vector every Byzantine
client sends.

* :func:`optimal_alie` / :func:`optimal_ipm`: ALIE's ``mean + tau * std`` and IPM's
  ``-tau * mean`` with ``tau`` searched against the rule actually in use, to maximise
  ``|rule(benign + k copies) - mean(benign)|``: ByzFL's expansion-contraction search (``evals``
  evaluations from ``start``, step ``delta`` doubling while it improves, then shrinking by
  ``ratio``), step for step.
* :func:`mimic`: a copy of benign client ``epsilon`` (ByzFL's Mimic).
* :func:`minmax` / :func:`minsum` (Shejwalkar and Houmansadr, NDSS 2021, AGR-agnostic):
  ``mean - gamma * p`` for a perturbation ``p`` (``unit_vec``: ``mean / |mean|``, ``sign``:
  ``sign(mean)``, ``std``: the coordinate standard deviations), with the largest ``gamma`` whose
  farthest distance to a benign update stays within the largest benign pairwise distance (Min-Max),
  or whose sum of squared distances to the benign updates stays within the largest such sum of a
  benign update (Min-Sum). Both constraints are quadratics in ``gamma``: solved exactly here,
  where the authors' code bisects from ``gamma = 10`` (and so never exceeds 20).
"""

from __future__ import annotations

import copy
import math

import torch


def _distance_to_mean(rule, benign: torch.Tensor, byz: torch.Tensor, k: int, mean: torch.Tensor) -> float:
    X = torch.cat([benign, byz.to(benign.dtype).expand(k, -1)])
    # a copy per probe: rules with state (Bucketing's generator, centered clipping's centre) must
    # aggregate the real round exactly as if the attacker had not probed them
    return float(torch.linalg.vector_norm(copy.deepcopy(rule)(X).double() - mean))


def optimal_factor(benign: torch.Tensor, k: int, rule, make, *, evals: int = 20, start: float = 0.0,
                   delta: float = 10.0, ratio: float = 0.8) -> float:
    """The factor ``tau`` that ByzFL's search finds for the attack ``make(tau) -> (d,)`` when ``k``
    Byzantine clients send it beside ``benign`` and ``rule`` aggregates."""
    if not (isinstance(evals, int) and evals >= 1):
        raise ValueError(f"the optimal attacks need evals >= 1, got evals={evals}")
    if not 0.5 < ratio < 1:
        raise ValueError(f"the optimal attacks need ratio in (0.5, 1), got ratio={ratio}")
    if delta == 0:
        raise ValueError("the optimal attacks need delta != 0")
    mean = benign.double().mean(0)

    def score(tau):
        return _distance_to_mean(rule, benign, make(tau), k, mean)

    best_x, best_y = start, score(start)
    left = evals - 1
    while left > 0:  # expansion: double the step while the attack grows
        x = best_x + delta
        y = score(x)
        left -= 1
        if y > best_y:
            best_x, best_y = x, y
            delta *= 2
        else:
            delta *= ratio
            break
    while left > 0:  # contraction: shrink the step, keep improvements
        x = best_x + delta
        y = score(x)
        left -= 1
        if y > best_y:
            best_x, best_y = x, y
        delta *= ratio
    return best_x


def alie_vector(benign: torch.Tensor, tau: float) -> torch.Tensor:
    h = benign.double()
    return (h.mean(0) + tau * h.std(0, unbiased=True)).float()


def ipm_vector(benign: torch.Tensor, tau: float) -> torch.Tensor:
    return (-tau * benign.double().mean(0)).float()


def optimal_alie(benign: torch.Tensor, k: int, rule, **search) -> torch.Tensor:
    """ALIE (Baruch et al. 2019) with its factor searched against ``rule``; see the module docstring."""
    tau = optimal_factor(benign, k, rule, lambda t: alie_vector(benign, t), **search)
    return alie_vector(benign, tau)


def optimal_ipm(benign: torch.Tensor, k: int, rule, **search) -> torch.Tensor:
    """IPM (Xie et al. 2019) with its factor searched against ``rule``; see the module docstring."""
    tau = optimal_factor(benign, k, rule, lambda t: ipm_vector(benign, t), **search)
    return ipm_vector(benign, tau)


def mimic(benign: torch.Tensor, epsilon: int = 0) -> torch.Tensor:
    """A copy of benign client ``epsilon`` (ByzFL's Mimic)."""
    if not 0 <= epsilon < benign.shape[0]:
        raise ValueError(f"mimic needs 0 <= epsilon < {benign.shape[0]} benign clients, got epsilon={epsilon}")
    return benign[epsilon].clone()


def perturbation(benign: torch.Tensor, kind: str) -> torch.Tensor:
    h = benign.double()
    mean = h.mean(0)
    if kind == "unit_vec":
        norm = float(torch.linalg.vector_norm(mean))
        return mean / norm if norm > 0 else torch.zeros_like(mean)
    if kind == "sign":
        return torch.sign(mean)
    if kind == "std":
        return h.std(0, unbiased=benign.shape[0] > 1)
    raise ValueError(f"unknown perturbation {kind!r}; valid: unit_vec, sign, std")


def _gram_terms(benign: torch.Tensor, p: torch.Tensor):
    """Squared distances among benign updates, ``a_i = mean - x_i``: ``|a_i|^2`` and ``a_i . p``."""
    h = benign.double()
    A = h.mean(0) - h
    G = A @ A.T
    g = G.diagonal()
    D = (g[:, None] + g[None, :] - 2 * G).clamp(min=0)
    return D, g, A @ p


def minmax(benign: torch.Tensor, kind: str = "unit_vec") -> torch.Tensor:
    """Min-Max: the largest ``gamma`` with ``max_i |mean - gamma p - x_i| <= max_ij |x_i - x_j|``."""
    p = perturbation(benign, kind)
    D, a2, ap = _gram_terms(benign, p)
    pp = float(p @ p)
    mean = benign.double().mean(0)
    if pp == 0:
        return mean.float()
    R2 = float(D.max())
    # |a_i - gamma p|^2 <= R2: gamma <= (a.p + sqrt((a.p)^2 - |p|^2 (|a|^2 - R2))) / |p|^2
    disc = (ap**2 - pp * (a2 - R2)).clamp(min=0)
    gamma = float(((ap + disc.sqrt()) / pp).min().clamp(min=0))
    return (mean - gamma * p).float()


def minsum(benign: torch.Tensor, kind: str = "unit_vec") -> torch.Tensor:
    """Min-Sum: the largest ``gamma`` with ``sum_i |mean - gamma p - x_i|^2 <= max_i sum_j |x_i - x_j|^2``."""
    p = perturbation(benign, kind)
    D, a2, _ = _gram_terms(benign, p)
    pp = float(p @ p)
    mean = benign.double().mean(0)
    if pp == 0:
        return mean.float()
    h = benign.shape[0]
    # sum_i a_i = 0, so the sum is h |p|^2 gamma^2 + sum_i |a_i|^2
    gamma = math.sqrt(max(float(D.sum(1).max()) - float(a2.sum()), 0.0) / (h * pp))
    return (mean - gamma * p).float()
