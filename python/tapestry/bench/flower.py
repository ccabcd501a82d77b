"""Small models on a busy machine: ``aggregate_train`` of 10 replies of a 4,810-parameter model
(digits MLP 64-64-10) by TapestryStrategy beside Flower's own FedAvg and FedMedian, in the same
run, while a background process this benchmark starts keeps one core busy.

    python -m tapestry.bench.flower [--calls 400] [--no-load] [--json FILE]

Calls of the strategies are interleaved (one of each per turn, each on fresh reply messages built
outside the timed region), so a load that comes and goes slows them alike. Reported per strategy:
the median and the slowest tenth (90th percentile) of the call times, and their ratios to Flower's
``FedAvg`` (for ``mean``) or ``FedMedian`` (for the robust rules). The bar: switching a small
model's strategy to Tapestry costs at most 1.5x Flower's own strategy, in the median and in the
slowest tenth; the exit status is 1 when a row misses it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
import uuid

import numpy as np

SHAPES = {"fc1.weight": (64, 64), "fc1.bias": (64,), "fc2.weight": (10, 64), "fc2.bias": (10,)}  # 4,810 values
BAR = 1.5


def _burn(stop) -> None:  # the background load: one core kept busy
    x = 0
    while not stop.is_set():
        for _ in range(10000):
            x += 1


def _replies(n: int, seed: int):
    from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ins = Message(RecordDict(), dst_node_id=100 + i, message_type=MessageType.TRAIN)
        ins.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        arrays = ArrayRecord({k: Array(rng.standard_normal(s).astype(np.float32)) for k, s in SHAPES.items()})
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": int(rng.integers(10, 100))})})
        out.append(Message(content, reply_to=ins))
    return out


def run(calls: int = 400, load: bool = True, n: int = 10, warmup: int = 20) -> list[dict]:
    import logging

    from flwr.serverapp.strategy import FedAvg, FedMedian
    from flwr.supercore.task_identity import TaskIdentity

    from ..integrations.flower import TapestryStrategy

    for attr in ("_run_id", "_node_id", "_task_id"):  # what Flower's runtime sets in a ServerApp
        setattr(TaskIdentity, attr, 1)
    logging.getLogger("flwr").setLevel(logging.WARNING)  # the per-round INFO lines are not timed work
    strategies = {"flower FedAvg": FedAvg(), "flower FedMedian": FedMedian(),
                  "tapestry mean": TapestryStrategy("mean"), "tapestry median": TapestryStrategy("median"),
                  "tapestry trimmed_mean": TapestryStrategy("trimmed_mean", beta=0.2),
                  "tapestry krum": TapestryStrategy("krum", num_malicious_nodes=2)}
    baseline = {"tapestry mean": "flower FedAvg", "tapestry median": "flower FedMedian",
                "tapestry trimmed_mean": "flower FedMedian", "tapestry krum": "flower FedMedian"}
    stop = mp.Event()
    burner = mp.Process(target=_burn, args=(stop,), daemon=True) if load else None
    if burner:
        burner.start()
        time.sleep(0.2)
    times: dict[str, list[float]] = {k: [] for k in strategies}
    try:
        for c in range(calls + warmup):
            for name, s in strategies.items():
                replies = _replies(n, c)
                t0 = time.perf_counter()
                s.aggregate_train(1, replies)
                if c >= warmup:  # warm-up calls are not counted
                    times[name].append(time.perf_counter() - t0)
    finally:
        stop.set()
        if burner:
            burner.join(2)
    rows = []
    for name, ts in times.items():
        med, p90 = statistics.median(ts), float(np.percentile(ts, 90))
        row = {"strategy": name, "median_ms": med * 1e3, "p90_ms": p90 * 1e3, "calls": len(ts), "load": load}
        if name in baseline:
            b = times[baseline[name]]
            row["vs"] = baseline[name]
            row["median_ratio"] = med / statistics.median(b)
            row["p90_ratio"] = p90 / float(np.percentile(b, 90))
            row["ok"] = row["median_ratio"] <= BAR and row["p90_ratio"] <= BAR
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=400)
    p.add_argument("--no-load", action="store_true", help="no background process")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    rows = run(args.calls, not args.no_load)
    for r in rows:
        extra = f"  x{r['median_ratio']:.2f} / x{r['p90_ratio']:.2f} of {r['vs']}" if "vs" in r else ""
        print(f"{r['strategy']:24s} median {r['median_ms']:7.3f} ms  p90 {r['p90_ms']:7.3f} ms{extra}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0 if all(r.get("ok", True) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
