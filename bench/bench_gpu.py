"""GPU benchmark of the robust-aggregation kernels against the issue's bars (issue 4).

    python bench/bench_gpu.py                     # n=32, d=2^26 float32 (8 GiB), f=8
    python bench/bench_gpu.py --d 16777216 --json out.json

Every time is the median of ``--repeat`` runs timed with CUDA events after a warm-up, beside a
device-to-device copy of the same bytes timed in the same run. Byte model: each kernel reads the
(n, d) updates once and writes d float32 values; the copy reads and writes n*d values.
Reported per case: ms, GB/s of bytes read, and

* ``read/copy``: the case's bytes-read rate over the copy's bytes-read rate (the bars: trimmed
  mean and median >= 0.80, weighted mean >= 0.90);
* ``x matmul``: time over torch ``X @ X.T`` on the same tensor (the bar: Krum <= 1.3);
* the speed-up of each trimmed mean over ``torch.sort(X, 0)``-based trimmed mean.

Needs a CUDA GPU; prints why and exits 0 without one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch


def timed(fn, repeat: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeat`` runs, CUDA events, after one warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--d", type=int, default=1 << 26)
    p.add_argument("--f", type=int, default=8)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--no-sort", action="store_true", help="skip the torch.sort baseline (needs ~4x the input's memory)")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU visible to torch; nothing to measure")
        return 0

    import tapestry as tp
    from tapestry import ops
    from tapestry.backends import cuda as cuda_backend
    from tapestry.backends import triton as triton_backend

    n, d, f = args.n, args.d, args.f
    g = torch.Generator(device="cuda").manual_seed(0)
    X = torch.randn(n, d, device="cuda", generator=g)  # random data, never zeros
    Xb = X.to(torch.bfloat16)
    w = torch.full((n,), 1.0 / n, dtype=torch.float64)
    nbytes = X.numel() * X.element_size()
    rows = []

    def copy_time(src):  # the destination is freed on return
        dst = torch.empty_like(src)
        return timed(lambda: dst.copy_(src), args.repeat)

    t_copy, t_copy_b = copy_time(X), copy_time(Xb)
    t_mm = timed(lambda: X @ X.T, args.repeat)
    copy_rate = nbytes / t_copy
    copy_rate_b = (nbytes // 2) / t_copy_b

    def add(name, backend, ms, bytes_read, copy=None, bar=None, kind="read/copy"):
        row = {"case": name, "backend": backend, "ms": ms, "GB/s": bytes_read / ms / 1e6}
        if kind == "read/copy":
            row["read/copy"] = (bytes_read / ms) / (copy if copy is not None else copy_rate)
        else:
            row["x matmul"] = ms / t_mm
        row["bar"] = bar
        rows.append(row)
        return row

    add("copy (baseline)", "torch", t_copy, nbytes)
    add("copy bf16 (baseline)", "torch", t_copy_b, nbytes // 2, copy=copy_rate_b)
    add("X @ X.T (baseline)", "torch", t_mm, nbytes, kind="x matmul")
    t_sort = None
    if not args.no_sort:
        t_sort = timed(lambda: torch.sort(X, 0).values[f : n - f].mean(0), max(3, args.repeat // 3))
        add("torch.sort trimmed mean", "torch", t_sort, nbytes)
        torch.cuda.empty_cache()

    backends = [b for b in ("cuda", "triton") if ops.unavailable_reason(b) is None]
    for b in backends:
        mod = cuda_backend if b == "cuda" else triton_backend
        add("weighted_mean", b, timed(lambda: mod.weighted_mean(X, w), args.repeat), nbytes, bar=0.90)
        r = add("trimmed_mean", b, timed(lambda: mod.trimmed_mean(X, f), args.repeat), nbytes, bar=0.80)
        if t_sort is not None:
            r["vs torch.sort"] = t_sort / r["ms"]
        add("coord_median", b, timed(lambda: mod.coord_median(X), args.repeat), nbytes, bar=0.80)
        add("trimmed_mean bf16", b, timed(lambda: mod.trimmed_mean(Xb, f), args.repeat), nbytes // 2,
            copy=copy_rate_b)
        add("gram", b, timed(lambda: mod.gram(X), args.repeat), nbytes, kind="x matmul")

        def krum():
            with ops.backend(b):
                return tp.krum(X, f=f)

        add("krum end to end", b, timed(krum, args.repeat), nbytes, kind="x matmul", bar=1.3)

    print(f"bench_gpu: {torch.cuda.get_device_name()} n={n} d={d} f={f} float32 ({nbytes / 2**30:.2f} GiB), "
          f"repeat={args.repeat}; copy {t_copy:.3f} ms, X @ X.T {t_mm:.3f} ms")
    print(f"{'case':26s} {'backend':8s} {'ms':>9s} {'GB/s':>8s} {'ratio':>18s} {'bar':>6s} {'ok':>3s} {'vs sort':>8s}")
    for r in rows:
        if "read/copy" in r:
            ratio, ok = f"{r['read/copy']:.2f} read/copy", (r["bar"] is None or r["read/copy"] >= r["bar"])
        else:
            ratio, ok = f"{r['x matmul']:.2f} x matmul", (r["bar"] is None or r["x matmul"] <= r["bar"])
        bar = "" if r["bar"] is None else f"{r['bar']:.2f}"
        vs = f"{r['vs torch.sort']:.1f}x" if "vs torch.sort" in r else ""
        print(f"{r['case']:26s} {r['backend']:8s} {r['ms']:9.3f} {r['GB/s']:8.1f} {ratio:>18s} {bar:>6s} "
              f"{('yes' if ok else 'NO') if bar else '':>3s} {vs:>8s}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "n": n, "d": d, "f": f, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
