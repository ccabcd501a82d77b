"""The robustness benchmark: ``tapestry simulate --compare all --attack all --alpha 1,100``."""

from __future__ import annotations

import json

import pytest

from tapestry.aggregators import RULES
from tapestry.cli import build_parser, main
from tapestry.federated import ATTACKS
from tapestry.federated.cli import _configs
from tapestry.federated.grid import BENCHMARK_ROUNDS, NOT_IN_LOOP, PRE_TARGETS, SLOW, all_attacks, all_rules, names
from tapestry.federated.loop import LOOP_PREAGGREGATORS
from tapestry.federated.report import fmt


def _args(*argv):
    return build_parser().parse_args(["simulate", *argv])


@pytest.fixture
def no_training(monkeypatch):
    import tapestry.federated.loop as loop

    def refuse(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(loop, "local_train", refuse)


def test_all_names_every_attack_and_every_runnable_rule():
    assert all_attacks()[0] == "none" and sorted(all_attacks()) == sorted(ATTACKS)
    rules = all_rules()
    assert len(rules) == len(set(rules))
    assert {r for r in RULES if r not in NOT_IN_LOOP} <= set(rules)
    assert "fltrust" in NOT_IN_LOOP and not any(r.split("+")[-1] in NOT_IN_LOOP for r in rules)
    assert {f"{p}+{r}" for p in LOOP_PREAGGREGATORS for r in PRE_TARGETS} <= set(rules)
    assert not any(r.startswith("clipping+") for r in rules)  # needs its threshold c
    assert len(rules) == len(RULES) - len(NOT_IN_LOOP) + len(LOOP_PREAGGREGATORS) * len(PRE_TARGETS)


def test_help_says_what_all_leaves_out(capsys):
    assert main(["simulate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "not run by the loop: fltrust (needs the server's own update" in text
    assert "the pre-aggregator clipping (it needs its threshold c)" in text
    assert "arc+geometric_median" in text


def test_names_refuse_empty_and_mixed_all():
    assert names("mean, krum", "--compare", ["x"]) == (["mean", "krum"], False)
    assert names("all", "--compare", ["x", "y"]) == (["x", "y"], True)
    with pytest.raises(ValueError, match="--compare all stands alone, got 'all,mean'"):
        names("all,mean", "--compare", ["x"])
    with pytest.raises(ValueError, match="--attack: nothing given"):
        names(" , ", "--attack", ["x"])


def test_the_grid_runs_every_rule_attack_and_alpha_and_notes_what_it_skips():
    configs, notes = _configs(_args("--compare", "all", "--attack", "all", "--alpha", "1,100"))
    runnable = [r for r in all_rules() if r != "bucketing+krum"]  # 10 buckets, Krum needs 2f+3 = 11
    assert [c.rule for c in configs[:len(runnable)]] == runnable
    assert {(c.rule, c.attack, c.alpha) for c in configs} == {
        (r, a, alpha) for r in runnable for a in ATTACKS for alpha in (1.0, 100.0) if (r, a) not in SLOW}
    assert len(configs) == (len(runnable) * len(ATTACKS) - len(SLOW)) * 2
    assert {c.rounds for c in configs} == {BENCHMARK_ROUNDS}
    assert {(c.byzantine, c.rule_f) for c in configs} == {(0.2, 4)}  # the clean row at the same f
    assert len(notes) == 2 and notes[0].startswith("skipped bucketing+krum under every attack: ")
    assert "krum needs n >= 2f+3, got n=10, f=4" in notes[0]
    assert notes[1].startswith("skipped smea under optimal_alie, optimal_ipm: left out for time")
    # named explicitly, a slow pair runs and a rule its sizes refuse is an error, not a note
    configs, notes = _configs(_args("--compare", "smea", "--attack", "optimal_alie,optimal_ipm"))
    assert [(c.rule, c.attack) for c in configs] == [("smea", "optimal_alie"), ("smea", "optimal_ipm")] and not notes
    with pytest.raises(ValueError, match="krum needs n >= 2f[+]3"):
        _configs(_args("--compare", "bucketing+krum", "--attack", "all"))
    # an explicit list keeps its defaults: 30 rounds, a Byzantine-free clean row
    configs, notes = _configs(_args("--compare", "mean", "--attack", "none,signflip"))
    assert [(c.rounds, c.byzantine, c.alpha) for c in configs] == [(30, 0.0, 100.0), (30, 0.2, 100.0)] and not notes


def test_unknown_names_and_bad_alphas_are_refused_before_training(no_training, capsys):
    for argv, message in [
        (["--compare", "all", "--attack", "bogus"], "unknown attack 'bogus'"),
        (["--compare", "mean,bogus", "--attack", "all"], "unknown rule 'bogus'"),
        (["--compare", "all,krum"], "--compare all stands alone"),
        (["--alpha", "1,x"], "not a number: 'x'"),
        (["--alpha", "1,0"], "0 is out of range"),
        (["--alpha", "1,100,1.0"], "1.0 is given twice in '1,100,1.0'"),
        (["--task", "charlm", "--alpha", "1,100"], "--alpha with several values needs --task digits"),
    ]:
        assert main(["simulate", "--quiet", *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_alpha_list_runs_each_level_and_writes_a_heatmap(tmp_path, capsys):
    import matplotlib.image

    out = tmp_path / "grid"
    rc = main(["simulate", "--compare", "mean,median", "--attack", "none,signflip", "--alpha", "1,100",
               "--rounds", "2", "--clients", "8", "--quiet", "--out", str(out)])
    assert rc == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [(r["config"]["alpha"], r["attack"], r["rule"]) for r in runs] == [
        (alpha, attack, rule) for alpha in (1.0, 100.0) for attack in ("none", "signflip") for rule in ("mean", "median")]
    by = {(r["config"]["alpha"], r["attack"], r["rule"]): r for r in runs}
    assert by[1.0, "none", "mean"]["loss"] != by[100.0, "none", "mean"]["loss"]  # a different split, not a rerun
    image = matplotlib.image.imread(out / "heatmap.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 200 and image.std() > 0
    md = (out / "results.md").read_text()
    tables = md.split("**Dirichlet alpha = ")
    assert len(tables) == 3 and tables[1].startswith("1**") and tables[2].startswith("100**")
    for alpha, table in zip((1.0, 100.0), tables[1:]):
        row = next(line for line in table.splitlines() if line.startswith("| signflip |"))
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        assert cells == [fmt("accuracy", by[alpha, "signflip", rule]["final_accuracy"]) for rule in ("mean", "median")]
    assert "heatmap.png" in capsys.readouterr().err


def test_no_heatmap_for_a_single_rule(tmp_path):
    out = tmp_path / "one"
    assert main(["simulate", "--rule", "median", "--attack", "none,signflip", "--rounds", "1", "--clients", "8",
                 "--quiet", "--out", str(out)]) == 0
    assert (out / "accuracy.png").exists() and not (out / "heatmap.png").exists()
    md = (out / "results.md").read_text()
    assert "Dirichlet alpha = " not in md and md.count("| attack \\ rule") == 1  # one alpha: one table, as before
