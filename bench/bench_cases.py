"""The cases of ``tapestry bench`` as a pytest-benchmark suite: the robust, compression, secure and
privacy families, the same objects ``tapestry bench`` times.

    pytest bench/bench_cases.py                           # n = 32, d = 4,194,304, f = 8
    pytest bench/bench_cases.py -k robust --bench-d 1048576 --benchmark-json out.json

Each case is timed by pytest-benchmark; ``extra_info`` adds its GB/s, its ratio to its baseline
(the harness's paired rounds, as ``tapestry bench`` reports it) and the peak memory it adds beyond
its result. Two families run only under ``tapestry bench``: collective (it spawns its own ranks)
and byzfl (ByzFL's own subset-enumerating rules run once each there, not in benchmark rounds).
"""

from __future__ import annotations

import importlib

import pytest

from tapestry.bench import harness

FAMILIES = ("robust", "compression", "secure", "privacy")
_cache: dict = {}


def _cases(family: str, cfg) -> dict:
    key = (family, cfg.n, cfg.d, cfg.f, cfg.seed, cfg.quick)
    if key not in _cache:
        _cache.clear()  # one family and size at a time: the inputs are large
        module = importlib.import_module(f"tapestry.bench.{family}")
        _cache[key] = module.cases(cfg)
    return _cache[key]


# a family's cases come in the same order at every size (a few names carry the size): the ids are
# built on a tiny config, and a case is found again by its position
TINY = harness.Config(n=5, d=4096, f=1, quick=True)
CASE_IDS = [(fam, i, harness.case_key(c)) for fam in FAMILIES for i, c in enumerate(_cases(fam, TINY))]


@pytest.mark.parametrize("family,index,key", CASE_IDS, ids=[f"{f}:{k}" for f, _, k in CASE_IDS])
def test_case(benchmark, bench_config, family, index, key):
    cases = _cases(family, bench_config)
    case = cases[index]
    benchmark.pedantic(case.run, rounds=bench_config.repeat, warmup_rounds=1)
    median_s = benchmark.stats.stats.median
    benchmark.extra_info["gbps"] = case.bytes_read / median_s / 1e9
    base = harness.find_baseline(case, cases)
    if base is not None:
        benchmark.extra_info["baseline"] = case.baseline
        benchmark.extra_info["ratio"] = harness.paired_ratio(case.run, base.run, bench_config.repeat)
    extra = harness.measure_extra(case.run)
    if extra is not None:
        benchmark.extra_info["extra_mib"] = extra
        benchmark.extra_info["extra_pct"] = 100 * extra * 2**20 / max(case.bytes_read, 1)
