"""Compression speed beside same-run baselines, on one machine.

    python bench/bench_compression.py                    # d = 4,194,304; n = 32, f = 8
    python bench/bench_compression.py --threads 1 --json out.json

Every row is timed in interleaved pairs with its baseline (``--repeat`` pairs, medians), so a
noisy shared machine slows both sides alike:

* ``encode``/``decode`` of one float32 update (public API, int8 stochastic and nearest, int4) vs
  ``dst.copy_(x)`` of the same update into a preallocated buffer. Bandwidth counts bytes read
  plus written (copy: 8 d; int8 encode and decode: 5 d + scales), and ``bw`` is the row's
  bandwidth over the copy's in the same pair: the bar is >= 50% for int8.
* fused ``compression.aggregate`` over ``n`` int8 payloads vs the same rule on the already-decoded
  ``(n, d)`` float32 updates (``time ratio`` = fused / float32; the bar is <= 1.3 for the
  trimmed mean).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

import tapestry as tp
from tapestry.bench import paired_times
from tapestry import _native
from tapestry.compression import aggregate, decode, encode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=4_194_304)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--f", type=int, default=8)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="OpenMP threads for the kernels (default: all)")
    p.add_argument("--skip-fused", action="store_true")
    p.add_argument("--json")
    a = p.parse_args(argv)
    C = _native.require("_C")
    if a.threads:
        C.set_num_threads(a.threads)
    threads = C.cpu_features()["omp_max_threads"]
    print(f"bench_compression: d={a.d} n={a.n} f={a.f} threads={threads} repeat={a.repeat} ({platform.processor()})")
    rows = []
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.d, generator=g)
    dst = torch.empty_like(x)
    copy = lambda: dst.copy_(x)  # noqa: E731
    p8, p4 = encode(x, "int8", seed=1), encode(x, "int4", seed=1)
    nb = -(-a.d // 256) * 4
    cases = [
        ("encode int8 stochastic", lambda: encode(x, "int8", seed=1), 5 * a.d + nb),
        ("encode int8 nearest", lambda: encode(x, "int8", rounding="nearest"), 5 * a.d + nb),
        ("decode int8", lambda: decode(p8), 5 * a.d + nb),
        ("encode int4 stochastic", lambda: encode(x, "int4", seed=1), 4 * a.d + a.d // 2 + nb),
        ("decode int4", lambda: decode(p4), 4 * a.d + a.d // 2 + nb),
    ]
    print(f"{'case':28s} {'ms':>8s} {'GB/s':>7s} {'copy ms':>8s} {'copy GB/s':>9s} {'bw':>6s}")
    for name, fn, nbytes in cases:
        to, tb, r = paired_times(fn, copy, a.repeat)
        bw = (nbytes / to) / (8 * a.d / tb)
        rows.append({"case": name, "ms": to * 1e3, "gbps": nbytes / to / 1e9, "copy_ms": tb * 1e3,
                     "copy_gbps": 8 * a.d / tb / 1e9, "fraction_of_copy_bandwidth": bw, "time_ratio": r})
        print(f"{name:28s} {to * 1e3:8.2f} {nbytes / to / 1e9:7.2f} {tb * 1e3:8.2f} {8 * a.d / tb / 1e9:9.2f} {bw:6.0%}")
    if not a.skip_fused:
        X = torch.randn(a.n, a.d, generator=g)
        payloads = [encode(X[i], "int8", seed=i) for i in range(a.n)]
        del X
        dense = torch.stack([decode(q) for q in payloads])
        print(f"\n{'fused int8 vs float32':28s} {'fused ms':>9s} {'f32 ms':>8s} {'ratio':>6s}")
        for rule in (tp.TrimmedMean(f=a.f), tp.Median(), tp.Mean(), tp.Krum(f=a.f)):
            to, tb, r = paired_times(lambda: aggregate(payloads, rule), lambda: rule(dense), max(3, a.repeat // 2))
            rows.append({"case": f"fused int8 {rule.name}", "ms": to * 1e3, "baseline_ms": tb * 1e3, "time_ratio": r})
            print(f"{rule.name:28s} {to * 1e3:9.1f} {tb * 1e3:8.1f} {r:6.2f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"args": vars(a), "threads": threads, "platform": platform.platform(), "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
