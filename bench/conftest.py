"""pytest-benchmark settings for the suites in bench/ (run a suite by its path, for example
``pytest bench/bench_robust.py``; add ``--benchmark-json FILE`` to keep the numbers).

Sizes come from the command line (``--bench-n``, ``--bench-d``, ``--bench-f``; default n = 32,
d = 4,194,304, f = 8, the setting the speed bars are stated for) so that a quick run can use a smaller ``d``.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("tapestry bench")
    group.addoption("--bench-n", type=int, default=32, help="clients (default 32)")
    group.addoption("--bench-d", type=int, default=4_194_304, help="parameters (default 4,194,304)")
    group.addoption("--bench-f", type=int, default=8, help="Byzantine clients tolerated (default 8)")
    group.addoption("--bench-repeat", type=int, default=7, help="timed rounds per case (default 7)")


@pytest.fixture(scope="session")
def bench_config(request):
    from tapestry.bench import Config

    opt = request.config.getoption
    return Config(n=opt("--bench-n"), d=opt("--bench-d"), f=opt("--bench-f"), repeat=opt("--bench-repeat"))
