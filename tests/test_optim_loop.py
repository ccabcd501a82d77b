"""The server optimizer inside ``tapestry simulate``: the default keeps the former results bit for
bit, other optimizers change the run, and bad settings are refused before training."""

from __future__ import annotations

import pytest
import torch

from tapestry.cli import main
from tapestry.federated import Config, load_task, simulate, validate


@pytest.fixture(scope="module")
def digits():
    return load_task("digits", 10, 100.0, 0)


class _PlainAddition:
    """The loop's former update, ``w = w + agg``, written into ``w`` (which the loop keeps)."""

    def __init__(self, w):
        self.w = w

    def step(self, agg, *, allow_nonfinite=False):
        self.w.copy_(self.w + agg)


@pytest.mark.parametrize("attack", ["gaussian", "nan"])
def test_default_server_optimizer_reproduces_plain_addition_bit_for_bit(attack, digits, monkeypatch):
    import tapestry.federated.loop as loop

    cfg = Config(rule="mean", attack=attack, byzantine=0.1, clients=10, rounds=3, sample=0.6, local_steps=3)
    ours = simulate(cfg, task=digits)
    monkeypatch.setattr(loop, "server_optimizer", lambda name, w, **h: _PlainAddition(w))
    before = simulate(cfg, task=digits)
    assert ours.accuracy == before.accuracy
    assert [str(x) for x in ours.loss] == [str(x) for x in before.loss]  # NaN == NaN as text
    assert ours.nonfinite_rounds == before.nonfinite_rounds
    assert (ours.nonfinite_rounds > 0) == (attack == "nan")


def test_server_optimizers_change_the_run_and_still_learn(digits):
    base = dict(rule="trimmed_mean", attack="signflip", byzantine=0.1, clients=10, rounds=4, local_steps=3)
    fedavg = simulate(Config(**base), task=digits)
    runs = {name: simulate(Config(server_opt=name, **hp, **base), task=digits) for name, hp in [
        ("fedavgm", {"server_momentum": 0.5}), ("nesterov", {"server_lr": 0.7}),
        ("fedadam", {"server_lr": 0.01}), ("fedyogi", {}), ("fedadagrad", {"server_lr": 0.01})]}
    for name, run in runs.items():
        assert run.loss != fedavg.loss, name
        assert run.final_accuracy > 0.5, (name, run.accuracy)
        assert run.config["server_opt"] == name
    # lr 1 momentum 0 fedavgm is plain FedAvg's update (torch's SGD without momentum, bit for bit)
    same = simulate(Config(server_opt="fedavgm", server_momentum=0.0, **base), task=digits)
    assert same.loss == fedavg.loss


@pytest.mark.parametrize("settings,message", [
    ({"server_opt": "adam"}, "unknown server optimizer 'adam'; valid: fedavg"),
    ({"server_momentum": 0.9}, "fedavg takes no hyperparameter 'momentum'"),
    ({"server_opt": "fedadam", "server_lr": -1.0}, "lr must be > 0, got -1.0"),
    ({"server_opt": "fedyogi", "server_beta2": 1.0}, "0 <= beta2 < 1, got 1.0"),
    ({"server_opt": "fedadagrad", "server_tau": 0.0}, "tau must be > 0, got 0.0"),
])
def test_validate_refuses_bad_server_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        validate(Config(**settings))


def test_cli_server_flags(monkeypatch, capsys, tmp_path):
    import tapestry.federated.loop as loop

    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(loop, "local_train", no_training)
    assert main(["simulate", "--server-opt", "fedavg", "--server-momentum", "0.9", "--quiet"]) == 2
    assert "fedavg takes no hyperparameter 'momentum'" in capsys.readouterr().err
    monkeypatch.undo()
    out = tmp_path / "run"
    assert main(["simulate", "--clients", "6", "--rounds", "1", "--local-steps", "1", "--server-opt", "nesterov",
                 "--server-lr", "0.5", "--server-momentum", "0.8", "--quiet", "--out", str(out)]) == 0
    import json

    cfg = json.loads((out / "results.json").read_text())["runs"][0]["config"]
    assert (cfg["server_opt"], cfg["server_lr"], cfg["server_momentum"]) == ("nesterov", 0.5, 0.8)
    assert not torch.are_deterministic_algorithms_enabled()
