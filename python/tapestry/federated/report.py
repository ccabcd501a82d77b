"""Tables and figures of ``tapestry simulate`` (and ``tapestry train``) runs.

Runs are grouped by attack and labelled by rule (``label(run)``); when they span several Dirichlet
alphas (``--alpha 1,100``) every table and panel is split by alpha as well, since the same rule
under the same attack is then a different run.
"""

from __future__ import annotations

import math


def fmt(metric: str, value: float) -> str:
    if math.isnan(value):
        return "nan"
    return f"{100 * value:.1f}" if metric == "accuracy" else f"{value:.3f}"


def _final(run, metric: str) -> float:
    return run.accuracy[-1] if metric == "accuracy" else run.loss[-1]


def alphas(runs) -> list:
    """The Dirichlet alphas of ``runs``, in run order (``[None]`` for runs that have none)."""
    return list(dict.fromkeys(r.config.get("alpha") for r in runs))


def _alpha_name(alpha) -> str:
    return f"Dirichlet alpha = {alpha:g}"


def _table(runs, metric: str, label) -> str:
    rules = list(dict.fromkeys(label(r) for r in runs))
    attacks = list(dict.fromkeys(r.attack for r in runs))
    cell = {(r.attack, label(r)): r for r in runs}
    head = "final test accuracy (%)" if metric == "accuracy" else "final held-out loss (nats/char)"
    lines = [f"| attack \\ rule ({head}) | " + " | ".join(rules) + " |", "|---" * (len(rules) + 1) + "|"]
    for attack in attacks:
        vals = ["" if (attack, rule) not in cell else fmt(metric, _final(cell[attack, rule], metric)) for rule in rules]
        lines.append(f"| {attack} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def summary_markdown(runs, metric: str, label=lambda r: r.rule) -> str:
    """Final metric per (attack row, rule column) as a markdown table; one table per alpha when the
    runs span several."""
    levels = alphas(runs)
    if len(levels) == 1:
        return _table(runs, metric, label)
    return "\n\n".join(f"**{_alpha_name(a)}**\n\n" + _table([r for r in runs if r.config.get("alpha") == a], metric, label)
                       for a in levels)


def plot(runs, metric: str, path: str, label=lambda r: r.rule, xlabel: str = "round", ylim=None) -> None:
    """One panel per attack (per attack and alpha when the runs span several alphas), one line per
    run (``label(run)``); ``ylim``: (bottom, top) of every panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = len(alphas(runs)) > 1
    def key(r):
        return (r.attack, r.config.get("alpha")) if split else (r.attack, None)
    panels = list(dict.fromkeys(key(r) for r in runs))
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, panels):
        mine = [r for r in runs if key(r) == panel]
        for r in mine:
            ys = r.accuracy if metric == "accuracy" else r.loss
            ax.plot(range(1, len(ys) + 1), [100 * y if metric == "accuracy" else y for y in ys], label=label(r))
        attack, alpha = panel
        byz = mine[0].config["byzantine"]
        ax.set_title(f"attack: {attack}" + (f" ({100 * byz:.0f}% Byzantine)" if byz else "")
                     + (f", alpha = {alpha:g}" if split else ""))
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy (%)" if metric == "accuracy" else "held-out loss (nats/char)")
    if ylim is not None:
        axes.flat[0].set_ylim(*ylim)
    names = [[label(r) for r in runs if key(r) == panel] for panel in panels]
    for ax, these in zip(axes.flat, names):
        if ax is axes.flat[0] or these != names[0]:  # one legend, unless the panels' lines differ
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def wants_heatmap(runs, label=lambda r: r.rule) -> bool:
    return len({label(r) for r in runs}) > 1 and len({r.attack for r in runs}) > 1


def heatmap(runs, metric: str, path: str, label=lambda r: r.rule, dpi: int = 100) -> None:
    """Final metric of every run: one panel per alpha, rules down, attacks across, each cell
    annotated; viridis (readable without telling red from green), missing runs grey."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rules = list(dict.fromkeys(label(r) for r in runs))
    attacks = list(dict.fromkeys(r.attack for r in runs))
    levels = alphas(runs)
    accuracy = metric == "accuracy"
    cmap = plt.get_cmap("viridis" if accuracy else "viridis_r").with_extremes(bad="0.85")
    finals = [_final(r, metric) for r in runs]
    finite = [v for v in finals if math.isfinite(v)] or [0.0]
    vmin, vmax = (0.0, 100.0) if accuracy else (min(finite), max(finite))
    width = 0.55 * len(attacks) * len(levels) + 2.8
    fig, axes = plt.subplots(1, len(levels), figsize=(width, 0.28 * len(rules) + 2.2), squeeze=False, sharey=True)
    for ax, alpha in zip(axes[0], levels):
        grid = np.full((len(rules), len(attacks)), np.nan)
        ran = np.zeros(grid.shape, dtype=bool)  # a run with a NaN result is written "nan", a missing one left blank
        for r, v in zip(runs, finals):
            if r.config.get("alpha") == alpha:
                at = rules.index(label(r)), attacks.index(r.attack)
                grid[at], ran[at] = (100 * v if accuracy else v), True
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            if not ran[i, j]:
                continue
            red, green, blue, _ = cmap(image.norm(v)) if math.isfinite(v) else (1, 1, 1, 1)
            ink = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
            text = "nan" if not math.isfinite(v) else f"{v:.0f}" if accuracy else f"{v:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color=ink)
        ax.set_xticks(range(len(attacks)), attacks, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(rules)), rules, fontsize=8)
        if alpha is not None:
            ax.set_title(_alpha_name(alpha), fontsize=10)
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.025, pad=0.02,
                 label="final test accuracy (%)" if accuracy else "final held-out loss (nats/char)")
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
