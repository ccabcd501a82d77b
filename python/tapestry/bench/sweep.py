"""``tapestry bench --family sweep``: trimmed mean and median from n = 2 to 1024 clients.

Each n gets ``d = 128 Mi / n`` float32 coordinates (``2 Mi / n`` with ``--quick``) and ``f = n // 4``,
and both ops are paired with torch's ``X.mean(0)`` on the same matrix in the same rounds: the
ratio says how far from a plain mean's memory-bound pass the selection is at that n. The trimmed
mean of the same values as float16 and bfloat16 is paired with its float32 time.
"""

from __future__ import annotations

import gc

import torch

from .harness import Config, Row, paired_times

SWEEP_N = (2, 8, 16, 32, 48, 64, 100, 256, 512, 1024)


def rows(cfg: Config):
    """One row per op and n, on the CPU (the GPU bars are the robust family's)."""
    import tapestry as tp

    if cfg.device != "cpu":
        return

    total = (2 << 20) if cfg.quick else (128 << 20)
    g = torch.Generator().manual_seed(cfg.seed)
    for n in SWEEP_N:
        yield from _rows_at(tp, torch.randn(n, total // n, generator=g), n // 4, cfg.repeat)
        gc.collect()


def _rows_at(tp, X: torch.Tensor, f: int, repeat: int):
    n, nbytes = X.shape[0], X.numel() * X.element_size()
    for name, fn in (("trimmed_mean", lambda: tp.trimmed_mean(X, f=f)), ("median", lambda: tp.median(X))):
        t, _, ratio = paired_times(fn, lambda: X.mean(0), repeat)
        yield Row("sweep", f"{name} n={n}", "auto", "float32", 1e3 * t, nbytes / t / 1e9, "torch_mean", ratio)
    for dtype in (torch.float16, torch.bfloat16):  # half the bytes: against its own float32 time
        Y = X.to(dtype)
        t, _, ratio = paired_times(lambda: tp.trimmed_mean(Y, f=f), lambda: tp.trimmed_mean(X, f=f), repeat)
        yield Row("sweep", f"trimmed_mean n={n}", "auto", str(dtype).removeprefix("torch."), 1e3 * t,
                  nbytes / 2 / t / 1e9, "trimmed_mean float32", ratio)
