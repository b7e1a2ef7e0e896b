"""What the three command lines (``python -m moco``, ``exports``, ``indexer``) share.

The house rule for every command line: bad input prints one line and exits with code 2, never
a usage block or a traceback. :class:`OneLineParser` does that for what argparse finds,
:class:`UsageError` for what a command finds after parsing, and the argument types below turn a
bad value into that one line with the reason (``expected a number >= 1, got 0``).

Standard library only: part of the torch-free base that ``moco`` and ``exports`` import, and
imported before ``--help`` answers, so it must cost nothing.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn, TypeVar

__all__ = ["DEVICES", "HelpFormatter", "OneLineParser", "UsageError", "fraction", "from_parser", "positive_int",
           "similarity"]

T = TypeVar("T")

DEVICES = ("auto", "cpu", "cuda")
"""The values of every ``--device`` option: auto picks CUDA where it really works (see :mod:`indexer.runtime`)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (exit 2) instead of the whole usage block.

    Pass it as ``parser_class`` to ``add_subparsers`` too, so sub-commands do the same."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Wraps a one-paragraph description to the terminal but keeps text with line breaks (the
    examples of an epilog) as written; neither of argparse's own formatters does both."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class UsageError(Exception):
    """Bad input found after parsing (a missing folder, options that contradict each other):
    the command prints it as one line and exits with code 2."""


def from_parser(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse ``type`` from a function that raises ValueError with a one-line reason, so the
    user sees that reason instead of argparse's ``invalid <function> value``."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _number(text: str, kind: Callable[[str], T], expected: str) -> T:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def positive_int(text: str) -> int:
    """A whole number >= 1 (counts, batch sizes, threads)."""
    value = _number(text, int, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1] (overlaps, shares)."""
    value = _number(text, float, "a number in [0, 1]")
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def similarity(text: str) -> float:
    """A cosine similarity threshold in (-1, 1]: -1 would call every pair a match."""
    value = _number(text, float, "a similarity in (-1, 1]")
    if not -1.0 < value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a similarity in (-1, 1], got {value}")
    return value
