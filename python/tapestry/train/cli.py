"""``tapestry train``: DiLoCo on torch.distributed, one rank per participant, robust all-reduce.

    tapestry train --participants 4 --inner-steps 25 --rule trimmed_mean --f 1 --codec int8 --out out/train
    tapestry train --participants 4 --dp central --epsilon 4,16,inf --delta 1e-5 --dp-clip 0.5 --out out/dp
    tapestry train --participants 4 --dp distributed --epsilon 8,inf --delta 1e-5 --dp-clip 1 --out out/ddp
    torchrun --nproc-per-node 4 -m tapestry train --participants 4 ...

Every run (``--rule`` x ``--attack``, comma-separated) is checked before any process starts (names,
the rule's requirement on the participant count, a ``--resume`` checkpoint's configuration); then
``--participants`` local ranks are spawned (gloo on 127.0.0.1) unless torchrun started this
process. ``--out DIR`` keeps a checkpoint per run (``DIR/checkpoints/<run>.pt``, every outer step)
and ``results.json``, ``results.md`` and ``loss.png``; runs already in ``results.json`` with
other names are kept, so several commands can fill one table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from types import SimpleNamespace

HELP = "DiLoCo training on torch.distributed: robust compressed all-reduce of pseudo-gradients (charlm)"


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def configure(parser: argparse.ArgumentParser) -> None:
    from ..federated.attacks import ATTACKS
    from .config import MODES, TrainConfig

    d = TrainConfig()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    g = parser.add_argument_group("what to run")
    g.add_argument("--task", default=d.task, help="charlm: a character-level transformer on the standard library's "
                   "sources, split by file (default)")
    g.add_argument("--mode", default=d.mode, choices=MODES,
                   help="diloco (default) or dataparallel: the baseline that averages gradients every inner step")
    g.add_argument("--participants", type=int, default=d.participants, help=f"ranks, one per participant (default {d.participants})")
    g.add_argument("--nproc", type=int, default=None,
                   help="spawn this many local ranks (default: --participants; under torchrun: none)")
    g.add_argument("--rule", default=d.rule, help="aggregation rule, or comma-separated rules to run in turn (default mean)")
    g.add_argument("--f", type=int, default=None, help="f handed to the rule (default: the number of Byzantine participants)")
    g.add_argument("--tau", type=_float, default=d.tau, help=f"centered_clipping radius (default {d.tau})")
    g.add_argument("--codec", default="none", help="none (float32), fp16, bf16, int8 or int4 on the wire (default none)")
    g.add_argument("--block", type=int, default=d.block, help=f"int8/int4 values per scale (default {d.block})")
    g.add_argument("--attack", default="none", help="attack, or comma-separated attacks: " + ", ".join(
        a for a in ATTACKS if a != "labelflip") + " (default none)")
    g.add_argument("--byzantine", type=_float, default=None,
                   help="fraction of participants that are Byzantine (default 0.25 with an attack, else 0)")
    for att in ATTACKS.values():
        if att.param:
            g.add_argument(f"--{att.name}-{att.param}", type=_float, default=None,
                           help=f"{att.help} (default {'auto' if att.default is None else att.default})")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--out", default="out/train", metavar="DIR",
                   help="checkpoints, results.json, results.md, loss.png (default out/train)")
    g.add_argument("--resume", action="store_true",
                   help="continue every run from its checkpoint in --out (the same configuration; --outer-steps may grow)")
    g.add_argument("--timeout", type=_float, default=d.timeout,
                   help=f"seconds a rank waits for a peer before failing (default {d.timeout:g})")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    t = parser.add_argument_group("DiLoCo")
    t.add_argument("--inner-steps", type=int, default=d.inner_steps, help=f"H, AdamW steps per outer step (default {d.inner_steps})")
    t.add_argument("--outer-steps", type=int, default=d.outer_steps, help=f"(default {d.outer_steps})")
    t.add_argument("--outer", default=d.outer, help=f"outer optimizer, a tapestry.optim name (default {d.outer})")
    t.add_argument("--outer-lr", type=_float, default=None, help="(default: the optimizer's; nesterov 0.7)")
    t.add_argument("--outer-momentum", type=_float, default=None, help="(default: the optimizer's; nesterov 0.9)")
    t.add_argument("--lr", type=_float, default=d.lr, help=f"inner AdamW learning rate (default {d.lr})")
    t.add_argument("--warmup", type=int, default=d.warmup, help=f"inner steps of linear lr warmup (default {d.warmup})")
    t.add_argument("--weight-decay", type=_float, default=d.weight_decay, help=f"(default {d.weight_decay})")
    t.add_argument("--clip", type=_float, default=d.clip, help=f"inner gradient-norm clip, 0 for none (default {d.clip})")
    t.add_argument("--batch-size", type=int, default=d.batch_size, help=f"windows per inner step (default {d.batch_size})")
    m = parser.add_argument_group("model and data")
    m.add_argument("--context", type=int, default=d.context, help=f"characters per window (default {d.context})")
    m.add_argument("--width", type=int, default=d.width, help=f"(default {d.width})")
    m.add_argument("--layers", type=int, default=d.layers, help=f"(default {d.layers})")
    m.add_argument("--heads", type=int, default=d.heads, help=f"(default {d.heads})")
    m.add_argument("--files", type=int, default=d.files, help=f"standard-library files per participant (default {d.files})")
    m.add_argument("--chars-per-file", type=int, default=d.chars_per_file, help=f"(default {d.chars_per_file})")
    p = parser.add_argument_group("differential privacy on the outer step (docs/privacy.md; rule mean, no --codec)")
    p.add_argument("--dp", default=None, metavar="central|distributed",
                   help="central: each pseudo-gradient clipped to --dp-clip by its whole L2 norm, Gaussian noise "
                        "on the sum (the ranks see each other's updates); distributed: each rank clips, rotates, "
                        "rounds and adds its own share of discrete noise, masked (X25519 pairwise masks) so that "
                        "the ranks see only the noised sum. Epsilon accounted after every outer step")
    p.add_argument("--epsilon", default=None, metavar="E[,E...]",
                   help="privacy budget of the whole run at --delta; a list runs each; inf is the non-private run "
                        "(exactly the run without --dp, for both mechanisms)")
    p.add_argument("--delta", type=_float, default=d.dp_delta, help=f"(default {d.dp_delta}; below 1/participants)")
    p.add_argument("--dp-clip", type=_float, default=d.dp_clip,
                   help=f"L2 clip of each pseudo-gradient (default {d.dp_clip})")
    p.add_argument("--dp-adaptive", action="store_true",
                   help="central: adapt the clip toward the median norm (Andrew et al. 2021)")
    p.add_argument("--dp-bits", type=int, default=d.dp_bits,
                   help=f"distributed: the ring Z_2^b of the masked sum, 2..32 (default {d.dp_bits})")
    p.add_argument("--dp-mechanism", default=d.dp_mechanism, choices=["dgauss", "skellam"],
                   help=f"distributed: discrete Gaussian or Skellam noise shares (default {d.dp_mechanism})")


def configs_from(args) -> list:
    """Every run of the command, each validated (before any process starts)."""
    from ..federated.attacks import get_attack
    from ..federated.cli import _epsilons
    from .config import TrainConfig, validate

    rules = [r.strip() for r in args.rule.split(",") if r.strip()]
    attacks = [a.strip() for a in args.attack.split(",") if a.strip()]
    if not rules or not attacks:
        raise ValueError("--rule and --attack need at least one name each")
    codec = None if args.codec in ("none", "float32", "") else args.codec
    out = []
    for attack in attacks:
        att = get_attack(attack)
        byz = args.byzantine if args.byzantine is not None else (0.0 if attack == "none" else 0.25)
        strength = getattr(args, f"{att.name}_{att.param}", None) if att.param else None
        for rule, eps in [(r, e) for r in rules for e in _epsilons(args)]:
            cfg = TrainConfig(
                task=args.task, mode=args.mode, participants=args.participants, inner_steps=args.inner_steps,
                outer_steps=args.outer_steps, outer=args.outer, outer_lr=args.outer_lr,
                outer_momentum=args.outer_momentum, rule=rule, f=args.f, tau=args.tau, codec=codec, block=args.block,
                attack=attack, byzantine=byz, strength=strength, lr=args.lr, warmup=args.warmup,
                weight_decay=args.weight_decay, clip=args.clip, batch_size=args.batch_size, context=args.context,
                width=args.width, layers=args.layers, heads=args.heads, files=args.files,
                chars_per_file=args.chars_per_file, seed=args.seed, timeout=args.timeout, dp=args.dp,
                dp_epsilon=eps, dp_delta=args.delta, dp_clip=args.dp_clip, dp_adaptive=args.dp_adaptive,
                dp_bits=args.dp_bits, dp_mechanism=args.dp_mechanism)
            validate(cfg)
            out.append(cfg)
    labels = [c.label for c in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--mode {args.mode} runs the same configuration twice: {labels}")
    return out


def run(args) -> int:
    from ..distributed import launch
    from . import checkpoint
    from .loop import TrainJob, train_rank

    configs = configs_from(args)
    torchrun = launch.under_torchrun()
    if torchrun and args.nproc not in (None, 1):
        raise ValueError("--nproc is for local runs; under torchrun use --nproc-per-node")
    world = int(os.environ.get("WORLD_SIZE", "1")) if torchrun else (args.nproc or args.participants)
    if world != args.participants:
        raise ValueError(f"{world} ranks for --participants {args.participants}: every participant is one rank")
    rank = int(os.environ.get("RANK", "0")) if torchrun else 0
    if rank == 0:
        from ..federated.cli import _check_out

        _check_out(args.out)
    if args.resume:
        for cfg in configs:  # refused here, before any rank starts
            checkpoint.load(checkpoint.path_for(args.out, cfg), cfg)
    records = []
    for cfg in configs:
        job = TrainJob(cfg, out=args.out, resume=args.resume, progress=not args.quiet)
        rec = launch.run(job, nproc=1 if torchrun else world, device="cpu", target=train_rank,
                         timeout=datetime.timedelta(seconds=cfg.timeout))
        if rank == 0:
            records.append(rec)
    if rank == 0:
        write_results(args.out, records, sys.argv[1:])
    return 0


# -- results ---------------------------------------------------------------------------------------

def _label(r) -> str:
    if r.mode == "dataparallel":
        return "data-parallel"
    name = r.rule if r.codec == "float32" else f"{r.rule} ({r.codec})"
    if not r.config.get("dp"):
        return name
    return f"{name} {'distributed ' if r.config['dp'] == 'distributed' else ''}dp eps={float(r.config['dp_epsilon']):g}"


def _ns(doc: dict) -> SimpleNamespace:
    """A run of results.json as the object the shared table and plot helpers read."""
    nan = float("nan")
    return SimpleNamespace(**{**doc, "loss": [nan if v is None else v for v in doc["loss"]],
                              "accuracy": [nan if v is None else v for v in doc["accuracy"]]})


def _mib(b: int) -> str:
    return f"{b / 2 ** 20:.2f}"


def markdown(runs: list[SimpleNamespace]) -> str:
    from ..federated.report import summary_markdown
    from ..privacy.report import epsilon_line

    lines = [summary_markdown(runs, "loss", label=_label), "",
             "| run | attack | Byzantine ranks | final held-out loss | MiB sent per participant | seconds | inner steps |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        final = r.loss[-1]
        lines.append(f"| {_label(r)} | {r.attack} | {r.byzantine_ranks or '-'} | "
                     f"{'nan' if math.isnan(final) else f'{final:.4f}'} | {_mib(r.bytes_sent)}"
                     f"{' (ring model)' if r.mode == 'dataparallel' else ''} | {r.seconds:.1f} | {r.inner_steps_total} |")
    private = [SimpleNamespace(rule=_label(r), privacy=r.privacy) for r in runs if getattr(r, "privacy", None)]
    if private:
        lines += [""] + ["- " + epsilon_line(r) for r in private]
    c = runs[0].config
    lines += ["", f"charlm: {c['participants']} participants, {c['files']} files each, H = {c['inner_steps']} inner "
              f"steps, {c['outer_steps']} outer steps ({c['outer']}), model width {c['width']}, {c['layers']} layers, "
              f"context {c['context']}, batch {c['batch_size']}, inner AdamW lr {c['lr']}, seed {c['seed']}"]
    return "\n".join(lines)


def write_results(out: str, records: list, command: list[str]) -> None:
    from ..federated.report import plot

    path = os.path.join(out, "results.json")
    runs = []
    if os.path.exists(path):
        with open(path) as fh:
            runs = json.load(fh).get("runs", [])
    fresh = [r.to_json() for r in records]
    names = {r["label"] for r in fresh}
    runs = [r for r in runs if r.get("label") not in names] + fresh
    for r in fresh:
        r["command"] = command
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump({"task": "charlm", "runs": runs}, fh, indent=1, allow_nan=False)
    os.replace(tmp, path)
    ns = [_ns(r) for r in runs]
    md = markdown(ns)
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(md + "\n")
    # the y axis from the best loss to the initial one: a diverging run leaves the plot, its final loss in its label
    finite = [v for r in ns for v in r.loss if math.isfinite(v)] or [0.0]
    top = 1.05 * max(r.initial_loss for r in ns)
    ylim = (0.95 * min(finite), top)

    def label(r):
        final = r.loss[-1]
        return _label(r) + ("" if final <= top else f" (final {final:.3g})")
    plot(ns, "loss", os.path.join(out, "loss.png"), label=label, xlabel="outer step", ylim=ylim)
    print(md, flush=True)
    print(f"wrote {out}/results.json, results.md, loss.png", file=sys.stderr)
