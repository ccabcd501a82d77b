"""`tapestry aggregate`: files in, one aggregate file out; errors exit 2 with nothing written; peak
resident memory stays within --memory-budget (measured in a child process)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import tapestry as tp
from tapestry.cli import main


def _clients(tmp_path, n=7, d=5000, seed=0, fmt="safetensors"):
    g = torch.Generator().manual_seed(seed)
    paths, sds = [], []
    for i in range(n):
        sd = {"w": torch.randn(d // 10, 10, generator=g), "b": torch.randn(d % 10 + 3, generator=g).half()}
        if i == n - 1:
            sd["w"] *= 50  # an outlier
        p = tmp_path / f"c{i}.{fmt}"
        (save_file(sd, str(p)) if fmt == "safetensors" else torch.save(sd, str(p)))
        paths.append(str(p))
        sds.append(sd)
    return paths, sds


def test_trimmed_mean_cli_writes_the_in_memory_result(tmp_path, capsys):
    paths, sds = _clients(tmp_path)
    out = tmp_path / "global.safetensors"
    assert main(["aggregate", "--rule", "trimmed_mean", "--f", "2", *paths, "-o", str(out), "--memory-budget", "2M"]) == 0
    got, want = load_file(str(out)), tp.trimmed_mean(sds, f=2)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    assert "trimmed_mean: 7 clients x" in capsys.readouterr().out


def test_nnm_rule_names(tmp_path):
    paths, sds = _clients(tmp_path, n=6, d=300)
    for name, rule in {"nnm+median": tp.NNM(1, tp.Median()), "nnm+trimmed_mean": tp.NNM(1, tp.TrimmedMean(f=1))}.items():
        out = tmp_path / f"{name}.safetensors"
        assert main(["aggregate", "--rule", name, "--f", "1", *paths, "-o", str(out), "--no-progress"]) == 0
        got, want = load_file(str(out)), rule(sds)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)


def test_pt_inputs_and_weights(tmp_path):
    paths, sds = _clients(tmp_path, n=4, fmt="pt")
    out = tmp_path / "g.safetensors"
    want = tp.mean(sds, weights=[1, 2, 3, 4])
    assert main(["aggregate", "--rule", "mean", "--weights", "1,2,3,4", *paths, "-o", str(out), "--no-progress"]) == 0
    got = load_file(str(out))
    assert all(torch.equal(got[k], want[k]) for k in want)
    import pickle

    from tapestry.distributed.cli import _WeightedMean

    rule = pickle.loads(pickle.dumps(_WeightedMean(torch.tensor([0.5, 0.5], dtype=torch.float64))))  # spawned ranks
    assert rule.name == "mean" and rule.w.tolist() == [0.5, 0.5]


def test_krum_with_two_processes_equals_one(tmp_path, capsys):
    paths, sds = _clients(tmp_path, n=7, d=20011)
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    assert main(["aggregate", "--rule", "krum", "--f", "2", *paths, "-o", str(one), "--memory-budget", "2M"]) == 0
    assert main(["aggregate", "--rule", "krum", "--f", "2", *paths, "-o", str(two), "--memory-budget", "2M",
                 "--nproc", "2"]) == 0
    printed = capsys.readouterr().out
    _, info = tp.krum(sds, f=2, return_info=True)
    assert printed.count(f"selected: {info.selected[0]} ({paths[info.selected[0]]})") == 2
    assert one.read_bytes() == two.read_bytes()


@pytest.mark.parametrize("argv, message", [
    (["--rule", "krum"], "rule 'krum' needs --f"),
    (["--rule", "trimmed_mean", "--f", "1", "--m", "2"], "rule 'trimmed_mean' does not take --f, --m"),
    (["--rule", "bogus"], "unknown rule 'bogus'"),
    (["--rule", "median", "--memory-budget", "1K"], "--memory-budget 1.0 KiB is too small"),
    (["--rule", "median", "--nproc", "0"], "argument --nproc: 0 is out of range: must be an integer in [1, 1024]"),
    (["--rule", "median", "MISSING"], "missing.safetensors: no such file"),
    (["--rule", "median", "--weights", "1,2"], "--weights applies to --rule mean only"),
])
def test_cli_errors_exit_2_and_write_nothing(tmp_path, capsys, argv, message):
    paths, _ = _clients(tmp_path, n=3, d=100)
    argv = [a if a != "MISSING" else str(tmp_path / "missing.safetensors") for a in argv]
    out = tmp_path / "out"
    out.mkdir()
    assert main(["aggregate", *argv, *paths, "-o", str(out / "g.safetensors")]) == 2
    assert message in capsys.readouterr().err
    assert os.listdir(out) == []


def test_cli_refuses_to_overwrite_an_input(tmp_path, capsys):
    paths, _ = _clients(tmp_path, n=3, d=100)
    before = open(paths[0], "rb").read()
    assert main(["aggregate", "--rule", "median", *paths, "-o", paths[0]]) == 2
    assert "is also an input" in capsys.readouterr().err and open(paths[0], "rb").read() == before


_PEAK = """
import sys
from tapestry.cli import main
rc = main(sys.argv[1:])
print(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")))
sys.exit(rc)
"""


def _peak_kib(tmp_path, directory, rule, budget):
    out = tmp_path / f"{directory}.safetensors"
    files = sorted(str(p) for p in (tmp_path / directory).iterdir())
    run = subprocess.run([sys.executable, "-c", _PEAK, "aggregate", "--rule", *rule, *files, "-o", str(out),
                          "--memory-budget", str(budget), "--no-progress"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    return int(run.stdout.strip().splitlines()[-1]), out


@pytest.mark.parametrize("rule, budget", [(["trimmed_mean", "--f", "2"], 8 << 20), (["krum", "--f", "1"], 16 << 20)],
                         ids=["trimmed_mean", "krum"])
def test_out_of_core_peak_memory_within_budget(tmp_path, rule, budget):
    """8 clients x 2.2M float32 (67 MB of inputs) under an 8 MiB (krum, which keeps its float32
    result: 16 MiB) budget: the child's peak resident set exceeds the same command's on 64-value
    inputs (interpreter, torch: the fixed overhead) by at most the budget."""
    n, d = 8, 2_200_003
    g = torch.Generator().manual_seed(0)
    (tmp_path / "big").mkdir()
    (tmp_path / "tiny").mkdir()
    X = torch.randn(n, d, generator=g)
    for i in range(n):
        save_file({"w": X[i].clone()}, str(tmp_path / "big" / f"c{i}.safetensors"))
        save_file({"w": X[i, :64].clone()}, str(tmp_path / "tiny" / f"c{i}.safetensors"))
    assert n * d * 4 >= 4 * budget
    base, _ = _peak_kib(tmp_path, "tiny", rule, budget)
    peak, out = _peak_kib(tmp_path, "big", rule, budget)
    assert (peak - base) * 1024 <= budget, f"peak {peak} KiB, fixed overhead {base} KiB, budget {budget >> 10} KiB"
    want = tp.make_rule(rule[0], f=int(rule[2]))(X)
    assert torch.equal(load_file(str(out))["w"], want)
