"""``tapestry simulate``: federated training with any rules, under any attack, in one process.

    tapestry simulate --compare mean,trimmed_mean,median,krum,bulyan --attack signflip \\
                      --byzantine 0.2 --out out/demo

Every (rule, attack) pair is checked before the first round (names, the rule's tolerance of the
Byzantine fraction, the output directory); then each run shows a progress bar, and at the end a
per-round table and a summary table are printed, and ``--out DIR`` receives ``results.json``,
``results.md`` (the summary as a markdown table) and ``accuracy.png`` (``loss.png`` for charlm).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

from ..cli_args import float_in, int_in, require_modules

HELP = "simulate federated training with robust rules under Byzantine attacks (digits, charlm)"


MAX_CLIENTS, MAX_ROUNDS, MAX_STEPS, MAX_BATCH = 10_000, 100_000, 100_000, 65_536
_float = float_in(-1e300, 1e300)  # any finite number (the rule or optimizer checks its own range)


def configure(parser: argparse.ArgumentParser) -> None:
    # Only light imports here: the CLI builds every subcommand's parser at start-up.
    from .attacks import ATTACKS
    from .loop import Config
    from .tasks import TASKS

    d = Config()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("attacks (with --byzantine): " + ", ".join(ATTACKS) + "\nattack strengths: " + "; ".join(
        f"--{a.name}-{a.param} (default {'auto' if a.default is None else a.default})"
        for a in ATTACKS.values() if a.param))
    g = parser.add_argument_group("what to run")
    g.add_argument("--task", default=d.task, help=f"{', '.join(TASKS)} (default {d.task})")
    rules = g.add_mutually_exclusive_group()
    rules.add_argument("--rule", default=None, help="one aggregation rule (default mean)")
    rules.add_argument("--compare", default=None, metavar="RULES",
                       help="comma-separated rules to compare, e.g. mean,trimmed_mean,median,krum,bulyan")
    g.add_argument("--attack", default="none", metavar="ATTACKS",
                   help="attack, or comma-separated attacks to run each rule under (default none)")
    g.add_argument("--byzantine", type=float_in(0, 1, hi_open=True), default=None,
                   help="fraction of clients that are Byzantine (default 0.2 with an attack, else 0)")
    g.add_argument("--f", type=int_in(0, MAX_CLIENTS), default=None,
                   help="f handed to the rules (default: ceil(byzantine x answering clients per round))")
    g.add_argument("--codec", default=None, help="compress client deltas with this tapestry.compression codec "
                   "(with error feedback)")
    g.add_argument("--secure", action="store_true", help="pairwise-masked secure sum (rule mean only)")
    g.add_argument("--seed", type=int_in(0, 2**63 - 1), default=d.seed)
    g.add_argument("--out", default=None, metavar="DIR", help="write results.json, results.md and a plot here")
    t = parser.add_argument_group("training")
    t.add_argument("--clients", type=int_in(1, MAX_CLIENTS), default=d.clients, help=f"(default {d.clients})")
    t.add_argument("--rounds", type=int_in(1, MAX_ROUNDS), default=d.rounds, help=f"(default {d.rounds})")
    t.add_argument("--sample", type=float_in(0, 1, lo_open=True), default=d.sample, help=f"fraction of clients per round (default {d.sample})")
    t.add_argument("--dropout", type=float_in(0, 1, hi_open=True), default=d.dropout,
                   help=f"fraction of each round's clients that never answer (default {d.dropout})")
    t.add_argument("--alpha", type=float_in(0, float("inf"), lo_open=True), default=d.alpha,
                   help=f"Dirichlet concentration of the non-IID split, inf for IID (default {d.alpha})")
    t.add_argument("--local-steps", type=int_in(1, MAX_STEPS), default=d.local_steps, help=f"(default {d.local_steps})")
    t.add_argument("--batch-size", type=int_in(1, MAX_BATCH), default=d.batch_size, help=f"(default {d.batch_size})")
    t.add_argument("--lr", type=float_in(0, 1e3, lo_open=True), default=d.lr, help=f"client learning rate (default {d.lr}, cosine decay)")
    t.add_argument("--tau", type=float_in(0, 1e300, lo_open=True), default=d.tau, help=f"centered_clipping radius (default {d.tau})")
    from ..optim import SERVER_OPTIMIZERS
    s = parser.add_argument_group("server optimizer (tapestry.optim; unset values take the optimizer's defaults)")
    s.add_argument("--server-opt", default=d.server_opt, choices=SERVER_OPTIMIZERS,
                   help=f"how the aggregate moves the global model (default {d.server_opt}: add it)")
    for name, what in [("lr", "server learning rate"), ("momentum", "fedavgm/nesterov momentum"),
                       ("beta1", "fedadam/fedyogi first-moment decay"), ("beta2", "fedadam/fedyogi second-moment decay"),
                       ("tau", "fedadam/fedyogi/fedadagrad adaptivity (epsilon)")]:
        s.add_argument(f"--server-{name}", type=_float, default=None, help=what)
    a = parser.add_argument_group("attack strengths")
    for att in ATTACKS.values():
        if att.param:
            a.add_argument(f"--{att.name}-{att.param}", type=_float, default=None,
                           help=f"{att.help} (default {'auto' if att.default is None else att.default})")
    _dp_arguments(parser, d)
    o = parser.add_argument_group("output")
    o.add_argument("--quiet", action="store_true", help="no progress bar and no per-round table")


def _dp_arguments(parser, d) -> None:
    p = parser.add_argument_group("differential privacy (tapestry.privacy, docs/privacy.md; rule mean)")
    p.add_argument("--dp", choices=["central", "distributed"], default=None,
                   help="central: the server clips and adds Gaussian noise; distributed: clients add discrete noise "
                        "inside the secure sum")
    p.add_argument("--epsilon", default=None, metavar="E[,E...]",
                   help="privacy budget of the whole run at --delta; a list (1,4,8,inf) runs each and plots accuracy "
                        "against epsilon; inf is the non-private run")
    p.add_argument("--delta", type=_float, default=d.dp_delta, help=f"(default {d.dp_delta})")
    p.add_argument("--dp-clip", type=_float, default=d.dp_clip, help=f"L2 clip of each update (default {d.dp_clip})")
    p.add_argument("--dp-adaptive", action="store_true", help="central: adapt the clip toward the median norm")
    p.add_argument("--dp-sampling", choices=["fixed", "poisson"], default=d.dp_sampling,
                   help="fixed: --sample x clients each round; poisson: each client with probability --sample")
    p.add_argument("--dp-accountant", choices=["rdp", "pld"], default=d.dp_accountant)
    p.add_argument("--dp-bits", type=int, default=d.dp_bits, help=f"distributed: ring Z_2^b (default {d.dp_bits})")
    p.add_argument("--dp-mechanism", choices=["dgauss", "skellam"], default=d.dp_mechanism)


def _epsilons(args) -> list:
    if getattr(args, "dp", None) is None:
        if getattr(args, "epsilon", None) is not None:
            raise ValueError("--epsilon needs --dp central or --dp distributed")
        return [None]
    if args.epsilon is None:
        raise ValueError(f"--dp {args.dp} needs --epsilon (a number, a list, or inf)")
    out = []
    for e in args.epsilon.split(","):
        try:
            out.append(float(e))
        except ValueError:
            raise ValueError(f"--epsilon: not a number: {e!r}") from None
    return out


def _dp_settings(args, eps) -> dict:
    if eps is None:
        return {}
    return dict(dp=args.dp, dp_epsilon=eps, dp_delta=args.delta, dp_clip=args.dp_clip, dp_adaptive=args.dp_adaptive,
                dp_sampling=args.dp_sampling, dp_accountant=args.dp_accountant, dp_bits=args.dp_bits,
                dp_mechanism=args.dp_mechanism)


def _check_out(path: str) -> str:
    """Create ``path`` and prove it writable now, not after training."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ValueError(f"--out {path!r} cannot be written: {exc.strerror or exc}") from None
    return path


def _configs(args) -> list:
    from .attacks import get_attack
    from .loop import Config, validate

    rules = [r.strip() for r in (args.compare or args.rule or "mean").split(",") if r.strip()]
    attacks = [a.strip() for a in args.attack.split(",") if a.strip()]
    if not rules:
        raise ValueError("--compare: no rule given")
    if not attacks:
        raise ValueError("--attack: no attack given")
    configs = []
    for attack in attacks:
        att = get_attack(attack)
        byz = args.byzantine if args.byzantine is not None else (0.0 if attack == "none" else 0.2)
        strength = getattr(args, f"{att.name}_{att.param}".replace("-", "_"), None) if att.param else None
        for rule, eps in [(r, e) for r in rules for e in _epsilons(args)]:
            cfg = Config(task=args.task, rule=rule, attack=attack, byzantine=byz, clients=args.clients,
                         sample=args.sample, rounds=args.rounds, local_steps=args.local_steps,
                         batch_size=args.batch_size, lr=args.lr, alpha=args.alpha, dropout=args.dropout, f=args.f,
                         strength=strength, tau=args.tau, codec=args.codec, secure=args.secure, seed=args.seed,
                         server_opt=args.server_opt, server_lr=args.server_lr, server_momentum=args.server_momentum,
                         server_beta1=args.server_beta1, server_beta2=args.server_beta2, server_tau=args.server_tau,
                         **_dp_settings(args, eps))
            validate(cfg)
            configs.append(cfg)
    return configs


def _fmt(metric: str, value: float) -> str:
    if math.isnan(value):
        return "nan"
    return f"{100 * value:.1f}" if metric == "accuracy" else f"{value:.3f}"


def summary_markdown(runs, metric: str, label=lambda r: r.rule) -> str:
    """Final metric per (attack row, rule column), as a markdown table (``label(run)``: its column)."""
    rules = list(dict.fromkeys(label(r) for r in runs))
    attacks = list(dict.fromkeys(r.attack for r in runs))
    cell = {(r.attack, label(r)): r for r in runs}
    head = "final test accuracy (%)" if metric == "accuracy" else "final held-out loss (nats/char)"
    lines = [f"| attack \\ rule ({head}) | " + " | ".join(rules) + " |", "|---" * (len(rules) + 1) + "|"]
    for attack in attacks:
        vals = []
        for rule in rules:
            r = cell.get((attack, rule))
            vals.append("" if r is None else _fmt(metric, r.accuracy[-1] if metric == "accuracy" else r.loss[-1]))
        lines.append(f"| {attack} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def plot(runs, metric: str, path: str, label=lambda r: r.rule, xlabel: str = "round", ylim=None) -> None:
    """One panel per attack, one line per run (``label(run)``); ``ylim``: (bottom, top) of every panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = list(dict.fromkeys(r.attack for r in runs))
    cols = min(3, len(attacks))
    rows = math.ceil(len(attacks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(attacks):]:
        ax.set_visible(False)
    for ax, attack in zip(axes.flat, attacks):
        for r in (r for r in runs if r.attack == attack):
            ys = r.accuracy if metric == "accuracy" else r.loss
            ax.plot(range(1, len(ys) + 1), [100 * y if metric == "accuracy" else y for y in ys], label=label(r))
        byz = next(r for r in runs if r.attack == attack).config["byzantine"]
        ax.set_title(f"attack: {attack}" + (f" ({100 * byz:.0f}% Byzantine)" if byz else ""))
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy (%)" if metric == "accuracy" else "held-out loss (nats/char)")
    if ylim is not None:
        axes.flat[0].set_ylim(*ylim)
    panels = [[label(r) for r in runs if r.attack == attack] for attack in attacks]
    for ax, names in zip(axes.flat, panels):
        if ax is axes.flat[0] or names != panels[0]:  # one legend, unless the panels' lines differ
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from .loop import simulate
    from .tasks import load_task

    needed = {"matplotlib": "pip install 'matplotlib>=3.7'"} if args.out else {}
    if args.task == "digits":
        needed["sklearn"] = "pip install 'scikit-learn>=1.3'"
    require_modules(needed, f"tapestry simulate --task {args.task}" + (" --out" if args.out else ""))
    out = _check_out(args.out) if args.out else None
    configs = _configs(args)  # every run validated before the first round
    first = configs[0]
    task = load_task(first.task, first.clients, first.alpha, first.seed)
    console = Console(stderr=True)
    runs = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[m]}"),
                  TimeElapsedColumn(), console=console, disable=args.quiet) as progress:
        for cfg in configs:
            label = f"{cfg.rule:>16} / {cfg.attack:<9}"
            bar = progress.add_task(label, total=cfg.rounds, m="")

            def tick(rnd, metrics, bar=bar):
                shown = f"acc {100 * metrics['accuracy']:.1f}%" if task.metric == "accuracy" else f"loss {metrics['loss']:.3f}"
                progress.update(bar, completed=rnd, m=shown)

            runs.append(simulate(cfg, task=task, on_round=tick))
            if cfg.dp:  # one column per epsilon
                runs[-1].rule = f"{cfg.rule} dp-{cfg.dp} eps={cfg.dp_epsilon:g}"
    metric = task.metric
    stdout = Console()
    if not args.quiet:
        table = Table(title=f"{first.task}: test {'accuracy (%)' if metric == 'accuracy' else 'loss'} per round")
        table.add_column("round", justify="right")
        for r in runs:
            table.add_column(f"{r.rule}\n{r.attack}", justify="right")
        for i in range(first.rounds):
            table.add_row(str(i + 1), *(_fmt(metric, (r.accuracy if metric == "accuracy" else r.loss)[i]) for r in runs))
        stdout.print(table)
    md = summary_markdown(runs, metric)
    details = (f"{first.task}, {first.clients} clients ({first.per_round} per round), {first.rounds} rounds, "
               + (f"Dirichlet alpha={first.alpha}, " if first.task == "digits" else "split by source file, ")
               + f"{100 * first.byzantine:.0f}% Byzantine, seed={first.seed}" + (f", codec {first.codec}" if first.codec else "")
               + (", secure sum" if first.secure else "")
               + (f", server optimizer {first.server_opt} {first.server_hparams or ''}".rstrip()
                  if first.server_opt != "fedavg" or first.server_hparams else ""))
    if first.dp:
        from ..privacy.report import epsilon_line
        details += f", {first.dp} DP (delta {first.dp_delta:g}, clip {first.dp_clip:g}, {first.dp_sampling} sampling, " \
                   f"{first.dp_accountant})\n" + "\n".join(epsilon_line(r) for r in runs)
    print(md + "\n\n" + details)
    if out:
        record = {"task": first.task, "metric": metric, "command": sys.argv[1:], "settings": details,
                  "runs": [r.to_json() for r in runs]}
        with open(os.path.join(out, "results.json"), "w") as fh:
            json.dump(record, fh, indent=1, allow_nan=False)
        with open(os.path.join(out, "results.md"), "w") as fh:
            fh.write(md + "\n\n" + details + "\n")
        plot(runs, metric, os.path.join(out, f"{metric}.png"))
        if first.dp:
            from ..privacy.report import plot_epsilon
            plot_epsilon(runs, metric, os.path.join(out, "privacy.png"))
        print(f"wrote {out}/results.json, results.md, {metric}.png", file=sys.stderr)
    return 0
