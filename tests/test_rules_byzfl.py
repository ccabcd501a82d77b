"""ByzFL's rules and pre-aggregators in Tapestry, against ByzFL 0.0.11 itself where it is
deterministic, and against exact NumPy transcriptions (tests/naive_byzfl.py) where ByzFL
randomises (CAF, SMEA: one power iteration from a random vector) or has no such rule (DnC,
FLTrust). Inputs are float32 with ties (duplicated clients); results agree to 1e-5 of the largest
input value. ByzFL gets the same values as float64 NumPy arrays (see tests/byzfl_oracle.py)."""


import numpy as np
import pytest
import torch

import byzfl_oracle
import naive_byzfl
import tapestry as tp
from tapestry.aggregators.columns import InMemory
from tapestry.aggregators.spectral import dnc_coordinates

AGG, PRE, _ = byzfl_oracle.load()


def data(n, d, seed=0, ties=True, outliers=0, scale=10.0):
    """float32 ``(n, d)``: Gaussian clients, client 1 a copy of client 0 and the last honest one a
    copy of client 2 (ties), the last ``outliers`` shifted far away in a common random direction."""
    g = np.random.default_rng(seed)
    X = g.standard_normal((n, d))
    if ties and n >= 4:
        X[1] = X[0]
        X[n - 1 - outliers] = X[2]
    if outliers:
        X[n - outliers:] += scale * g.standard_normal(d) + g.standard_normal((outliers, d))
    return torch.from_numpy(X.astype(np.float32))


def agree(ours, theirs, X):
    ours = np.asarray(ours, np.float64)
    theirs = np.asarray(theirs, np.float64)
    tol = 1e-5 * float(np.abs(X.numpy()).max())
    err = np.abs(ours - theirs).max()
    assert err <= tol, f"max error {err:.3g} > {tol:.3g} at {int(np.abs(ours - theirs).argmax())}"


def byzfl(rule, X):
    return rule(X.numpy().astype(np.float64))


@pytest.mark.parametrize("n,f,d", [(5, 2, 1), (9, 3, 7), (12, 3, 1000), (16, 2, 100_000), (40, 1, 10), (14, 6, 5)])
def test_mda_equals_byzfl(n, f, d):
    for X in (data(n, d, seed=n + d), data(n, d, seed=n, outliers=f)):
        agg, info = tp.mda(X, f, return_info=True)
        agree(agg, byzfl(AGG.MDA(f), X), X)
        assert len(info.selected) == n - f


def test_mda_ties_go_to_the_first_subset_like_byzfl():
    X = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])  # every window of 3 has diameter 2
    agg, info = tp.mda(X, 2, return_info=True)
    assert info.selected == [0, 1, 2] and agg.item() == 1.0
    agree(agg, byzfl(AGG.MDA(2), X), X)


@pytest.mark.parametrize("n,f,d", [(5, 2, 1), (12, 3, 1000), (16, 4, 100_000), (40, 19, 33)])
def test_monna_equals_byzfl(n, f, d):
    X = data(n, d, seed=d, outliers=f)
    for idx in (0, 2, n - 1):
        agree(tp.monna(X, f, idx=idx), byzfl(AGG.MoNNA(f, idx), X), X)


@pytest.mark.parametrize("n,f,d", [(5, 2, 1), (6, 2, 17), (10, 4, 1000), (40, 19, 100_000), (33, 8, 1001)])
def test_meamed_equals_byzfl(n, f, d):
    X = data(n, d, seed=n * d, outliers=f // 2)
    agree(tp.meamed(X, f), byzfl(AGG.Meamed(f), X), X)


def test_meamed_is_the_mean_around_median_op():
    X = data(11, 300, seed=4)
    assert torch.equal(tp.meamed(X, 3), tp.ops.call("mean_around_median", X, torch.arange(11), 8))


@pytest.mark.parametrize("n,f", [(5, 1), (9, 3), (16, 4), (40, 12)])
def test_caf_equals_byzfl_where_its_power_iteration_is_exact(n, f):
    # d = 1: one power iteration from any vector gives the exact eigenpair. (Not so for rank-one
    # data in d > 1: ByzFL's eigenvalue is v1 . Sigma v0 = lambda |u . v0|, random through v0.)
    X = data(n, 1, seed=n, outliers=f)
    agree(tp.caf(X, f), byzfl(AGG.CAF(f), X), X)


@pytest.mark.parametrize("n,f,d", [(5, 2, 3), (10, 3, 50), (16, 4, 100_000), (33, 8, 2000)])
def test_caf_equals_exact_transcription(n, f, d):
    X = data(n, d, seed=d, outliers=f)
    agg, info = tp.caf(X, f, return_info=True)
    agree(agg, naive_byzfl.caf(X.numpy(), f), X)
    assert info.iterations >= 1


@pytest.mark.parametrize("n,f", [(5, 2), (9, 3), (13, 4)])
def test_smea_equals_byzfl_where_its_power_iteration_is_exact(n, f):
    X = data(n, 1, seed=3 * n, outliers=f)
    agree(tp.smea(X, f), byzfl(AGG.SMEA(f), X), X)


@pytest.mark.parametrize("n,f,d,outliers", [(7, 3, 20, 0), (10, 4, 60, 0), (12, 3, 1000, 3), (12, 5, 30, 2)])
def test_smea_is_the_exact_minimum_over_subsets(n, f, d, outliers):
    X = data(n, d, seed=n + d, outliers=outliers)
    expect, chosen, lam = naive_byzfl.smea(X.numpy(), f)
    agg, info = tp.smea(X, f, return_info=True)
    agree(agg, expect, X)
    assert info.scores.item() * (n - f) == pytest.approx(lam, rel=1e-6)


def test_mda_is_the_exact_minimum_over_subsets_without_ties():
    for n, f in [(8, 3), (11, 5), (12, 4)]:
        X = data(n, 25, seed=n, ties=False)
        expect, chosen = naive_byzfl.mda(X.numpy(), f)
        agg, info = tp.mda(X, f, return_info=True)
        assert info.selected == chosen
        agree(agg, expect, X)


def test_mda_and_smea_find_the_honest_clients_at_n32_f8():
    X = data(32, 4096, seed=1, outliers=8, scale=3.0)
    for rule in (tp.MDA(8), tp.SMEA(8)):
        _, info = rule(X, return_info=True)
        assert info.selected == list(range(24)), type(rule).__name__


@pytest.mark.parametrize("n,f,d,b,niters", [(9, 2, 40, 40, 1), (16, 4, 3000, 500, 3), (12, 3, 100_000, 10_000, 2)])
def test_dnc_equals_exact_transcription(n, f, d, b, niters):
    X = data(n, d, seed=d, outliers=f)
    sets = [dnc_coordinates(d, b, 7, i).numpy() for i in range(niters)]
    expect, chosen = naive_byzfl.dnc(X.numpy(), f, sets)
    agg, info = tp.dnc(X, f, niters=niters, b=b, seed=7, return_info=True)
    assert info.selected == chosen
    agree(agg, expect, X)


def test_fltrust_equals_exact_transcription():
    X = data(12, 5000, seed=3, outliers=3)
    g0 = X[:9].mean(0) + 0.1 * torch.randn(5000, generator=torch.Generator().manual_seed(0))
    agg, info = tp.fltrust(X, g0, return_info=True)
    agree(agg, naive_byzfl.fltrust(X.numpy(), g0.numpy()), X)
    assert float(info.scores[0]) > 0
    # every client opposed to the server: no one trusted, zero update
    assert torch.equal(tp.fltrust(-X[:9].abs() - 1, X[:9].abs().mean(0) + 1), torch.zeros(5000))


@pytest.mark.parametrize("n,s,d", [(10, 2, 100), (11, 3, 1), (16, 4, 100_000), (7, 7, 5)])
def test_bucketing_equals_byzfl(n, s, d):
    X = data(n, d, seed=s, outliers=2)
    np.random.seed(123)
    perm = np.random.permutation(n)
    np.random.seed(123)
    theirs = byzfl(PRE.Bucketing(s), X)
    inner = (tp.Median(), AGG.Median())
    ours = tp.Bucketing(s, inner[0], order=perm.tolist())(X)
    agree(ours, inner[1](theirs), X)
    agree(tp.Bucketing(s, tp.Mean(), order=perm.tolist())(X), theirs.mean(0), X)


@pytest.mark.parametrize("n,f,d", [(5, 2, 1), (10, 3, 1000), (16, 4, 100_000), (40, 19, 10)])
def test_arc_and_clipping_equal_byzfl(n, f, d):
    X = data(n, d, seed=f, outliers=f)
    X[0] *= 0  # a zero update
    agree(tp.arc(X, f, tp.Mean()), AGG.Average()(byzfl(PRE.ARC(f), X)), X)
    agree(tp.arc(X, f, tp.TrimmedMean(f=f)), AGG.TrMean(f)(byzfl(PRE.ARC(f), X)), X)
    c = float(np.median(np.linalg.norm(X.numpy(), axis=1)))
    agree(tp.clipping(X, c, tp.Mean()), AGG.Average()(byzfl(PRE.Clipping(c), X)), X)
    agree(tp.clipping(X, c, tp.Median()), AGG.Median()(byzfl(PRE.Clipping(c), X)), X)


def test_bucketing_draws_a_new_seeded_permutation_each_call():
    X = data(12, 30, seed=0, ties=False)
    a, b = tp.Bucketing(3, tp.Median(), seed=5), tp.Bucketing(3, tp.Median(), seed=5)
    first = a(X)
    assert torch.equal(first, b(X))  # same seed, same draws
    assert not torch.equal(first, a(X))  # the next round reshuffles
    assert torch.equal(tp.bucketing(X, s=3, rule=tp.Median(), seed=5), first)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_clients_are_named_and_kept_out(value):
    n, f = 11, 2
    X = data(n, 64, seed=5)
    X[3, ::3] = value
    X[7, 5] = value
    rules = [tp.MDA(f), tp.SMEA(f), tp.CAF(f), tp.DnC(f), tp.MoNNA(f), tp.Meamed(f),
             tp.Bucketing(1, tp.TrimmedMean(f=f)), tp.Clipping(2.0, tp.TrimmedMean(f=f)), tp.ARC(f, tp.Krum(f)),
             tp.ARC(f, tp.MDA(f))]
    for rule in rules:
        agg, info = rule(X, return_info=True)
        assert bool(torch.isfinite(agg).all()), repr(rule)
        assert info.nonfinite == [3, 7], repr(rule)
        if info.selected is not None and not info.rule.startswith(("arc", "bucketing")):
            assert 3 not in info.selected and 7 not in info.selected, repr(rule)
    agg, info = tp.fltrust(X, X[0], return_info=True)
    assert bool(torch.isfinite(agg).all()) and info.nonfinite == [3, 7] and info.scores[[3, 7]].eq(0).all()


def test_blocked_and_compressed_sources_give_the_same_result():
    from tapestry import compression

    X = data(12, 3001, seed=9, outliers=3)
    for rule in [tp.MDA(3), tp.SMEA(3), tp.CAF(3), tp.DnC(3, b=500), tp.MoNNA(3), tp.Meamed(3),
                 tp.ARC(3, tp.TrimmedMean(f=3)), tp.Clipping(50.0, tp.Median())]:
        whole, _ = rule.aggregate(InMemory(X), want_info=False)
        parts, _ = rule.aggregate(InMemory(X, block=640), want_info=False)
        assert torch.allclose(whole, parts, rtol=0, atol=1e-6 * float(X.abs().max())), repr(rule)
    payloads = [compression.encode(x, "fp16") for x in X]
    decoded = torch.stack([compression.decode(p) for p in payloads]).float()
    for rule in [tp.MDA(3), tp.Meamed(3), tp.CAF(3)]:
        assert torch.allclose(compression.aggregate(payloads, rule), rule(decoded), atol=1e-6), repr(rule)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda X: tp.mda(X, 3), r"mda needs n > 2f, got n=6, f=3"),
        (lambda X: tp.smea(X, 3), r"smea needs n > 2f, got n=6, f=3"),
        (lambda X: tp.caf(X, 3), r"caf needs n > 2f, got n=6, f=3"),
        (lambda X: tp.meamed(X, 3), r"meamed needs n > 2f, got n=6, f=3"),
        (lambda X: tp.monna(X, 3), r"monna needs n > 2f, got n=6, f=3"),
        (lambda X: tp.monna(X, 1, idx=6), r"monna needs idx < n, got idx=6, n=6"),
        (lambda X: tp.dnc(X, 3), r"dnc needs n > 2f, got n=6, f=3"),
        (lambda X: tp.dnc(X, 1, b=0), r"dnc needs b >= 1, got b=0"),
        (lambda X: tp.arc(X, 3, tp.Mean()), r"arc needs n > 2f, got n=6, f=3"),
        (lambda X: tp.clipping(X, 0.0, tp.Mean()), r"clipping needs c > 0, got c=0.0"),
        (lambda X: tp.bucketing(X, 0, tp.Mean()), r"bucketing needs s >= 1, got s=0"),
        (lambda X: tp.bucketing(X, 7, tp.Mean()), r"bucketing needs s <= n, got s=7, n=6"),
        (lambda X: tp.bucketing(X, 4, tp.Krum(1)),
         r"bucketing: s=4 turns n=6 clients into 2 buckets, the last of 2, too few for the inner rule: "
         r"krum needs n >= 2f\+3, got n=2, f=1"),
        (lambda X: tp.mda(X, -1), r"mda needs f >= 0, got f=-1"),
        (lambda X: tp.make_rule("bucketing+krum", f=1), r"Bucketing needs s"),
        (lambda X: tp.make_rule("foo+krum", f=1), r"unknown pre-aggregator 'foo'"),
    ],
)
def test_requirements_are_errors_with_numbers(call, match):
    with pytest.raises(ValueError, match=match):
        call(data(6, 4))


def test_fltrust_without_server_update_is_a_type_error():
    with pytest.raises(TypeError, match="fltrust needs the server's update"):
        tp.FLTrust()(data(6, 4))
    with pytest.raises(TypeError, match="rule must be a tapestry rule object"):
        tp.arc(data(6, 4), 1, "mean")


def test_make_rule_composes_every_preaggregator():
    X = data(12, 40, seed=2)
    assert repr(tp.make_rule("arc+nnm+krum", f=2)) == "ARC(f=2, rule=NNM(f=2, rule=Krum(f=2)))"
    assert torch.equal(tp.make_rule("clipping+median", c=3.0)(X), tp.clipping(X, 3.0, tp.Median()))
    assert torch.equal(tp.make_rule("bucketing+mda", s=2, f=1, seed=4)(X), tp.bucketing(X, 2, tp.MDA(1), seed=4))
    for name in ("mda", "monna", "meamed", "caf", "smea", "dnc"):
        assert torch.isfinite(tp.make_rule(name, f=2)(X)).all()
