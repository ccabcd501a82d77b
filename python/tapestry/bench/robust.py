"""``tapestry bench --family robust``: the robust rules on every backend beside torch's own ops.

Baselines timed in the same run: ``copy`` (``dst.copy_(X)``), ``torch_mean`` (``X.mean(0)``),
``matmul_XXt`` (``X @ X.T``, what any distance-based rule must at least do) and a trimmed mean
written with ``torch.sort`` (what a user would write without Tapestry). Per-coordinate rules are
paired with torch's mean on the CPU and with the copy on a GPU; Gram-based rules with ``X @ X.T``;
the bfloat16 trimmed mean with its own float32 time.
"""

from __future__ import annotations

import torch

from .harness import Case, Config, backends_for, with_backend


def cases(cfg: Config) -> list[Case]:
    """The robust-aggregation family: mean, trimmed mean, median, Krum, Multi-Krum, Bulyan at n, d, f of ``cfg``."""
    import tapestry as tp

    g = torch.Generator().manual_seed(cfg.seed)
    X = torch.randn(cfg.n, cfg.d, generator=g).to(cfg.device)
    Xb = X.to(torch.bfloat16)
    nbytes = X.numel() * X.element_size()
    dst = torch.empty_like(X)
    out = [
        Case("robust", "copy", lambda: dst.copy_(X), 2 * nbytes, is_baseline=True),
        Case("robust", "torch_mean", lambda: X.mean(0), nbytes, is_baseline=True),
        Case("robust", "matmul_XXt", lambda: X @ X.T, nbytes, is_baseline=True),
        Case("robust", "torch_sort_trimmed_mean", lambda: torch.sort(X, 0).values[cfg.f : cfg.n - cfg.f].mean(0), nbytes,
             baseline="torch_mean"),
    ]

    # CPU bars are ratios to torch's mean; GPU bars to a device copy of the same bytes (floors.py)
    per_coord_base = "copy" if cfg.device.startswith("cuda") else "torch_mean"
    for b in backends_for(cfg.device):
        out += [
            Case("robust", "mean", with_backend(b, lambda: tp.mean(X)), nbytes, b, baseline=per_coord_base),
            Case("robust", "trimmed_mean", with_backend(b, lambda: tp.trimmed_mean(X, f=cfg.f)), nbytes, b,
                 baseline=per_coord_base),
            Case("robust", "trimmed_mean", with_backend(b, lambda: tp.trimmed_mean(Xb, f=cfg.f)), nbytes // 2, b, "bfloat16",
                 baseline=f"trimmed_mean:{b}:float32"),
            Case("robust", "median", with_backend(b, lambda: tp.median(X)), nbytes, b, baseline=per_coord_base),
            Case("robust", "krum", with_backend(b, lambda: tp.krum(X, f=cfg.f)), nbytes, b, baseline="matmul_XXt"),
            Case("robust", "multi_krum", with_backend(b, lambda: tp.multi_krum(X, f=cfg.f, m=cfg.n - cfg.f)), nbytes, b,
                 baseline="matmul_XXt"),
            Case("robust", "bulyan", with_backend(b, lambda: tp.bulyan(X, f=min(cfg.f, (cfg.n - 3) // 4))), nbytes, b,
                 baseline="matmul_XXt"),
        ]
    return out
