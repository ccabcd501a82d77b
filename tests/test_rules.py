"""The rules end to end (validation, selection, diagnostics, non-finite clients) on every CPU
backend, against direct NumPy transcriptions of docs/spec.md (tests/naive.py)."""

import numpy as np
import pytest
import torch

import naive
from checks import assert_close
import tapestry as tp
from tapestry import ops
from tapestry.aggregators.columns import InMemory

# Every CPU backend: the native one is always built by `make test`, so its absence is a failure.
BACKENDS = ["reference", "cpu"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    reason = ops.unavailable_reason(request.param)
    assert reason is None, reason
    with tp.backend(request.param):
        yield request.param


def updates(n, d, seed=0, common=0.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    X += common * torch.randn(1, d, generator=g, dtype=torch.float64)
    return X.to(dtype)


@pytest.mark.parametrize("n,f", [(1, 0), (2, 0), (5, 2), (10, 3), (33, 8)])
def test_trimmed_mean_and_median_match_definition(backend, n, f):
    X = updates(n, 37, seed=n)
    assert_close(tp.trimmed_mean(X, f=f), naive.trimmed_mean(X.numpy(), f), X)
    assert_close(tp.median(X), naive.median(X.numpy()), X)


def test_beta_gives_floor_beta_n(backend):
    X = updates(10, 20)
    assert torch.equal(tp.trimmed_mean(X, beta=0.25), tp.trimmed_mean(X, f=2))
    assert torch.equal(tp.trimmed_mean(X), tp.trimmed_mean(X, f=2))  # default beta = 0.2


def test_even_median_is_mean_of_middle_values(backend):
    X = torch.tensor([[1.0], [2.0], [10.0], [20.0]])
    assert tp.median(X).item() == 6.0


def test_weighted_mean(backend):
    X = updates(4, 9)
    w = [1.0, 2.0, 0.0, 5.0]
    expect = (X.double() * torch.tensor(w, dtype=torch.float64)[:, None]).sum(0) / sum(w)
    assert_close(tp.mean(X, weights=w), expect, X)


@pytest.mark.parametrize("n,f", [(7, 2), (12, 3), (20, 4)])
def test_krum_and_multi_krum_select_like_definition(backend, n, f):
    X = updates(n, 50, seed=n, common=1e3)  # a huge common component must not blur distances
    X[0] += 5.0  # an outlier
    best, scores = naive.krum_select(X.numpy(), f)
    agg, info = tp.krum(X, f=f, return_info=True)
    assert info.selected == [best]
    assert torch.equal(agg, X[best])
    np.testing.assert_allclose(info.scores.numpy(), scores, rtol=1e-4)
    m = n - f
    agg, info = tp.multi_krum(X, f=f, m=m, return_info=True)
    expect = sorted(np.argsort(scores, kind="stable")[:m].tolist())
    assert info.selected == expect and info.rejected == sorted(set(range(n)) - set(expect))
    assert_close(agg, X.double()[expect].mean(0), X, rel=1e-6)


def test_krum_ties_go_to_lowest_index(backend):
    X = torch.zeros(7, 5)
    X[5:] = 10.0  # five identical updates at 0 all score 0
    assert tp.krum(X, f=2, return_info=True)[1].selected == [0]


@pytest.mark.parametrize("n,f", [(7, 1), (11, 2), (15, 3)])
def test_bulyan_matches_definition(backend, n, f):
    X = updates(n, 40, seed=3 * n)
    X[-1] *= 50
    expect, chosen = naive.bulyan(X.numpy(), f)
    agg, info = tp.bulyan(X, f=f, return_info=True)
    assert info.selected == chosen
    assert_close(agg, expect, X)


def test_nnm_mixes_nearest_neighbours(backend):
    n, f = 8, 2
    X = updates(n, 30)
    D, _ = naive.sq_dists(X.numpy())
    mixed = np.stack([X.double().numpy()[np.argsort(D[i], kind="stable")[: n - f]].mean(0) for i in range(n)])
    assert_close(tp.nnm(X, f, tp.Median()), naive.median(mixed), X)
    assert_close(tp.nnm(X, f, tp.Mean()), mixed.mean(0), X)


def test_geometric_median_of_symmetric_points(backend):
    # four points on a square around c, plus c itself: the geometric median is c
    c = torch.tensor([3.0, -1.0])
    X = torch.stack([c + torch.tensor(v) for v in ([1.0, 0], [-1.0, 0], [0, 1.0], [0, -1.0])] + [c])
    X = torch.cat([X, X[:1] * 0 + torch.tensor([100.0, 100.0])])  # one far outlier
    agg, info = tp.geometric_median(X, return_info=True, tol=1e-10, max_iter=500)
    assert torch.allclose(agg, c, atol=1e-3), agg
    assert info.iterations >= 1 and info.scores[-1] < info.scores[0]


def test_centered_clipping_formula(backend):
    X = torch.tensor([[1.0, 0.0], [0.0, 10.0], [0.0, 0.0]])
    tau = 2.0
    v = torch.zeros(2, dtype=torch.float64)
    steps = []
    for x in X.double():
        u = x - v
        steps.append(u * min(1.0, tau / float(u.norm())) if float(u.norm()) > 0 else u)
    expect = v + torch.stack(steps).mean(0)
    assert torch.allclose(tp.centered_clipping(X, tau=tau).double(), expect, atol=1e-6)
    rule = tp.CenteredClipping(tau=tau)
    first = rule(X)
    second = rule(X)  # starts from the previous aggregate
    assert not torch.equal(first, second)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_clients_never_reach_robust_outputs(backend, value):
    n, f = 11, 2
    X = updates(n, 64, seed=5)
    X[3, ::3] = value
    X[7, 5] = value
    for rule in [tp.TrimmedMean(f=f), tp.Median(), tp.Krum(f), tp.MultiKrum(f, m=5), tp.Bulyan(f),
                 tp.NNM(f, tp.TrimmedMean(f=f)), tp.GeometricMedian(), tp.CenteredClipping(tau=1.0)]:
        agg, info = rule(X, return_info=True)
        assert bool(torch.isfinite(agg).all()), type(rule).__name__
        assert info.nonfinite == [3, 7], type(rule).__name__
        if info.selected is not None:
            assert 3 not in info.selected and 7 not in info.selected
    # Krum's other scores are unaffected by the bad clients
    good = [i for i in range(n) if i not in (3, 7)]
    _, info = tp.krum(X, f=f, return_info=True)
    assert torch.isinf(info.scores[[3, 7]]).all() and torch.isfinite(info.scores[good]).all()


def test_mean_has_no_protection_but_names_the_client(backend):
    X = updates(5, 8)
    X[4, 2] = float("nan")
    agg, info = tp.mean(X, return_info=True)
    assert torch.isnan(agg[2]) and info.nonfinite == [4]
    agg, info = tp.mean(X, weights=[1, 1, 1, 1, 0], return_info=True)  # weight 0: not read at all
    assert torch.isfinite(agg).all() and info.nonfinite == []


def test_blocked_sources_are_bit_identical(backend):
    X = updates(12, 301, seed=9)
    for rule in [tp.TrimmedMean(f=3), tp.Median(), tp.Krum(3), tp.Bulyan(2), tp.MultiKrum(3, 4)]:
        whole, a = rule.aggregate(InMemory(X), want_info=True)
        parts, b = rule.aggregate(InMemory(X, block=64), want_info=True)
        assert torch.equal(whole, parts), type(rule).__name__
        assert a.selected == b.selected


def test_deterministic(backend):
    X = updates(16, 999, seed=2)
    for fn in [lambda: tp.trimmed_mean(X, f=4), lambda: tp.median(X), lambda: tp.bulyan(X, f=3)]:
        assert torch.equal(fn(), fn())


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda X: tp.krum(X, f=2), r"Krum needs n >= 2f\+3, got n=6, f=2"),
        (lambda X: tp.multi_krum(X, f=1, m=7), r"multi_krum needs 1 <= m <= n, got m=7, n=6"),
        (lambda X: tp.multi_krum(X, f=1, m=0), r"multi_krum needs 1 <= m <= n, got m=0, n=6"),
        (lambda X: tp.bulyan(X, f=1), r"bulyan needs n >= 4f\+3, got n=6, f=1"),
        (lambda X: tp.trimmed_mean(X, f=3), r"trimmed_mean needs 2f < n, got n=6, f=3"),
        (lambda X: tp.trimmed_mean(X, beta=0.5), r"beta in \[0, 0.5\), got beta=0.5"),
        (lambda X: tp.trimmed_mean(X, beta=-0.1), r"beta in \[0, 0.5\)"),
        (lambda X: tp.nnm(X, 6, tp.Mean()), r"nnm needs n > f, got n=6, f=6"),
        (lambda X: tp.krum(X, f=-1), r"f >= 0, got f=-1"),
        (lambda X: tp.mean(X, weights=[1, 1, 1, 1, 1, -1]), r"client 5 has weight -1"),
        (lambda X: tp.mean(X, weights=[0] * 6), r"sum of weights > 0, got 0"),
        (lambda X: tp.mean(X, weights=[1, 1]), r"got 2 weights for n=6"),
        (lambda X: tp.centered_clipping(X, tau=0), r"tau > 0, got tau=0"),
        (lambda X: tp.make_rule("krumm", f=1), r"unknown rule 'krumm'; valid: mean, trimmed_mean"),
    ],
)
def test_requirements_are_errors_with_numbers(call, match):
    with pytest.raises(ValueError, match=match.replace("Krum", "krum")):
        call(updates(6, 4))


def test_info_reports_backend_and_rule():
    X = updates(9, 10)
    with tp.backend("reference"):
        _, info = tp.krum(X, f=2, return_info=True)
    assert info.backend == "reference" and info.rule == "krum" and info.f == 2 and info.n == 9


def test_forcing_an_unknown_or_missing_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        with tp.backend("gpu"):
            pass
    with tp.backend("cuda"):  # CPU tensors: refused whether or not a GPU exists
        with pytest.raises(tp.BackendError, match="backend 'cuda' cannot run trimmed_mean on cpu"):
            tp.trimmed_mean(updates(5, 3), f=1)


def test_make_rule_builds_every_rule_and_nnm_compositions():
    assert repr(tp.make_rule("nnm+median", f=2)) == "NNM(f=2, rule=Median())"
    assert repr(tp.make_rule("nnm+krum", f=2)) == "NNM(f=2, rule=Krum(f=2))"
    X = updates(9, 10)
    assert torch.equal(tp.make_rule("nnm+trimmed_mean", f=2)(X), tp.nnm(X, 2, tp.TrimmedMean(f=2)))
    with pytest.raises(ValueError, match="NNM needs f"):
        tp.make_rule("nnm+median")
