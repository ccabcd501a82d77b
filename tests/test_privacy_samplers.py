"""Exact samplers: the C++ kernel equals the pure-Python contract bit for bit, and the draws pass a
statistical battery (mean, variance, tails, chi-square against the exact pmf) that biased samplers
fail. Every check uses a fixed seed; the false-alarm rate of one battery is below 1e-4 + 4 x 6e-7
(chi-square p < 1e-4, moment and tail checks at 5 standard errors)."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from tapestry.privacy import sample_discrete_gaussian, sample_skellam
from tapestry.privacy import samplers as S

Z = 5.0          # moment/tail checks: |error| <= 5 standard errors (two-sided 5.7e-7 each)
CHI_P = 1e-4     # chi-square false-alarm rate


def battery(x: np.ndarray, support: np.ndarray, pmf: np.ndarray) -> list[str]:
    """Failures of ``x`` (int draws) against ``pmf`` on ``support`` (normalised, covering the bulk)."""
    n = len(x)
    fails = []
    mean = float((support * pmf).sum())
    var = float(((support - mean) ** 2 * pmf).sum())
    m4 = float(((support - mean) ** 4 * pmf).sum())
    if abs(x.mean() - mean) > Z * math.sqrt(var / n):
        fails.append(f"mean {x.mean():.5f} vs {mean:.5f}")
    if abs(x.var() - var) > Z * math.sqrt((m4 - var * var) / n):
        fails.append(f"variance {x.var():.5f} vs {var:.5f}")
    k = max(1, int(2.5 * math.sqrt(var)))
    p_tail = float(pmf[np.abs(support) >= k].sum())
    got = float((np.abs(x) >= k).mean())
    if abs(got - p_tail) > Z * math.sqrt(p_tail * (1 - p_tail) / n):
        fails.append(f"P(|X| >= {k}) {got:.5f} vs {p_tail:.5f}")
    # chi-square over the support, tails merged until every expected count is >= 20
    expected = pmf * n
    keep = expected >= 20
    lo, hi = support[keep].min(), support[keep].max()
    obs = [np.sum(x <= lo)] + [np.sum(x == v) for v in range(lo + 1, hi)] + [np.sum(x >= hi)]
    exp = [pmf[support <= lo].sum() * n] + [pmf[support == v].sum() * n for v in range(lo + 1, hi)] + \
          [pmf[support >= hi].sum() * n]
    exp = np.array(exp) * (n / np.sum(exp))
    stat, p = scipy.stats.chisquare(obs, exp)
    if p < CHI_P:
        fails.append(f"chi-square p = {p:.2e}")
    return fails


def dg_pmf(sigma2):
    s2 = S.quantize(sigma2, "sigma2", S.MAX_SIGMA2) / 2 ** S.DEN_BITS
    r = int(12 * math.sqrt(s2)) + 12
    support = np.arange(-r, r + 1)
    return support, S.discrete_gaussian_pmf(sigma2, support)


@pytest.mark.parametrize("sigma2", [0.5, 3.0, 40.0, 1e4])
def test_discrete_gaussian_battery(sigma2):
    x = sample_discrete_gaussian(sigma2, 300_000, seed=11).numpy()
    assert x.dtype == np.int64
    support, pmf = dg_pmf(sigma2)
    assert battery(x, support, pmf) == []


@pytest.mark.parametrize("mu", [0.25, 2.0, 7.5])
def test_skellam_battery(mu):
    x = sample_skellam(mu, 150_000, seed=12).numpy()
    support = np.arange(-int(20 * math.sqrt(mu)) - 20, int(20 * math.sqrt(mu)) + 21)
    pmf = scipy.stats.skellam.pmf(support, mu, mu)
    assert battery(x, support, pmf / pmf.sum()) == []


def test_battery_catches_biased_samplers():
    """The same battery rejects near-misses: a rounded continuous Gaussian (the floating-point
    shortcut), a 3% variance error, and a shifted sampler."""
    rng = np.random.default_rng(0)
    n = 300_000
    support, pmf = dg_pmf(0.5)
    assert battery(np.rint(rng.normal(0, math.sqrt(0.5), n)).astype(np.int64), support, pmf)
    support, pmf = dg_pmf(40.0)
    assert battery(sample_discrete_gaussian(40.0 * 1.03, n, seed=1).numpy(), support, pmf)
    assert battery(sample_discrete_gaussian(40.0, n, seed=1).numpy() + (rng.random(n) < 0.1), support, pmf)
    mu = 2.0
    sup = np.arange(-60, 61)
    sk = scipy.stats.skellam.pmf(sup, mu, mu)
    assert battery(np.rint(rng.normal(0, math.sqrt(2 * mu), n)).astype(np.int64), sup, sk / sk.sum())


@pytest.mark.parametrize("sigma2", [0.3, 5.0, 2.0 ** 30])
def test_kernel_equals_reference_discrete_gaussian(sigma2):
    count = S.CHUNK + 37  # two chunks: the second starts a new keystream
    ref, ref_words = S.reference_discrete_gaussian(sigma2, count, seed=b"k" * 32)
    got, words = sample_discrete_gaussian(sigma2, count, seed=b"k" * 32, return_words=True)
    assert torch.equal(ref, got) and ref_words == words


def test_kernel_equals_reference_skellam():
    ref, ref_words = S.reference_skellam(3.3, S.CHUNK + 5, seed=7)
    got, words = sample_skellam(3.3, S.CHUNK + 5, seed=7, return_words=True)
    assert torch.equal(ref, got) and ref_words == words


def test_seeds_and_chunks():
    a = sample_discrete_gaussian(9.0, 10_000, seed=1)
    assert torch.equal(a, sample_discrete_gaussian(9.0, 10_000, seed=1))
    assert not torch.equal(a, sample_discrete_gaussian(9.0, 10_000, seed=2))
    # a prefix: the first chunks do not depend on how many draws follow
    assert torch.equal(a[:S.CHUNK], sample_discrete_gaussian(9.0, S.CHUNK, seed=1))
    assert sample_discrete_gaussian(9.0, 0, seed=1).shape == (0,)


def test_parameters_round_up():
    assert S.quantize(1.0, "s", 10) == 256 and S.quantize(1.0 + 1e-9, "s", 10) == 257
    assert S.quantize(0.001, "s", 10) == 1


@pytest.mark.parametrize("bad, err", [(0.0, "zero noise"), (-1.0, "> 0"), (float("nan"), "finite"),
                                      (float("inf"), "finite"), (2.0 ** 41, "limit")])
def test_bad_sigma2(bad, err):
    with pytest.raises(ValueError, match=err):
        sample_discrete_gaussian(bad, 10, seed=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="count"):
        sample_skellam(1.0, -1, seed=0)
    with pytest.raises(ValueError, match="32 bytes"):
        sample_skellam(1.0, 5, seed=b"short")
    with pytest.raises(TypeError, match="seed"):
        sample_discrete_gaussian(1.0, 5, seed=1.5)
    with pytest.raises(ValueError, match="mu"):
        sample_skellam(0, 5, seed=0)
