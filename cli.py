"""The command line, the same for every command: argparse errors in one line, and numeric flags checked where they
are parsed, with their range in --help (`error: argument --p-long: got '1.5', expected a number from 0 to 1`).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, as the commands' other errors: `error: argument --p-long: got '1.5',
    expected a number from 0 to 1 (see PROG --help)`; the usage block stays in --help."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


@dataclass(frozen=True)
class Number:
    """The argparse type of a numeric flag: a finite int or float from `low` to `high` (None: unbounded).
    str() says what is accepted, for the flag's --help and its error."""

    kind: type = int
    low: float | None = None
    high: float | None = None
    above: bool = False  # low itself refused: a rate, a share of probability mass (> 0)

    def __str__(self) -> str:
        noun = "an integer" if self.kind is int else "a number"
        low = None if self.low is None else f"{'>' if self.above else '>='} {self.low}"
        if low and self.high is not None:
            return f"{noun} from {self.low} to {self.high}" if not self.above else f"{noun} {low} and <= {self.high}"
        if low or self.high is not None:
            return f"{noun} {low or '<= ' + str(self.high)}"
        return noun

    def __call__(self, text: str):
        try:
            value = self.kind(text)
            low_ok = self.low is None or value > self.low or (value == self.low and not self.above)
            ok = (self.kind is int or math.isfinite(value)) and low_ok and (self.high is None or value <= self.high)
        except ValueError:
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f"got {text!r}, expected {self}")
        return value
