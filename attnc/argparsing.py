"""The argument parser every attnc command uses: usage errors on one line, like every other
attnc message (attnc/cli.py and attnc/bench/cli.py share it)."""

from __future__ import annotations

import argparse
import typing


class Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as one line (and where the full usage is) instead of
    the usage block: the same shape as every other attnc message; options only by their full
    names (an abbreviation such as `--repeat` for `--repeat-processes` is an error: the bench
    passes its own options on to child processes by name)."""

    def __init__(self, *args: typing.Any, **kwargs: typing.Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        """Print `PROG: error: MESSAGE (see PROG --help)` and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
