"""Secure sum speed beside same-run baselines, on one machine.

    python bench/bench_secure.py                     # d = 4,194,304, k = 8, and the n = 100 round
    python bench/bench_secure.py --d 1048576 --skip-round --json out.json

Rows (times are medians over ``--repeat`` interleaved pairs; ratio = baseline time / our time,
each pair timed back to back so that a noisy shared machine slows both sides alike):

* keystream, one core: our kernel (``tapestry._C``, best SIMD path, 1 OpenMP thread) writing
  ``d`` words into a preallocated buffer, vs OpenSSL's ChaCha20 through ``cryptography``
  encrypting ``4 d`` zero bytes into a preallocated buffer (its ``update_into``);
* masking one update of ``d`` words with ``k + 1`` keystreams (self mask + k neighbours), fused,
  one core and all cores, vs Flower's SecAgg+ generator producing the same ``(k + 1) d`` words
  (``RandomState(seed32).randint(0, 2^32 - 1, d)`` per seed, as ``flwr`` does);
* a whole in-process round (``simulate_round``): n = 100, k = 8, d = 1,000,000, 10% of the
  clients dropping after key sharing (before their masked input), time per phase.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from tapestry import _native, ops
from tapestry.bench import paired_times
from tapestry.secure import chacha20_mask, simulate_round
from tapestry.secure.prg import _words


def paired(ours, base, repeat: int) -> tuple[float, float, float]:
    """Median times of ours and base, and the median per-pair speed-up base / ours."""
    t_ours, t_base, ratio = paired_times(ours, base, repeat)
    return t_ours, t_base, 1.0 / ratio


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=4_194_304)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--repeat", type=int, default=9)
    p.add_argument("--round-d", type=int, default=1_000_000)
    p.add_argument("--round-n", type=int, default=100)
    p.add_argument("--skip-round", action="store_true")
    p.add_argument("--json")
    a = p.parse_args(argv)
    C = _native.require("_C")
    threads = C.cpu_features()["omp_max_threads"]
    rng = np.random.default_rng(0)
    d, k = a.d, a.k
    rows = []

    def report(name, t_ours, t_base, ratio, nbytes, base_name):
        rows.append(dict(case=name, ms=t_ours * 1e3, gbps=nbytes / t_ours / 1e9, baseline=base_name,
                         baseline_ms=t_base * 1e3, speedup=ratio))
        print(f"{name:34s} {t_ours * 1e3:9.2f} ms {nbytes / t_ours / 1e9:7.2f} GB/s | {base_name:22s} "
              f"{t_base * 1e3:9.2f} ms | {ratio:5.2f}x", flush=True)

    print(f"secure bench: d={d} k={k} repeat={a.repeat} isa={C.isa()} threads={threads} "
          f"cpu={platform.processor() or platform.machine()}")
    key, nonce = rng.bytes(32), rng.bytes(12)
    kw, nw = _words(key, 8, "key", "cpu"), _words(nonce, 3, "nonce", "cpu")
    buf = torch.empty(d, dtype=torch.int32)
    zeros, sink = bytes(4 * d), bytearray(4 * d + 16)

    def ours_ks():
        C.chacha20_keystream(buf.data_ptr(), kw.data_ptr(), nw.data_ptr(), 0, d)

    def openssl():
        Cipher(algorithms.ChaCha20(key, bytes(4) + nonce), None).encryptor().update_into(zeros, sink)

    C.set_num_threads(1)
    report("keystream, 1 core", *paired(ours_ks, openssl, a.repeat), 4 * d, "OpenSSL ChaCha20")
    seeds = [rng.bytes(32) for _ in range(k + 1)]
    signs = [1] + [1 if i % 2 else -1 for i in range(k)]
    flower_seeds = [int(np.frombuffer(s, "<u4")[0]) for s in seeds]
    x = torch.from_numpy(rng.integers(0, 2**32, size=d, dtype=np.uint64).astype(np.uint32))
    out = torch.empty_like(x)

    def mask():
        with ops.backend("cpu"):
            chacha20_mask(x, seeds, signs, out=out)

    def flower():
        for s in flower_seeds:
            np.random.RandomState(s).randint(0, 2**32 - 1, size=d)

    nbytes = 4 * d * (k + 1) + 8 * d
    report(f"mask k={k}, 1 core", *paired(mask, flower, a.repeat), nbytes, "Flower RandomState")
    C.set_num_threads(threads)
    report(f"mask k={k}, {threads} threads", *paired(mask, flower, a.repeat), nbytes, "Flower RandomState")
    result = {"machine": {"platform": platform.platform(), "isa": C.isa(), "threads": threads},
              "d": d, "k": k, "rows": rows}
    if not a.skip_round:
        n, dr = a.round_n, a.round_d
        X = torch.from_numpy(rng.standard_normal((n, dr), dtype=np.float32) * 0.01)
        drop = list(range(0, n, 10))
        t = time.perf_counter()
        total, info = simulate_round(X, threshold=(k + 1) // 2 + 1, neighbours=k, dropouts=drop,
                                     clip=0.1, return_info=True)
        wall = time.perf_counter() - t
        err = float((total.double() - X[info.survivors].clamp(-0.1, 0.1).double().sum(0)).abs().max())
        print(f"round n={n} k={k} d={dr} dropouts={len(drop)} after masking: {wall:.2f} s wall, "
              f"{len(info.survivors)} survivors, max |error| vs plain sum {err:.2e}")
        for phase, s in info.seconds.items():
            mib = info.bytes_sent.get(phase)
            print(f"  {phase:14s} {s:8.3f} s" + (f"   {mib / 2**20:10.1f} MiB sent" if mib else ""))
        result["round"] = {"n": n, "k": k, "d": dr, "dropouts": len(drop), "wall_s": wall, "phases_s": info.seconds,
                           "bytes_sent": info.bytes_sent, "max_abs_error": err}
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


def test_keystream_cpu(benchmark):
    """pytest-benchmark entry: the CPU keystream of 2^20 words (bytes: 4 MiB)."""
    C = _native.require("_C")
    buf = torch.empty(1 << 20, dtype=torch.int32)
    kw, nw = _words(bytes(32), 8, "key", "cpu"), _words(bytes(12), 3, "nonce", "cpu")
    benchmark(lambda: C.chacha20_keystream(buf.data_ptr(), kw.data_ptr(), nw.data_ptr(), 0, 1 << 20))


def test_mask_k8_cpu(benchmark):
    x = torch.zeros(1 << 20, dtype=torch.uint32)
    seeds = [bytes([i]) * 32 for i in range(9)]
    with ops.backend("cpu"):
        benchmark(lambda: chacha20_mask(x, seeds, [1] * 9, out=x))


if __name__ == "__main__":
    sys.exit(main())
