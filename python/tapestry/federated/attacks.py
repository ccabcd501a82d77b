"""Byzantine attacks: what the ``byzantine`` clients of a round send instead of their honest update.

Every attack gets the round's honest updates (``honest``: ``(n, d)``, one row per sampled client,
Byzantine clients included: they train honestly first, the omniscient threat model of the ALIE and
IPM papers) and the rows of the Byzantine clients, and returns their ``(k, d)`` malicious updates.

=========== ============ ======== =========================================================================
attack      parameter    default  what each Byzantine client sends
=========== ============ ======== =========================================================================
none                              its honest update
signflip    scale        4        ``-scale * own``: its honest update, flipped and amplified
scaling     factor       10       ``factor * own``
gaussian    sigma        100      ``N(0, sigma^2)`` in every coordinate
alie        z            auto     ``mean - z * std`` of the honest updates, per coordinate ("A Little Is
                                  Enough", Baruch et al. 2019); auto: ``z = Phi^-1((n - s) / n)`` with
                                  ``s = floor(n/2 + 1) - f``, the paper's largest undetectable shift
ipm         epsilon      0.1      ``-epsilon * mean`` of the honest updates (inner-product manipulation,
                                  Xie et al. 2019)
labelflip                         its update trained on flipped labels (class c learnt as 9 - c)
nan                               NaN in every coordinate
inf                               +Inf and -Inf in alternate coordinates
optimal_alie                      ``mean + tau * std`` of the benign updates, ``tau`` searched against the
                                  rule in use (ByzFL's Optimal ALIE; :mod:`.adaptive_attacks`)
optimal_ipm                       ``-tau * mean`` of the benign updates, ``tau`` searched likewise
mimic       epsilon      0        a copy of benign client ``epsilon`` (ByzFL's Mimic)
minmax                            Min-Max (Shejwalkar and Houmansadr 2021), unit-vector perturbation
minsum                            Min-Sum (same paper)
=========== ============ ======== =========================================================================

The last five see only the benign updates (the rows of the round's non-Byzantine clients), as in
ByzFL and the papers; the optimal ones also the rule (``craft(..., rule=)``), and count the
round's Byzantine clients as ByzFL's ``f``.

Dropouts are not an attack: they are the ``dropout`` fraction of each round's sample that never
answers (``simulate(..., dropout=...)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from collections.abc import Callable

import torch

from . import adaptive_attacks


@dataclass(frozen=True)
class Attack:
    name: str
    craft: Callable[..., torch.Tensor]
    param: str | None = None
    default: float | None = None
    help: str = ""
    poisons_data: bool = False  # label flipping acts on the training data, not on the update
    benign_only: bool = False  # craft(benign, strength, k, rule) -> (d,): sees the benign rows and the rule


def alie_z(n: int, f: int) -> float:
    """Baruch et al.'s ``z_max`` for ``n`` clients of which ``f`` are Byzantine."""
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    return NormalDist().inv_cdf(min(max(p, 1e-6), 1 - 1e-6))


def _none(own, honest, strength, gen, n, f):
    return own


def _signflip(own, honest, scale, gen, n, f):
    return -scale * own


def _scaling(own, honest, factor, gen, n, f):
    return factor * own


def _gaussian(own, honest, sigma, gen, n, f):
    return sigma * torch.randn(own.shape, generator=gen, dtype=own.dtype)


def _alie(own, honest, z, gen, n, f):
    z = alie_z(n, f) if z is None else z
    h = honest.double()
    return (h.mean(0) - z * h.std(0, unbiased=honest.shape[0] > 1)).float().expand_as(own).clone()


def _ipm(own, honest, epsilon, gen, n, f):
    return (-epsilon * honest.double().mean(0)).float().expand_as(own).clone()


def _nan(own, honest, strength, gen, n, f):
    return torch.full_like(own, float("nan"))


def _inf(own, honest, strength, gen, n, f):
    out = torch.full_like(own, float("inf"))
    out[:, 1::2] = float("-inf")
    return out


def _optimal_alie(benign, strength, k, rule):
    return adaptive_attacks.optimal_alie(benign, k, rule)


def _optimal_ipm(benign, strength, k, rule):
    return adaptive_attacks.optimal_ipm(benign, k, rule)


def _mimic(benign, epsilon, k, rule):
    return adaptive_attacks.mimic(benign, int(epsilon))


def _minmax(benign, strength, k, rule):
    return adaptive_attacks.minmax(benign)


def _minsum(benign, strength, k, rule):
    return adaptive_attacks.minsum(benign)


ATTACKS: dict[str, Attack] = {a.name: a for a in [
    Attack("none", _none),
    Attack("signflip", _signflip, "scale", 4.0, "sign flip: send -SCALE times the honest update"),
    Attack("scaling", _scaling, "factor", 10.0, "scaling: send FACTOR times the honest update"),
    Attack("gaussian", _gaussian, "sigma", 100.0, "Gaussian noise: send N(0, SIGMA^2) per coordinate"),
    Attack("alie", _alie, "z", None, "ALIE: mean - Z*std of honest updates (default: Baruch et al.'s z_max for n, f)"),
    Attack("ipm", _ipm, "epsilon", 0.1, "inner-product manipulation: send -EPSILON times the honest mean"),
    Attack("labelflip", _none, poisons_data=True),
    Attack("nan", _nan),
    Attack("inf", _inf),
    Attack("optimal_alie", _optimal_alie, help="ALIE with its factor searched against the rule (ByzFL)", benign_only=True),
    Attack("optimal_ipm", _optimal_ipm, help="IPM with its factor searched against the rule (ByzFL)", benign_only=True),
    Attack("mimic", _mimic, "epsilon", 0, "mimic: copy benign client EPSILON", benign_only=True),
    Attack("minmax", _minmax, help="Min-Max (Shejwalkar & Houmansadr 2021)", benign_only=True),
    Attack("minsum", _minsum, help="Min-Sum (Shejwalkar & Houmansadr 2021)", benign_only=True),
]}


def get_attack(name: str) -> Attack:
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; valid: {', '.join(ATTACKS)}")
    return ATTACKS[name]


def craft(attack: Attack, honest: torch.Tensor, byz_rows: list[int], strength: float | None,
          gen: torch.Generator, f: int, rule=None) -> torch.Tensor:
    """The round's updates with the rows ``byz_rows`` replaced by ``attack``'s malicious ones
    (``rule``: the rule in use, which the optimal attacks search against)."""
    if not byz_rows or attack.name in ("none", "labelflip"):
        return honest
    s = attack.default if strength is None else strength
    out = honest.clone()
    rows = torch.tensor(byz_rows, dtype=torch.long)
    if attack.benign_only:
        benign = honest[[i for i in range(honest.shape[0]) if i not in set(byz_rows)]]
        if benign.shape[0] == 0:
            return out
        if rule is None and attack.name.startswith("optimal"):
            raise TypeError(f"attack {attack.name!r} searches against the rule in use: craft(..., rule=...)")
        out[rows] = attack.craft(benign, s, len(byz_rows), rule).to(out.dtype)
        return out
    out[rows] = attack.craft(honest[rows], honest, s, gen, honest.shape[0], f)
    return out
