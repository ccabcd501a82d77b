"""``tapestry aggregate``: client update files in, one aggregate file out, streamed and sharded.

    tapestry aggregate --rule trimmed_mean --f 2 clients/*.safetensors -o global.safetensors
    tapestry aggregate --rule krum --f 2 --nproc 2 clients/*.safetensors -o global.safetensors
    torchrun --nproc-per-node 4 -m tapestry aggregate --rule median clients/*.safetensors -o out.safetensors

The output holds every input key with its own dtype (the aggregate is computed in float32 and cast
back per key). ``--memory-budget`` bounds each process's working memory (see
:mod:`tapestry.distributed.memory` for the model); fixed interpreter and library overhead comes on top.
"""

from __future__ import annotations

import argparse
import re
import sys

from ..aggregators.coordinate import Mean
from ..cli_args import float_in, int_in, size_in
from ..cli_args import parse_size as _parse_size

HELP = ("aggregate client update files (safetensors, .pt, compressed payloads) into one safetensors file with "
        "each key's input dtype, streamed under a memory budget and sharded over processes")

MAX_CLIENTS = 1_000_000
MAX_NPROC = 1024


def parse_size(text: str) -> int:
    """``"512M"``, ``"1.5GiB"``, ``"1000000"`` -> bytes (K/M/G/T are powers of 1024)."""
    return _parse_size(text)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="FILE", help="client updates: .safetensors, .pt (weights only) or Tapestry compressed payloads")
    parser.add_argument("-o", "--output", required=True, help="aggregate file to write (safetensors)")
    parser.add_argument("--rule", required=True,
                        help="mean, trimmed_mean, median, krum, multi_krum, bulyan, geometric_median, "
                             "centered_clipping, or nnm+<rule>")
    parser.add_argument("--f", type=int_in(0, MAX_CLIENTS), help="Byzantine clients tolerated")
    parser.add_argument("--beta", type=float_in(0, 0.5, hi_open=True), help="trimmed_mean: fraction trimmed at each end")
    parser.add_argument("--m", type=int_in(1, MAX_CLIENTS), help="multi_krum: number of updates averaged")
    parser.add_argument("--tau", type=float_in(0, 1e300, lo_open=True), help="centered_clipping: clipping radius")
    parser.add_argument("--weights", help="mean: comma-separated client weights (e.g. example counts)")
    parser.add_argument("--memory-budget", type=size_in(1, 1 << 50), default=parse_size("1G"),
                        help="working memory per process (default 1G; K/M/G = powers of 1024)")
    parser.add_argument("--nproc", type=int_in(1, MAX_NPROC), default=1, help="spawn this many local processes (gloo, or NCCL on GPUs)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where kernels run (auto: CUDA when a GPU is visible)")
    parser.add_argument("--read-ahead", action="store_true",
                        help="read the next chunk in a helper thread while aggregating (costs a second block "
                             "buffer; helps only where cores are free)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _rule(args):
    from ..aggregators import NNM, RULES, make_rule

    params = {k: getattr(args, k) for k in ("f", "beta", "m", "tau") if getattr(args, k) is not None}
    try:
        if args.rule.startswith("nnm+") and args.rule[4:] in RULES:
            # NNM takes --f; the inner rule gets it only if it takes an f of its own
            import inspect

            if "f" not in params:
                raise ValueError(f"rule {args.rule!r} needs --f")
            inner = {k: v for k, v in params.items()
                     if k != "f" or "f" in inspect.signature(RULES[args.rule[4:]]).parameters}
            return NNM(params["f"], make_rule(args.rule[4:], **inner))
        return make_rule(args.rule, **params)
    except KeyError as exc:  # nnm+<rule> without f
        raise ValueError(f"rule {args.rule!r} needs --{exc.args[0]}") from None
    except TypeError as exc:
        missing = re.search(r"missing \d+ required positional argument: '(\w+)'", str(exc))
        if missing:
            raise ValueError(f"rule {args.rule!r} needs --{missing.group(1)}") from None
        raise ValueError(f"rule {args.rule!r} does not take {', '.join('--' + k for k in params)} ({exc})") from None


def _weights(args, n: int):
    if args.weights is None:
        return None
    if args.rule != "mean":
        raise ValueError("--weights applies to --rule mean only")
    try:
        w = [float(x) for x in args.weights.split(",")]
    except ValueError:
        raise ValueError(f"--weights must be comma-separated numbers, got {args.weights!r}") from None
    if len(w) != n:
        raise ValueError(f"--weights has {len(w)} values for {n} input files")
    for i, x in enumerate(w):
        if not (x >= 0 and x < float("inf")):
            raise ValueError(f"--weights: weight {i} ({args.inputs[i]}) is {x}; weights must be finite and >= 0")
    return w


def run(args) -> int:
    from . import launch
    from .job import Job

    rule = _rule(args)
    weights = _weights(args, len(args.inputs))
    if weights is not None:
        from ..aggregators.coordinate import normalised_weights

        normalised_weights(weights, len(args.inputs))  # checked here, normalised once by the rule
        rule = _WeightedMean(weights)
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    job = Job(list(args.inputs), args.output, rule, args.memory_budget, progress=not args.no_progress,
              read_ahead=args.read_ahead)
    result = launch.run(job, nproc=args.nproc, device=args.device)
    if result is None:  # a non-zero torchrun rank
        return 0
    info = result.info
    line = (f"{info.rule}: {result.n} clients x {result.d} values -> {args.output} "
            f"({result.bytes_read / 2**20:.1f} MiB read in {result.seconds:.2f} s, "
            f"{result.bytes_read / max(result.seconds, 1e-9) / 1e9:.2f} GB/s)")
    print(line)
    if info.selected is not None:
        print("selected: " + ", ".join(f"{i} ({args.inputs[i]})" for i in info.selected))
    if info.nonfinite:
        print("non-finite values in: " + ", ".join(f"{i} ({args.inputs[i]})" for i in info.nonfinite), file=sys.stderr)
    return 0


class _WeightedMean(Mean):
    """FedAvg with fixed, already normalised weights (``--weights``): streams like ``mean``
    (module level, so that spawned ranks can unpickle it)."""

    name = "mean"

    def __init__(self, w):
        self.w = w

    def aggregate(self, src, *, want_info):
        return super().aggregate(src, want_info=want_info, weights=self.w)
