"""Run Flower's own strategy tests with Tapestry's strategies substituted (not part of the suite:
it needs a Flower source checkout, which the project does not vendor).

    python tests/flower_upstream.py /path/to/flower/framework/py/flwr [pytest args...]

The test files are copied from the checkout into a temporary directory beside shim modules that
give each test's ``from .krum import Krum`` (etc.) a Tapestry strategy with the same parameters:
the message-API tests get ``TapestryStrategy``, the Strategy-API tests ``TapestryFedAvg``. Helpers
that are not strategies (Flower's ``aggregate``, ``weighted_loss_avg``, Bulyan's
``aggregate_n_closest_weights``, the mock-reply and client-proxy builders) stay Flower's own.
docs/flower.md lists the tests that fail and why (conventions, not defects).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MESSAGE_TESTS = ["fedmedian_test.py", "fedtrimmedavg_test.py", "multikrum_test.py", "bulyan_test.py"]
LEGACY_TESTS = ["fedavg_test.py", "fedmedian_test.py", "krum_test.py", "multikrum_test.py", "bulyan_test.py",
                "aggregate_test.py"]

MESSAGE_SHIMS = {
    "fedmedian.py": "FedMedian = _make('median')",
    "fedtrimmedavg.py": "FedTrimmedAvg = _make('trimmed_mean')",
    "krum.py": "Krum = _make('krum')",
    "multikrum.py": "MultiKrum = _make('multi_krum')",
    "bulyan.py": "from flwr.serverapp.strategy.bulyan import aggregate_n_closest_weights  # a helper: Flower's",
}
LEGACY_SHIMS = {
    "fedavg.py": "FedAvg = _make('mean')",
    "fedmedian.py": "FedMedian = _make('median')",
    "krum.py": "Krum = _make('krum')",
    "bulyan.py": "Bulyan = _make('bulyan', drop=('to_keep',))  # Flower's Multi-Krum selection size: no counterpart",
    "aggregate.py": "from flwr.server.strategy.aggregate import *  # noqa\n"
                    "from flwr.server.strategy.aggregate import _aggregate_n_closest_weights, _check_weights_equality, "
                    "_find_reference_weights  # helpers: Flower's",
}
HEADER = '''"""Shim: Flower's strategy name, a Tapestry strategy."""
from tapestry.integrations.flower import {cls} as _Cls


def _make(rule, drop=()):
    def make(**kwargs):
        for k in drop:
            kwargs.pop(k, None)
        return _Cls(rule, **kwargs)
    return make


'''


def _extract(source: str, names: set[str]) -> str:
    """The imports and the named top-level definitions of a module's source."""
    tree = ast.parse(source)
    keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
            or (isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name in names)]
    keep = [n for n in keep if not (isinstance(n, ast.ImportFrom) and n.level)]  # relative imports: not needed
    keep = [n for n in keep if not (isinstance(n, ast.ImportFrom) and n.module == "parameterized")]
    return ast.unparse(ast.Module(body=keep, type_ignores=[]))


def prepare(flwr_src: Path, out: Path) -> None:
    for pkg, sub, tests, shims, cls in [("message_api", "serverapp/strategy", MESSAGE_TESTS, MESSAGE_SHIMS, "TapestryStrategy"),
                                        ("strategy_api", "server/strategy", LEGACY_TESTS, LEGACY_SHIMS, "TapestryFedAvg")]:
        d = out / pkg
        d.mkdir(parents=True)
        (d / "__init__.py").write_text("")
        for name, body in shims.items():
            (d / name).write_text(HEADER.format(cls=cls) + body + "\n")
        for t in tests:
            shutil.copy(flwr_src / sub / t, d / t)
    utils = (flwr_src / "serverapp/strategy/strategy_utils_test.py").read_text()
    (out / "message_api" / "strategy_utils_test.py").write_text(
        _extract(utils, {"create_mock_reply"}).replace("def create_mock_reply", "def create_mock_reply", 1))
    proxy = (flwr_src / "server/client_manager_test.py").read_text()
    (out / "flwr_client_manager_test.py").write_text(_extract(proxy, {"TestClientProxy"}))
    (out / "conftest.py").write_text(
        "import sys\nimport flwr_client_manager_test\n"
        "sys.modules['flwr.server.client_manager_test'] = flwr_client_manager_test\n"
        "import flwr.common\nsys.modules.setdefault('flwr.common.parameter', flwr.common)  # newer checkouts' path\n"
        "import pytest\nfrom flwr.supercore.task_identity import TaskIdentity\n\n\n"
        "@pytest.fixture(autouse=True)\ndef _identity(monkeypatch):\n"
        "    for a in ('_run_id', '_node_id', '_task_id'):\n        monkeypatch.setattr(TaskIdentity, a, 1)\n")


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    flwr_src = Path(argv[0]).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        prepare(flwr_src, Path(tmp))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", tmp, tmp, *argv[1:]]
        return subprocess.run(cmd, cwd=tmp).returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
