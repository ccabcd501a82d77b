"""The adaptive attacks (tapestry.federated.adaptive_attacks) against ByzFL 0.0.11's own
(optimal ALIE, optimal IPM, Mimic) and against the defining constraints (Min-Max, Min-Sum)."""

import numpy as np
import pytest
import torch

import byzfl_oracle
import tapestry as tp
from tapestry.federated import adaptive_attacks as aa
from tapestry.federated.attacks import craft, get_attack

AGG, PRE, ATT = byzfl_oracle.load()


def benign(h, d, seed=0):
    g = np.random.default_rng(seed)
    return torch.from_numpy((g.standard_normal((h, d)) + 0.5).astype(np.float32))


def agree(ours, theirs, X):
    """To 1e-5 of the largest value, input or output (the attacks' outputs reach 1e6 x the inputs)."""
    tol = 1e-5 * max(float(X.abs().max()), float(np.abs(np.asarray(theirs)).max()))
    err = float(np.abs(np.asarray(ours, np.float64) - np.asarray(theirs, np.float64)).max())
    assert err <= tol, f"max error {err:.3g} > {tol:.3g}"


# (our rule, ByzFL's aggregator and pre-aggregators, Byzantine count, whether the attack's effect
# keeps growing past float32 resolution so both searches take the same steps)
CASES = [
    (lambda k: tp.Mean(), lambda k: (AGG.Average(), []), 3, True),
    (lambda k: tp.TrimmedMean(f=k), lambda k: (AGG.TrMean(k), []), 3, True),
    (lambda k: tp.ARC(k, tp.Mean()), lambda k: (AGG.Average(), [PRE.ARC(k)]), 2, False),
    (lambda k: tp.MDA(k), lambda k: (AGG.MDA(k), []), 2, True),
]


def effect(theirs, H, vector, k):
    """ByzFL's objective, in float64: how far the aggregate lands from the benign mean."""
    agg, pre = theirs(k)
    X = np.concatenate([H.numpy().astype(np.float64), np.repeat(np.asarray(vector, np.float64)[None], k, 0)])
    for p in pre:
        X = p(X)
    return float(np.linalg.norm(agg(X) - H.numpy().astype(np.float64).mean(0)))


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("d", [1, 50, 5000])
def test_optimal_alie_and_ipm_equal_byzfl(case, d):
    ours, theirs, k, same_steps = CASES[case]
    H = benign(9, d, seed=d + case)
    for mine, Theirs in ((aa.optimal_alie, ATT.Optimal_ALittleIsEnough),
                         (aa.optimal_ipm, ATT.Optimal_InnerProductManipulation)):
        agg, pre = theirs(k)
        expect = Theirs(agg=agg, pre_agg_list=pre, f=k)(H.numpy().astype(np.float64))
        got = mine(H, k, ours(k))
        assert effect(theirs, H, got, k) == pytest.approx(effect(theirs, H, expect, k), rel=1e-6)
        if same_steps:  # (on a plateau flat to 1e-7 the searches may stop at other factors of equal effect)
            agree(got, expect, H)


def test_mimic_equals_byzfl():
    H = benign(7, 30)
    for eps in (0, 4):
        agree(aa.mimic(H, eps), ATT.Mimic(eps)(H.numpy()), H)
    with pytest.raises(ValueError, match="mimic needs 0 <= epsilon < 7"):
        aa.mimic(H, 7)


def _authors_bisection(H, p, feasible):
    """The authors' search for gamma (their code), from a larger start so it can reach the optimum."""
    mean = H.mean(0)
    lam, step, succ = 1000.0, 500.0, 0.0
    while abs(succ - lam) > 1e-9:
        if feasible(mean - lam * p):
            succ, lam = lam, lam + step
        else:
            lam = lam - step
        step /= 2
    return mean - succ * p


@pytest.mark.parametrize("kind", ["unit_vec", "sign", "std"])
def test_minmax_and_minsum_take_the_largest_feasible_gamma(kind):
    H = benign(10, 400, seed=3).double()
    D = torch.cdist(H, H) ** 2
    p = aa.perturbation(H, kind)
    within_max = lambda m: float(((H - m) ** 2).sum(1).max()) <= float(D.max())
    within_sum = lambda m: float(((H - m) ** 2).sum()) <= float(D.sum(1).max())
    for attack, feasible in ((aa.minmax, within_max), (aa.minsum, within_sum)):
        mal = attack(H.float(), kind).double()
        assert torch.allclose(mal, _authors_bisection(H, p, feasible), atol=1e-5), attack.__name__
    # tight: Min-Max's farthest benign update sits exactly at the largest benign distance
    mal = aa.minmax(H.float(), kind).double()
    assert float(((H - mal) ** 2).sum(1).max()) == pytest.approx(float(D.max()), rel=1e-5)


def test_craft_places_the_attack_in_the_byzantine_rows_and_keeps_the_rule_state():
    X = benign(10, 20, seed=1)
    rule = tp.Bucketing(2, tp.Median(), seed=0)
    twin = tp.Bucketing(2, tp.Median(), seed=0)
    out = craft(get_attack("optimal_alie"), X, [7, 9], None, torch.Generator(), 2, rule=rule)
    H = X[[0, 1, 2, 3, 4, 5, 6, 8]]
    assert torch.equal(out[[0, 1, 2, 3, 4, 5, 6, 8]], H)
    assert torch.equal(out[7], out[9]) and not torch.equal(out[7], X[7])
    assert torch.equal(rule(out), twin(out))  # the attacker's probes did not advance the generator
    for name in ("minmax", "minsum", "mimic", "optimal_ipm"):
        out = craft(get_attack(name), X, [0], None, torch.Generator(), 1, rule=tp.Median())
        assert torch.equal(out[1:], X[1:]) and torch.isfinite(out).all()
    with pytest.raises(TypeError, match="searches against the rule in use"):
        craft(get_attack("optimal_ipm"), X, [0], None, torch.Generator(), 1)
