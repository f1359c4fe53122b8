"""Types for the command-line options of every `flead` command: a number out of range is refused by argparse with
the option's name and the reason, before anything starts (not a crash, or a silent surprise, later)."""
from __future__ import annotations

import argparse
import math
from typing import Callable


def _ranged(kind: type, name: str, ok: Callable[[float], bool], reason: str) -> Callable[[str], float]:
    def parse(text: str):
        value = kind(text)  # ValueError: argparse says "invalid <name> value"
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} {reason}")
        return value
    parse.__name__ = name
    return parse


def positive(kind: type = float) -> Callable[[str], float]:
    """A number above 0 (a rate, a batch size, seconds to wait)."""
    return _ranged(kind, f"positive {kind.__name__}", lambda v: v > 0 and math.isfinite(v), "is not above 0")


def non_negative(kind: type = int) -> Callable[[str], float]:
    """A number of 0 or more (a count where 0 means none, or all)."""
    return _ranged(kind, f"non-negative {kind.__name__}", lambda v: v >= 0 and math.isfinite(v),
                   "is negative: give 0 or more")


share = _ranged(float, "share", lambda v: 0 <= v <= 1, "is not between 0 and 1")
"""A fraction from 0 to 1."""
