"""``tapestry bench``: one benchmark package.

* :mod:`.harness`: ``Config``, ``Case``, ``Row``, the one timing implementation (paired rounds
  against a same-run baseline), peak-memory measurement, the runner;
* one module per family of cases (:mod:`.robust`, :mod:`.compression`, :mod:`.secure`,
  :mod:`.collective`, :mod:`.byzfl`, :mod:`.privacy`), each importing only the harness and the
  library;
* :mod:`.floors`: the bars rows are checked against, with what each means;
* :mod:`.flower`: call latency of TapestryStrategy against Flower's strategies on a small model
  under background load (``python -m tapestry.bench.flower``: percentiles, not throughput);
* :mod:`.cli`: the command (``tapestry bench``; ``--device cuda`` on a GPU machine).

The pytest-benchmark suites in the repository's ``bench/`` time the same cases.
"""

from .cli import HELP, configure, run
from .harness import (FAMILIES, Case, Config, Row, backends_for, measure_extra, one_thread, paired_ratio, paired_times,
                      run_bench, time_case, with_backend)

__all__ = ["HELP", "configure", "run", "FAMILIES", "Case", "Config", "Row", "backends_for", "measure_extra",
           "one_thread", "paired_ratio", "paired_times", "run_bench", "time_case", "with_backend"]
