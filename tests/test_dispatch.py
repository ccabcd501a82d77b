"""Dispatch (tapestry.ops): forcing, nesting, the environment variable, input-dependent
rejections with their reasons, and the op x backend table of ``tapestry info``."""

from __future__ import annotations

import logging

import pytest
import torch

import tapestry as tp
from tapestry import info, ops, reference
from tapestry.backends import cpu, cuda


def _backend_used(X=None) -> str:
    X = torch.randn(6, 5) if X is None else X
    return tp.trimmed_mean(X, f=1, return_info=True)[1].backend


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("TAPESTRY_BACKEND", "reference")
    assert _backend_used() == "reference"
    monkeypatch.setenv("TAPESTRY_BACKEND", "cpu")
    assert _backend_used() == "cpu"
    monkeypatch.setenv("TAPESTRY_BACKEND", "gpu")
    with pytest.raises(ValueError, match=r"unknown backend 'gpu'; valid: auto, cuda, triton, cpu, reference"):
        _backend_used()


def test_with_block_overrides_the_environment_and_nests(monkeypatch):
    monkeypatch.setenv("TAPESTRY_BACKEND", "cpu")
    with tp.backend("reference"):
        assert _backend_used() == "reference"
        with tp.backend("cpu"):
            assert _backend_used() == "cpu"
            with tp.backend("auto"):
                assert _backend_used() == "cpu"
        assert _backend_used() == "reference"  # the inner block restored the outer choice
    assert _backend_used() == "cpu"


def test_an_exception_inside_a_block_restores_the_outer_choice():
    with tp.backend("reference"):
        with pytest.raises(RuntimeError, match="boom"), tp.backend("cpu"):
            raise RuntimeError("boom")
        assert _backend_used() == "reference"


def test_float64_skips_the_cpu_kernels_with_the_reason(caplog):
    X = torch.randn(7, 300, dtype=torch.float64)
    with caplog.at_level(logging.DEBUG, logger="tapestry.ops"):
        got = ops.call("trimmed_mean", X, 2)
    assert got.dtype == torch.float64 and torch.equal(got, reference.trimmed_mean(X, 2))
    assert "skipping cpu (no kernel for torch.float64 updates" in caplog.text
    with tp.backend("cpu"), pytest.raises(ops.BackendError,
                                          match=r"backend 'cpu' cannot run trimmed_mean on cpu: no kernel for torch.float64"):
        ops.call("trimmed_mean", X, 2)


def test_no_backend_error_lists_every_candidate_with_its_reason(monkeypatch):
    monkeypatch.setattr(reference, "rejects", lambda op, device, args=(): "switched off for this test")
    with pytest.raises(ops.BackendError) as err:
        ops.resolve("trimmed_mean", "cpu", (torch.randn(5, 3, dtype=torch.float64), 1))
    text = str(err.value)
    assert text.startswith("no backend can run trimmed_mean on cpu:")
    for line in ("  cuda: ", "  triton: not chosen automatically for CPU tensors",
                 "  cpu: no kernel for torch.float64 updates", "  reference: switched off for this test"):
        assert line in text, (line, text)


def test_cuda_names_its_limits_without_a_gpu():
    limit = cuda._native.require("_cuda").MAX_SELECT_ROWS
    big = torch.empty(limit + 1, 3, device="meta")
    assert cuda.rejects("trimmed_mean", torch.device("cuda", 0), (big, 1)) == \
        f"{limit + 1} rows, above the selection kernels' limit of {limit}"
    assert cuda.rejects("trimmed_mean", torch.device("cuda", 0), (big[:limit], 1)) is None
    rows = torch.arange(limit + 1)
    assert "above the selection kernels' limit" in cuda.rejects("mean_around_median", torch.device("cuda", 0),
                                                                (big, rows, 3))
    assert "no kernel for torch.float64" in cuda.rejects("gram", torch.device("cuda", 0),
                                                         (torch.empty(3, 3, dtype=torch.float64, device="meta"),))
    assert cpu.rejects("gram", torch.device("cpu"), (torch.empty(3, 3, dtype=torch.int32),)) is not None


def test_info_table_has_every_op_and_backend():
    table = info.op_table()
    assert list(table) == list(ops.OPS)
    for op, row in table.items():
        assert list(row) == list(ops.BACKENDS)
        assert row["reference"] == "yes" and row["cpu"] == "yes", (op, row)
        if not torch.cuda.is_available():
            assert row["cuda"].startswith("no CUDA GPU") or "not built" in row["cuda"] or "failed" in row["cuda"], row


def test_info_prints_the_table(capsys):
    assert info.run(type("Args", (), {"json": False})()) == 0
    out = capsys.readouterr().out
    assert "ops (yes, or the footnote saying why not):" in out
    for op in ops.OPS:
        assert op in out
