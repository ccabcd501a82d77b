"""Every CLI number is validated with an `error:` line naming the flag and its range;
optional dependencies are checked before any work."""

import os
import subprocess
import sys

import pytest

from hostile import ROOT
from tapestry.cli import main

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "python"), ROOT]))


@pytest.mark.parametrize("argv,flag", [
    (["aggregate", "--rule", "mean", "--memory-budget", "1e999", "a", "-o", "b"], "--memory-budget"),
    (["aggregate", "--rule", "mean", "--memory-budget", "1e30", "a", "-o", "b"], "--memory-budget"),
    (["aggregate", "--rule", "mean", "--memory-budget=-5M", "a", "-o", "b"], "--memory-budget"),
    (["aggregate", "--rule", "mean", "--nproc", "100000", "a", "-o", "b"], "--nproc"),
    (["aggregate", "--rule", "trimmed_mean", "--beta", "nan", "a", "-o", "b"], "--beta"),
    (["aggregate", "--rule", "trimmed_mean", "--f", "-1", "a", "-o", "b"], "--f"),
    (["aggregate", "--rule", "centered_clipping", "--tau", "inf", "a", "-o", "b"], "--tau"),
    (["simulate", "--lr", "1e300"], "--lr"),
    (["simulate", "--lr", "nan"], "--lr"),
    (["simulate", "--clients", "1e9"], "--clients"),
    (["simulate", "--clients", "1000000000"], "--clients"),
    (["simulate", "--rounds", "0"], "--rounds"),
    (["simulate", "--batch-size", "10000000"], "--batch-size"),
    (["simulate", "--byzantine", "1"], "--byzantine"),
    (["simulate", "--sample", "0"], "--sample"),
    (["simulate", "--alpha", "-1"], "--alpha"),
    (["simulate", "--seed", "-3"], "--seed"),
    (["simulate", "--server-lr", "inf"], "--server-lr"),
    (["bench", "--n", "1e9"], "--n"),
    (["bench", "--d", "100000000000"], "--d"),
    (["bench", "--repeat", "0"], "--repeat"),
])
def test_out_of_range_numbers_are_error_lines(argv, flag, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: argument {flag}" in err and ("range" in err or "not" in err), err


def test_weights_must_be_finite(tmp_path, capsys):
    assert main(["aggregate", "--rule", "mean", "--weights", "1,inf", "a", "b", "-o", str(tmp_path / "g")]) == 2
    assert "--weights: weight 1 (b)" in capsys.readouterr().err


def test_missing_matplotlib_is_reported_before_training(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from tapestry import federated\n"
            "from tapestry.federated import loop\n"
            "loop.simulate = lambda *a, **k: sys.exit('trained before checking matplotlib')\n"
            "from tapestry.cli import main\n"
            f"sys.exit(main(['simulate', '--rounds', '1', '--quiet', '--out', {str(tmp_path / 'o')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 2, proc.stderr[-1000:]
    assert "needs matplotlib" in proc.stderr and "pip install" in proc.stderr
