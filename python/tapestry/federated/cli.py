"""``tapestry simulate``: federated training with any rules, under any attack, in one process.

    tapestry simulate --compare mean,trimmed_mean,median,krum,bulyan --attack signflip \\
                      --byzantine 0.2 --out out/demo
    tapestry simulate --compare all --attack all --alpha 1,100 --out out/robustness   # the benchmark

Every (rule, attack, alpha) run is checked before the first round (names, the rule's tolerance of
the Byzantine fraction, the output directory); then each run shows a progress bar, and at the end a
per-round table and a summary table are printed, and ``--out DIR`` receives ``results.json``,
``results.md`` (the summary as markdown, one table per alpha) and ``accuracy.png`` (``loss.png``
for charlm), plus ``heatmap.png`` when there is more than one rule and attack. ``all`` is defined
in :mod:`.grid`; the tables and figures are drawn by :mod:`.report`.
"""

from __future__ import annotations

import argparse
import json
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

    from .grid import BENCHMARK_ROUNDS, NOT_IN_LOOP, all_rules

    d = Config()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("attacks (with --byzantine): " + ", ".join(ATTACKS) + "\nattack strengths: " + "; ".join(
        f"--{a.name}-{a.param} (default {'auto' if a.default is None else a.default})"
        for a in ATTACKS.values() if a.param)
        + "\n--compare all: " + ", ".join(all_rules()) + "; a rule the run's sizes cannot take is skipped, with a note"
        + "\nnot run by the loop: " + "; ".join(f"{name} ({why})" for name, why in NOT_IN_LOOP.items())
        + "; the pre-aggregator clipping (it needs its threshold c)")
    g = parser.add_argument_group("what to run")
    g.add_argument("--task", default=d.task, help=f"{', '.join(TASKS)} (default {d.task})")
    rules = g.add_mutually_exclusive_group()
    rules.add_argument("--rule", default=None, help="one aggregation rule (default mean)")
    rules.add_argument("--compare", default=None, metavar="RULES",
                       help="comma-separated rules to compare, e.g. mean,trimmed_mean,median,krum,bulyan, or "
                            "all: every rule the loop runs, and NNM, Bucketing, ARC in front of four (listed below)")
    g.add_argument("--attack", default="none", metavar="ATTACKS",
                   help="attack, or comma-separated attacks to run each rule under, or all: none (the clean "
                        "baseline) and every attack (default none)")
    g.add_argument("--byzantine", type=float_in(0, 1, hi_open=True), default=None,
                   help="fraction of clients that are Byzantine (default 0.2 with an attack, else 0; with --attack "
                        "all 0.2 in every row, so that the clean row runs the rules at the same f)")
    g.add_argument("--f", type=int_in(0, MAX_CLIENTS), default=None,
                   help="f handed to the rules (default: ceil(byzantine x answering clients per round))")
    g.add_argument("--codec", default=None, help="compress client deltas with this tapestry.compression codec "
                   "(with error feedback)")
    g.add_argument("--secure", action="store_true", help="pairwise-masked secure sum (rule mean only)")
    g.add_argument("--seed", type=int_in(0, 2**63 - 1), default=d.seed)
    g.add_argument("--out", default=None, metavar="DIR", help="write results.json, results.md and a plot here")
    t = parser.add_argument_group("training")
    t.add_argument("--clients", type=int_in(1, MAX_CLIENTS), default=d.clients, help=f"(default {d.clients})")
    t.add_argument("--rounds", type=int_in(1, MAX_ROUNDS), default=None,
                   help=f"(default {d.rounds}; {BENCHMARK_ROUNDS} with --compare all, to keep the grid short)")
    t.add_argument("--sample", type=float_in(0, 1, lo_open=True), default=d.sample, help=f"fraction of clients per round (default {d.sample})")
    t.add_argument("--dropout", type=float_in(0, 1, hi_open=True), default=d.dropout,
                   help=f"fraction of each round's clients that never answer (default {d.dropout})")
    t.add_argument("--alpha", type=_alphas, default=[d.alpha], metavar="A[,A...]",
                   help=f"Dirichlet concentration of the non-IID split, inf for IID (default {d.alpha:g}); a list "
                        f"(1,100) runs everything at each")
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


def _alphas(text: str) -> list[float]:
    one = float_in(0, float("inf"), lo_open=True)
    values = []
    for a in text.split(","):
        value = one(a)
        if value in values:
            raise argparse.ArgumentTypeError(f"{a.strip()} is given twice in {text!r}")
        values.append(value)
    return values


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


def _configs(args) -> tuple[list, list[str]]:
    """Every run of the command, validated, and the notes on runs that ``all`` skipped."""
    from .attacks import get_attack
    from .grid import BENCHMARK_ROUNDS, SLOW, SLOW_WHY, all_attacks, all_rules, names
    from .loop import Config, build_rule, validate

    rules, every_rule = names(args.compare or args.rule or "mean", "--compare", all_rules())
    attacks, every_attack = names(args.attack, "--attack", all_attacks())
    for attack in attacks:  # unknown names are errors even in a grid that skips what its sizes cannot run
        get_attack(attack)
    for rule in rules:
        build_rule(Config(rule=rule))
    rounds = args.rounds or (BENCHMARK_ROUNDS if every_rule else Config.rounds)
    if len(args.alpha) > 1 and args.task != "digits":
        raise ValueError(f"--alpha with several values needs --task digits ({args.task} is split by source file)")
    configs, skipped = [], {}
    for alpha in args.alpha:
        for attack in attacks:
            att = get_attack(attack)
            byz = args.byzantine if args.byzantine is not None else (0.0 if attack == "none" and not every_attack else 0.2)
            strength = getattr(args, f"{att.name}_{att.param}".replace("-", "_"), None) if att.param else None
            for rule, eps in [(r, e) for r in rules for e in _epsilons(args)]:
                if (every_rule or every_attack) and (rule, attack) in SLOW:
                    which = skipped.setdefault(f"left out for time: {SLOW_WHY}", ({}, {}))
                    which[0][rule] = which[1][attack] = None
                    continue
                cfg = Config(task=args.task, rule=rule, attack=attack, byzantine=byz, clients=args.clients,
                             sample=args.sample, rounds=rounds, local_steps=args.local_steps,
                             batch_size=args.batch_size, lr=args.lr, alpha=alpha, dropout=args.dropout, f=args.f,
                             strength=strength, tau=args.tau, codec=args.codec, secure=args.secure, seed=args.seed,
                             server_opt=args.server_opt, server_lr=args.server_lr,
                             server_momentum=args.server_momentum, server_beta1=args.server_beta1,
                             server_beta2=args.server_beta2, server_tau=args.server_tau, **_dp_settings(args, eps))
                try:
                    validate(cfg)
                except ValueError as exc:
                    if not (every_rule or every_attack):
                        raise
                    which = skipped.setdefault(str(exc), ({}, {}))  # one note per reason
                    which[0][rule] = which[1][attack] = None
                    continue
                configs.append(cfg)
    notes = [f"skipped {', '.join(r)} under {'every attack' if len(a) == len(attacks) else ', '.join(a)}: {why}"
             for why, (r, a) in skipped.items()]
    if not configs:
        raise ValueError("no run of the grid can take these settings: " + "; ".join(notes))
    return configs, notes


# More runs than this: one progress bar for the whole grid, and no per-round table (results.json has it).
MANY_RUNS = 12


def run(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from .loop import simulate
    from .report import fmt, heatmap, plot, summary_markdown, wants_heatmap
    from .tasks import load_task

    needed = {"matplotlib": "pip install 'matplotlib>=3.7'"} if args.out else {}
    if args.task == "digits":
        needed["sklearn"] = "pip install 'scikit-learn>=1.3'"
    require_modules(needed, f"tapestry simulate --task {args.task}" + (" --out" if args.out else ""))
    out = _check_out(args.out) if args.out else None
    configs, skipped = _configs(args)  # every run validated before the first round
    for note in skipped:
        print(note, file=sys.stderr)
    first = configs[0]
    tasks = {a: load_task(first.task, first.clients, a, first.seed) for a in args.alpha}
    metric = tasks[first.alpha].metric
    many = len(configs) > MANY_RUNS
    several = len(args.alpha) > 1
    console = Console(stderr=True)
    runs = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[m]}"),
                  TimeElapsedColumn(), console=console, disable=args.quiet) as progress:
        grid = progress.add_task("runs", total=len(configs), m="") if many else None
        for cfg in configs:
            label = f"{cfg.rule:>16} / {cfg.attack:<9}" + (f" / alpha {cfg.alpha:g}" if several else "")
            if many:
                progress.update(grid, description=label)
            bar = grid if many else progress.add_task(label, total=cfg.rounds, m="")

            def tick(rnd, metrics, bar=bar):
                shown = f"acc {100 * metrics['accuracy']:.1f}%" if metric == "accuracy" else f"loss {metrics['loss']:.3f}"
                progress.update(bar, m=shown, completed=None if many else rnd)  # None: the grid bar counts runs

            runs.append(simulate(cfg, task=tasks[cfg.alpha], on_round=tick))
            if many:
                progress.advance(grid)
            if cfg.dp:  # one column per epsilon
                runs[-1].rule = f"{cfg.rule} dp-{cfg.dp} eps={cfg.dp_epsilon:g}"
    stdout = Console()
    if not args.quiet and not many:
        table = Table(title=f"{first.task}: test {'accuracy (%)' if metric == 'accuracy' else 'loss'} per round")
        table.add_column("round", justify="right")
        for r in runs:
            table.add_column(f"{r.rule}\n{r.attack}" + (f"\nalpha {r.config['alpha']:g}" if several else ""),
                             justify="right")
        for i in range(first.rounds):
            table.add_row(str(i + 1), *(fmt(metric, (r.accuracy if metric == "accuracy" else r.loss)[i]) for r in runs))
        stdout.print(table)
    elif not args.quiet:
        print(f"(no per-round table for {len(runs)} runs: " + ("results.json has them)" if out else "--out DIR keeps them)"),
              file=sys.stderr)
    md = summary_markdown(runs, metric)
    seconds = sum(r.seconds for r in runs)
    details = (f"{first.task}, {first.clients} clients ({first.per_round} per round), {first.rounds} rounds, "
               + (f"Dirichlet alpha={', '.join(str(a) for a in args.alpha)}, " if first.task == "digits"
                  else "split by source file, ")
               + f"{100 * first.byzantine:.0f}% Byzantine, seed={first.seed}" + (f", codec {first.codec}" if first.codec else "")
               + (", secure sum" if first.secure else "")
               + (f", server optimizer {first.server_opt} {first.server_hparams or ''}".rstrip()
                  if first.server_opt != "fedavg" or first.server_hparams else "")
               + (f"; {len(runs)} runs, {seconds / 60:.1f} min of training" if many else "")
               + "".join(f"\n{note}" for note in skipped))
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
        written = ["results.json", "results.md", f"{metric}.png"]
        if wants_heatmap(runs):
            heatmap(runs, metric, os.path.join(out, "heatmap.png"))
            written.append("heatmap.png")
        if first.dp:
            from ..privacy.report import plot_epsilon
            plot_epsilon(runs, metric, os.path.join(out, "privacy.png"))
        print(f"wrote {out}/{', '.join(written)}", file=sys.stderr)
    return 0
