"""What ``tapestry simulate --compare all --attack all`` runs: the robustness benchmark's grid.

``--compare all`` is every rule of :data:`tapestry.aggregators.RULES` the simulated loop can build
from a run's settings (all but those in :data:`NOT_IN_LOOP`), then NNM, Bucketing and ARC (the
loop's pre-aggregators) each in front of :data:`PRE_TARGETS`. ``--attack all`` is every attack of
:data:`.attacks.ATTACKS`, ``none`` first as the clean baseline row. A rule the run's sizes cannot
satisfy (``bucketing+krum`` at 20 clients and f = 4: buckets of 2 leave 10 inputs, Krum needs
2f + 3 = 11) is skipped with a note rather than ending the benchmark, and so are the :data:`SLOW`
pairs.

The grid is kept to 26 rules (25 run at 20 clients) x 14 attacks: at two alphas and :data:`BENCHMARK_ROUNDS`
rounds, 696 runs took 27 minutes on a shared 2-core VM (README, "Every rule against every attack");
CAF under Gaussian noise and SMEA were 40% of it.
"""

from __future__ import annotations

from ..aggregators import RULES
from .attacks import ATTACKS
from .loop import LOOP_PREAGGREGATORS

# Registered rules the simulated loop cannot run, and why (shown in --help).
NOT_IN_LOOP = {
    "fltrust": "needs the server's own update on a clean root dataset every round, which the loop does not train",
}

# The rules the pre-aggregators' papers show them with (coordinate-wise trimmed mean and median,
# Krum, the geometric median); one set for all three, so their rows compare like for like.
PRE_TARGETS = ("trimmed_mean", "median", "krum", "geometric_median")

# (rule, attack) pairs a grid built by ``all`` leaves out for time (named explicitly, they run).
SLOW = {("smea", "optimal_alie"), ("smea", "optimal_ipm")}
SLOW_WHY = ("the optimal attacks evaluate the rule tens of times a round to tune themselves, and one SMEA "
            "evaluation goes over all C(n, f) subsets: 45-65 s a round on one core")

# --rounds default under --compare all (30 otherwise): 2.3 s per run on average in that benchmark.
BENCHMARK_ROUNDS = 10


def all_rules() -> list[str]:
    base = [name for name in RULES if name not in NOT_IN_LOOP]
    return base + [f"{pre}+{rule}" for pre in LOOP_PREAGGREGATORS for rule in PRE_TARGETS]


def all_attacks() -> list[str]:
    return ["none"] + [name for name in ATTACKS if name != "none"]


def names(text: str, flag: str, everything: list[str]) -> tuple[list[str], bool]:
    """The comma-separated names of ``flag`` (``all``: ``everything``), and whether ``all`` was given."""
    given = [x.strip() for x in text.split(",") if x.strip()]
    if not given:
        raise ValueError(f"{flag}: nothing given in {text!r}")
    if "all" in given:
        if len(given) > 1:
            raise ValueError(f"{flag} all stands alone, got {text!r}")
        return list(everything), True
    return given, False
