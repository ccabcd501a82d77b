"""The robust-aggregation cases of ``tapestry bench`` as a pytest-benchmark suite.

    pytest bench/bench_robust.py                       # n = 32, d = 4,194,304, f = 8
    pytest bench/bench_robust.py --bench-d 1048576 --benchmark-json out.json

The cases are :func:`tapestry.bench.robust.cases` (the same objects ``tapestry bench`` times). Each case
is timed by pytest-benchmark; ``extra_info`` adds its GB/s, its ratio to its baseline (the median
of per-round ratios, the two timed back to back each round, as ``tapestry bench`` does), and the
peak memory it adds beyond its result (MiB and % of the bytes it reads).
"""

from __future__ import annotations

import pytest

from tapestry.bench import harness as bench
from tapestry.bench.robust import cases

_cache: dict = {}


def _cases(cfg) -> dict:
    key = (cfg.n, cfg.d, cfg.f, cfg.seed)
    if key not in _cache:
        _cache.clear()  # one size at a time: the inputs are large
        _cache[key] = {bench.case_key(c): c for c in cases(cfg)}
    return _cache[key]


# ids depend only on the backends found, not on sizes: build them on a tiny config
CASE_IDS = [bench.case_key(c) for c in cases(bench.Config(n=5, d=16, f=1))]


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_robust(benchmark, bench_config, case_id):
    cases = _cases(bench_config)
    case = cases[case_id]
    benchmark.pedantic(case.run, rounds=bench_config.repeat, warmup_rounds=1)
    median_s = benchmark.stats.stats.median
    benchmark.extra_info["gbps"] = case.bytes_read / median_s / 1e9
    base = bench.find_baseline(case, list(cases.values()))
    if base is not None:
        benchmark.extra_info["baseline"] = case.baseline
        benchmark.extra_info["ratio"] = bench.paired_ratio(case.run, base.run, bench_config.repeat)
    extra = bench.measure_extra(case.run)
    if extra is not None:
        benchmark.extra_info["extra_mib"] = extra
        benchmark.extra_info["extra_pct"] = 100 * extra * 2**20 / case.bytes_read
