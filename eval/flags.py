"""Typed flag values for the evaluation tools' parsers: a number out of range is refused by argparse before
anything is read, naming the flag (``eval_knn: error: argument --ks: must be at least 1, got 0``, exit
status 2), instead of a traceback from deep inside or, worse, a number computed from it (``--temperature
0`` once scored every image as class 0)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def whole(lo: int = 0) -> Callable[[str], int]:
    """An integer of at least ``lo``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {value}")
        return value

    parse.__name__ = "whole number"  # argparse names the type in its own messages
    return parse


def real(
    lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False
) -> Callable[[str], float]:
    """A finite float within [lo, hi]; ``lo_open`` / ``hi_open`` exclude the bound itself."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        low_ok = value > lo if lo_open else value >= lo
        high_ok = value < hi if hi_open else value <= hi
        if not (low_ok and high_ok):
            raise argparse.ArgumentTypeError(
                f"must lie in {_interval(lo, hi, lo_open, hi_open)}, got {value:g}"
            )
        return value

    parse.__name__ = "number"
    return parse


def _interval(lo: float, hi: float, lo_open: bool, hi_open: bool) -> str:
    if hi == math.inf:
        return f"{'>' if lo_open else '>='} {lo:g}" if lo > -math.inf else "the finite numbers"
    return f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


POSITIVE = real(0, lo_open=True)
NON_NEGATIVE = real(0)
PROBABILITY = real(0, 1)
