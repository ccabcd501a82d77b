"""The federated loop: splits, attacks, determinism, refusals, and the robustness claim end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tapestry.cli import main
from tapestry.federated import ATTACKS, Config, alie_z, dirichlet_split, load_task, simulate, validate
from tapestry.federated.attacks import craft, get_attack

# A reduced version of the README setting (20 clients, 20% Byzantine) that still shows the claim.
SMALL = dict(clients=20, rounds=12)


@pytest.fixture(scope="module")
def digits():
    return load_task("digits", 20, 100.0, 0)


# -- data ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.3, 1.0, math.inf])
def test_dirichlet_split_is_a_partition(alpha):
    labels = np.random.default_rng(1).integers(0, 10, 1000)
    parts = dirichlet_split(labels, 13, alpha, np.random.default_rng(2))
    together = np.sort(np.concatenate(parts))
    assert np.array_equal(together, np.arange(1000))  # every example exactly once
    assert min(len(p) for p in parts) >= 5


def test_dirichlet_alpha_controls_skew():
    labels = np.repeat(np.arange(10), 100)

    def mean_entropy(alpha):
        parts = dirichlet_split(labels, 10, alpha, np.random.default_rng(3))
        ent = []
        for p in parts:
            q = np.bincount(labels[p], minlength=10) / len(p)
            ent.append(-(q[q > 0] * np.log(q[q > 0])).sum())
        return float(np.mean(ent))

    assert mean_entropy(0.1) < 1.2 < 2.0 < mean_entropy(100.0)  # log(10) = 2.30 for a uniform client


def test_dirichlet_refuses_too_many_clients():
    with pytest.raises(ValueError, match="at least"):
        dirichlet_split(np.zeros(20, dtype=int), 10, 1.0, np.random.default_rng(0))


def test_charlm_clients_hold_different_files():
    task = load_task("charlm", 3, 1.0, 0)
    texts = [bytes(t.to(torch.uint8).tolist()) for _, t in task.clients]
    assert len({t[:200] for t in texts}) == 3 and all(len(t) > 4000 for t in texts)
    x, y = task.test
    assert x.shape == y.shape and torch.equal(x[:, 1:], y[:, :-1])  # next-character targets


# -- attacks -------------------------------------------------------------------------------------

def _honest(n=10, d=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) + 3.0


def test_signflip_scaling_ipm_alie_follow_their_definitions():
    X = _honest()
    rows = [1, 4]
    gen = torch.Generator().manual_seed(0)
    X64 = X.double()
    out = craft(get_attack("signflip"), X, rows, None, gen, 2)
    assert torch.equal(out[rows], -4 * X[rows]) and torch.equal(out[[0, 2, 3]], X[[0, 2, 3]])
    out = craft(get_attack("scaling"), X, rows, 3.0, gen, 2)
    assert torch.equal(out[rows], 3 * X[rows])
    out = craft(get_attack("ipm"), X, rows, None, gen, 2)
    torch.testing.assert_close(out[rows].double(), (-0.1 * X64.mean(0)).expand(2, -1), rtol=1e-6, atol=1e-6)
    out = craft(get_attack("alie"), X, rows, 1.5, gen, 2)
    expect = X64.numpy().mean(0) - 1.5 * X64.numpy().std(0, ddof=1)
    np.testing.assert_allclose(out[rows].double().numpy(), np.broadcast_to(expect, (2, 7)), rtol=1e-6)
    assert not torch.equal(X, out)  # the caller's tensor is left alone
    assert torch.equal(X, _honest())


def test_alie_default_z_is_the_papers():
    from scipy.stats import norm

    for n, f in [(20, 4), (50, 10), (7, 1)]:
        s = math.floor(n / 2 + 1) - f
        assert alie_z(n, f) == pytest.approx(norm.ppf((n - s) / n), rel=1e-9)


def test_gaussian_nan_inf_senders():
    X = torch.zeros(6, 20000)
    gen = torch.Generator().manual_seed(0)
    out = craft(get_attack("gaussian"), X, [0], None, gen, 1)
    assert out[0].std().item() == pytest.approx(100, rel=0.03) and torch.equal(out[1:], X[1:])
    assert torch.isnan(craft(get_attack("nan"), X, [2, 3], None, gen, 2)[[2, 3]]).all()
    inf = craft(get_attack("inf"), X, [5], None, gen, 1)[5]
    assert torch.isinf(inf).all() and (inf[::2] > 0).all() and (inf[1::2] < 0).all()


def test_every_attack_has_a_documented_default():
    import tapestry.federated.attacks as mod

    for a in ATTACKS.values():
        assert a.name in mod.__doc__
        if a.param:
            assert a.param in mod.__doc__


# -- refusals before training --------------------------------------------------------------------

@pytest.mark.parametrize("field,value,valid", [
    ("rule", "fedfoo", "trimmed_mean"), ("task", "mnist", "digits"), ("attack", "evil", "signflip"),
])
def test_unknown_names_list_the_valid_ones(field, value, valid):
    with pytest.raises(ValueError, match=f"unknown {field} '{value}'; valid: .*{valid}"):
        validate(Config(**{field: value}))


def test_unknown_codec_lists_the_valid_ones():
    from tapestry.compression import CODECS

    with pytest.raises(ValueError, match="unknown codec 'zip'; valid: " + ", ".join(CODECS)):
        validate(Config(codec="zip"))


@pytest.mark.parametrize("rule,byz,needs", [
    ("krum", 0.45, r"krum needs n >= 2f\+3, got n=20, f=9"),
    ("bulyan", 0.25, r"bulyan needs n >= 4f\+3, got n=20, f=5"),
    ("trimmed_mean", 0.5, r"trimmed_mean needs 2f < n, got n=20, f=10"),
])
def test_intolerable_byzantine_fraction_is_refused_with_the_inequality(rule, byz, needs):
    with pytest.raises(ValueError, match=needs):
        validate(Config(rule=rule, attack="signflip", byzantine=byz))


def test_dropouts_count_against_the_rule():
    validate(Config(rule="bulyan", attack="signflip", byzantine=0.2))  # n=20, f=4
    with pytest.raises(ValueError, match=r"bulyan needs n >= 4f\+3, got n=16, f=4"):
        validate(Config(rule="bulyan", attack="signflip", byzantine=0.2, dropout=0.2))


def test_secure_needs_mean_and_labelflip_needs_classes():
    with pytest.raises(ValueError, match="secure.*'mean'"):
        validate(Config(rule="median", secure=True))
    with pytest.raises(ValueError, match="classification"):
        validate(Config(task="charlm", attack="labelflip", byzantine=0.2))


def test_cli_refuses_before_training(tmp_path, monkeypatch, capsys):
    import tapestry.federated.loop as loop

    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(loop, "local_train", no_training)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["simulate", "--out", str(blocker / "sub"), "--quiet"]) == 2
    assert "--out" in capsys.readouterr().err
    # the second rule is the bad one: refused before the first rule trains
    assert main(["simulate", "--compare", "mean,krum", "--attack", "gaussian", "--byzantine", "0.45", "--quiet"]) == 2
    assert "krum needs n >= 2f+3, got n=20, f=9" in capsys.readouterr().err


# -- the loop ------------------------------------------------------------------------------------

def test_deterministic_under_a_seed(digits):
    cfg = Config(rule="trimmed_mean", attack="gaussian", byzantine=0.2, rounds=3, sample=0.6)
    a, b = simulate(cfg, task=digits), simulate(cfg, task=digits)
    assert a.accuracy == b.accuracy and a.loss == b.loss
    other = load_task("digits", 20, 100.0, 1)
    c = simulate(Config(rule="trimmed_mean", attack="gaussian", byzantine=0.2, rounds=3, sample=0.6, seed=1), task=other)
    assert c.loss != a.loss
    assert not torch.are_deterministic_algorithms_enabled()  # the global setting is restored


@pytest.mark.parametrize("rule", ["mean", "trimmed_mean", "median", "krum", "multi_krum", "bulyan",
                                  "geometric_median", "centered_clipping", "nnm+median"])
def test_every_rule_runs_in_the_loop(rule, digits):
    run = simulate(Config(rule=rule, attack="signflip", byzantine=0.1, rounds=2), task=digits)
    assert run.config["f"] == 2 and run.nonfinite_rounds == 0 and run.accuracy[-1] > 0.5, run.accuracy
    assert simulate(Config(rule=rule, attack="signflip", byzantine=0.1, rounds=1, f=1), task=digits).config["f"] == 1


def test_sampling_and_dropout(digits):
    cfg = Config(rule="krum", attack="signflip", byzantine=0.2, rounds=2, sample=0.5, dropout=0.2)
    assert (cfg.per_round, cfg.answering, cfg.rule_f) == (10, 8, 2)
    run = simulate(cfg, task=digits)
    assert len(run.accuracy) == 2 and all(0 <= a <= 1 for a in run.accuracy)


def test_robust_rules_survive_attacks_fedavg_does_not(digits):
    """The README claim on a reduced setting: 20 clients, 20% Byzantine, 12 rounds."""
    base = simulate(Config(rule="mean", **SMALL), task=digits).final_accuracy
    assert base >= 0.90
    for attack in ["signflip", "gaussian", "nan"]:
        fedavg = simulate(Config(rule="mean", attack=attack, byzantine=0.2, **SMALL), task=digits)
        assert fedavg.final_accuracy < 0.5, (attack, fedavg.final_accuracy)
        for rule in ["trimmed_mean", "median", "krum", "bulyan"]:
            acc = simulate(Config(rule=rule, attack=attack, byzantine=0.2, **SMALL), task=digits).final_accuracy
            assert acc >= base - 0.05, (rule, attack, acc, base)


def test_nan_senders_make_fedavg_nonfinite(digits):
    run = simulate(Config(rule="mean", attack="nan", byzantine=0.1, rounds=1), task=digits)
    assert run.nonfinite_rounds == 1 and math.isnan(run.loss[0])
    assert run.to_json()["final_loss"] is None  # strict JSON: NaN becomes null
    json.dumps(run.to_json(), allow_nan=False)


def test_int8_with_error_feedback_tracks_dense(digits):
    dense = simulate(Config(rule="mean", **SMALL), task=digits)
    int8 = simulate(Config(rule="mean", codec="int8", **SMALL), task=digits)
    assert abs(int8.final_accuracy - dense.final_accuracy) <= 0.01
    # the robust path through fused decode + aggregate, with forged NaN payloads in the mix
    tm = simulate(Config(rule="trimmed_mean", codec="int8", attack="nan", byzantine=0.2, **SMALL), task=digits)
    assert tm.final_accuracy >= dense.final_accuracy - 0.05
    # FedAvg: the NaN aggregate spreads to every client's model, the run goes on without a crash
    broken = simulate(Config(rule="mean", codec="int8", attack="nan", byzantine=0.2, rounds=2), task=digits)
    assert broken.nonfinite_rounds == 2


def test_secure_sum_matches_fedavg(digits):
    from tapestry import secure
    if not hasattr(secure, "secure_sum"):
        pytest.fail("tapestry.secure exists but has no secure_sum")
    cfg = dict(rule="mean", rounds=3)
    plain = simulate(Config(**cfg), task=digits)
    masked = simulate(Config(secure=True, **cfg), task=digits)
    assert abs(masked.final_accuracy - plain.final_accuracy) <= 0.005
    # dropouts after masking are recovered by the protocol: the mean of the survivors
    simulate(Config(secure=True, dropout=0.1, rounds=1, rule="mean"), task=digits)
    with pytest.raises(ValueError, match="at least 11 of 20 clients"):
        validate(Config(secure=True, dropout=0.5))


def test_charlm_learns():
    task = load_task("charlm", 4, 1.0, 0)
    run = simulate(Config(task="charlm", clients=4, rounds=4, local_steps=4, batch_size=8, lr=0.5,
                          lr_decay="none", rule="median"), task=task)
    assert run.metric == "loss"
    assert run.loss[-1] < math.log(128) - 1.0  # well below a uniform guess over 128 characters


def test_cli_writes_results_and_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["simulate", "--compare", "mean,median", "--attack", "signflip", "--rounds", "2", "--clients", "8",
               "--out", str(out)])
    assert rc == 0
    record = json.loads((out / "results.json").read_text())
    assert [(r["rule"], r["attack"]) for r in record["runs"]] == [("mean", "signflip"), ("median", "signflip")]
    for r in record["runs"]:
        assert len(r["accuracy"]) == 2 and r["final_accuracy"] == r["accuracy"][-1]
        assert r["config"]["f"] == 2 and r["config"]["n_byzantine"] == 2
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "| signflip |" in printed and "round" in printed


def test_preaggregator_chains_build_the_library_wrappers():
    """`--compare arc+nnm+krum` and the like: the loop wraps the rule as make_rule's chains do,
    with the run's f (NNM, ARC) and Bucketing's s = 2 seeded by the run; clipping (which needs its
    threshold) and unknown wrappers are refused with the valid ones named."""
    import tapestry as tp
    from tapestry.federated.loop import build_rule

    rule = build_rule(Config(rule="arc+nnm+krum", attack="signflip", byzantine=0.2, clients=20))
    assert isinstance(rule, tp.ARC) and isinstance(rule.rule, tp.NNM) and isinstance(rule.rule.rule, tp.Krum)
    assert rule.f == rule.rule.f == rule.rule.rule.f == 4
    bucket = build_rule(Config(rule="bucketing+median", seed=5))
    assert isinstance(bucket, tp.Bucketing) and bucket.s == 2 and isinstance(bucket.rule, tp.Median)
    X = torch.randn(20, 30)
    assert torch.equal(bucket(X), tp.Bucketing(2, tp.Median(), seed=5)(X))  # the same seeded draw
    for name in ("clipping+median", "foo+median", "nnm+bogus"):
        with pytest.raises(ValueError, match=r"with <pre> one of nnm, arc, bucketing"):
            validate(Config(rule=name))
