"""Validated command-line numbers and optional dependencies, shared by every subcommand.

Each factory returns an argparse ``type=`` function: a value outside its range is an
``argparse.ArgumentTypeError``, which argparse prints as ``error: argument --flag: ...`` (the flag
named, the accepted range given) and exit status 2, before any work starts. Ranges are closed
unless ``lo_open``/``hi_open``; NaN is never accepted, infinities only where the range ends at one.

    parser.add_argument("--lr", type=float_in(0, 1e3, lo_open=True))
    parser.add_argument("--clients", type=int_in(1, 10_000))
    parser.add_argument("--memory-budget", type=size_in(1 << 20, 1 << 50))
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import re
from collections.abc import Callable

__all__ = ["int_in", "float_in", "size_in", "parse_size", "require_modules", "MissingDependency"]


def _interval(lo, hi, lo_open: bool, hi_open: bool) -> str:
    return f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    """An integer in ``[lo, hi]`` (written as an integer: ``1e9`` is refused, not rounded)."""
    def parse(text: str) -> int:
        try:
            value = int(text.strip().replace("_", ""), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text[:40]!r} (accepted: integers in [{lo}, {hi}])") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text[:40]} is out of range: must be an integer in [{lo}, {hi}]")
        return value
    parse.__name__ = "integer"
    return parse


def float_in(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Callable[[str], float]:
    """A number in the interval ``lo..hi`` (open ends as asked); never NaN."""
    where = _interval(lo, hi, lo_open, hi_open)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text[:40]!r} (accepted: {where})") from None
        ok = (not math.isnan(value) and (value > lo if lo_open else value >= lo)
              and (value < hi if hi_open else value <= hi))
        if not ok:
            raise argparse.ArgumentTypeError(f"{text[:40]} is out of range: must be a number in {where}")
        return value
    parse.__name__ = "number"
    return parse


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """``"512M"``, ``"1.5GiB"``, ``"1000000"`` -> bytes (K/M/G/T are powers of 1024); any size."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text[:40]!r} (examples: 512M, 2G, 1000000)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text[:40]} is not a finite size")
    return int(value)


def size_in(lo: int, hi: int) -> Callable[[str], int]:
    """A byte size (``512M``, ``2G``) in ``[lo, hi]`` bytes."""
    def parse(text: str) -> int:
        value = parse_size(text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text[:40]} is out of range: must be a size in [{_human(lo)}, {_human(hi)}]")
        return value
    parse.__name__ = "size"
    return parse


def _human(b: int) -> str:
    for unit, scale in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if b >= scale and b % scale == 0:
            return f"{b // scale}{unit}"
    return str(b)


class MissingDependency(ValueError):
    """An optional dependency that this command needs is not installed (the message says how)."""


def require_modules(needed: dict[str, str], why: str) -> None:
    """Raise :class:`MissingDependency` unless every module in ``needed`` (name -> install
    command) can be imported; called before any work, so a run never fails at its end."""
    missing = [(name, cmd) for name, cmd in needed.items() if importlib.util.find_spec(name) is None]
    if missing:
        names = ", ".join(n for n, _ in missing)
        cmds = "; ".join(dict.fromkeys(c for _, c in missing))
        raise MissingDependency(f"{why} needs {names}, which is not installed: {cmds}")
