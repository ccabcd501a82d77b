"""``tapestry simulate | aggregate | train | bench | info`` (also ``python -m tapestry ...``).

Each subcommand lives in the module that owns its work and provides ``HELP``,
``configure(parser)`` and ``run(args) -> int``; this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "simulate": "tapestry.federated.cli",
    "aggregate": "tapestry.distributed.cli",
    "train": "tapestry.train.cli",
    "bench": "tapestry.bench",
    "info": "tapestry.info",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tapestry", description="Robust, compressed and secure aggregation for federated training")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.configure(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's "error:" line (a flag out of range...) or --help, printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(args._run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, PermissionError) as exc:
        print(f"tapestry {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"tapestry {args.command}: error: out of memory (an input or a setting needs more memory than "
              f"this machine has; see --memory-budget)", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM where a command turns it into one
        code = getattr(exc, "exit_code", 130)
        print(f"tapestry {args.command}: {'terminated' if code == 143 else 'interrupted'}", file=sys.stderr)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
