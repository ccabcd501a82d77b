"""Accuracy against epsilon, for ``tapestry simulate --dp ... --epsilon 1,4,8,inf --out DIR``."""

from __future__ import annotations

import math


def epsilon_line(run) -> str:
    """One line per run: the epsilon spent after each round (the accountant's figures)."""
    p = run.privacy or {}
    eps = p.get("epsilon")
    if not eps:
        return f"{run.rule}: non-private (epsilon = inf)"
    shown = ", ".join(f"{e:.3g}" for e in eps)
    return (f"{run.rule}: noise multiplier {p.get('noise_multiplier', 0):.4g}; epsilon at delta={p['delta']:g} "
            f"after each round: {shown}")


def plot_epsilon(runs, metric: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = []
    for r in runs:
        eps = r.config.get("dp_epsilon", math.inf)
        pts.append((eps, r.accuracy[-1] if metric == "accuracy" else r.loss[-1], r.attack))
    finite = [e for e, _, _ in pts if math.isfinite(e)]
    right = 2 * max(finite) if finite else 1.0  # where epsilon = inf is drawn
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for attack in dict.fromkeys(a for _, _, a in pts):
        xs = sorted((e if math.isfinite(e) else right, y) for e, y, a in pts if a == attack)
        ax.plot([x for x, _ in xs], [100 * y if metric == "accuracy" else y for _, y in xs], "o-", label=attack)
    ticks = sorted(set(finite)) + ([right] if any(not math.isfinite(e) for e, _, _ in pts) else [])
    ax.set_xscale("log")
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks[:len(set(finite))]] + (["inf"] if len(ticks) > len(set(finite)) else []))
    ax.minorticks_off()
    ax.set_xlabel(f"epsilon (delta = {runs[0].config.get('dp_delta'):g})")
    ax.set_ylabel("final test accuracy (%)" if metric == "accuracy" else "final held-out loss")
    ax.set_title(f"{runs[0].config.get('dp')} DP: {runs[0].config['clients']} participants, "
                 f"{runs[0].config['per_round']} per round")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
