"""Value types for argparse: each turns a word into a value or says in one line why it cannot."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return number

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def float_where(allowed: Callable[[float], bool], requirement: str) -> Callable[[str], float]:
    """A float parser that refuses numbers outside ``allowed`` with ``requirement`` in the message."""

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
        if not allowed(number):  # NaN fails every comparison, so it is refused too
            raise argparse.ArgumentTypeError(f"{requirement}, got {value}")
        return number

    return parse


positive_float = float_where(lambda number: number > 0, "must be > 0")
ratio = float_where(lambda number: 0.0 < number <= 1.0, "ratio must be in (0, 1]")  # a keep ratio
non_negative_float = float_where(
    lambda number: 0.0 <= number < float("inf"), "must be a finite number >= 0"
)  # a noise scale
