"""
What every command line here shares: a parser whose every error is one line and exit code 2, and
argparse types that refuse an out-of-range number with a message that says what is allowed.
"""

import argparse
import math
from pathlib import Path


class UsageError(Exception):
    """A mistake on a command line found outside the parser: one line and exit code 2 there too."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """A mistake on the command line: one line and exit code 2, as every other user error."""
        self.exit(2, f"{self.prog.removesuffix('.py')}: error: {message}\n")


def number(kind, low, low_ok=False, high=None):
    """An argparse type: a number of `kind` above `low` (or equal to it, with low_ok), and at most
    `high`.
    """

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            )
        in_range = (
            (value > low or (low_ok and value == low))
            and (high is None or value <= high)
            and math.isfinite(value)  # NaN is in no range; inf would train a NaN model
        )
        if not in_range:
            allowed = (
                f"in [{low}, {high}]"
                if high is not None and low_ok
                else "0 or more"
                if low_ok
                else "positive"
            )
            allowed += f" and at most {high}" if high is not None and not low_ok else ""
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text}")
        return value

    return parse


POSITIVE = number(int, 0)  # 1, 2, ...
COUNT = number(int, 0, low_ok=True)  # 0, 1, 2, ...
FRACTION = number(float, 0, low_ok=True, high=1)  # [0, 1]
# Sizes past these can only be typos, and would be paid for in memory before anything else went
# wrong
LENGTH = number(int, 0, high=2**20)  # tokens per example: no model reads a million positions
SAMPLES = number(int, 0, low_ok=True, high=10_000)  # k of Avg@k: generation's memory grows with it
SEED = number(int, 0, low_ok=True, high=2**32 - 1)  # what every random-number generator takes


def existing(kind):
    """An argparse type: a path that exists, and is a directory (kind 'dir') or a file (kind
    'file').
    """

    def parse(text):
        path = Path(text)
        if not path.exists():
            raise argparse.ArgumentTypeError(f"{text} does not exist")
        if kind == "dir" and not path.is_dir():
            raise argparse.ArgumentTypeError(
                f"{text} is not a directory; pass a Hugging Face checkpoint directory"
            )
        if kind == "file" and not path.is_file():
            raise argparse.ArgumentTypeError(f"{text} is not a file")
        return text

    return parse
