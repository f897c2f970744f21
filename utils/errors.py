"""The framework's user-facing errors and the one way a script reports them.

Every error a user is meant to read derives from :class:`acnet.errors.ACNetError` (``str(error)`` is
one line naming the problem and the fix). The framework adds :class:`UsageError`, a command line that
cannot run (nothing is written; exit status 2). A script catches :data:`USER_ERRORS` once and calls
:func:`report_error`, which prints ``SCRIPT: error: message`` on stderr, argparse-style;
:func:`exit_status` says which status an error ends with. The scripts' parsers are
:class:`OneLineUsageParser` s: a refused command line prints a one-line usage hint and the error line,
not argparse's whole usage (``-h`` still prints everything).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from acnet.errors import ACNetError, BlockTypeNotApplicableError, NonFiniteWeightsError
from acnet.fileio import UnwritablePathError

__all__ = ["ACNetError", "UsageError", "TrainingSetupError", "USER_ERRORS", "REFUSALS", "exit_status",
           "report_error", "exit_with_error", "OneLineUsageParser"]


class UsageError(ACNetError):
    """A command line (or an argument of a framework call) that cannot run; nothing was written."""


class TrainingSetupError(UsageError, ValueError):
    """The model, data and recipe cannot train together (e.g. no full batch per rank)."""


#: What a script reports in one line instead of a traceback (``data.DatasetError`` derives from the base too).
USER_ERRORS: tuple[type[Exception], ...] = (ACNetError,)

#: Errors that end a command with exit status 2, like a bad argument: the command as given cannot run
#: (a bad command line, weights holding NaN / inf, an output place that cannot be written or is full, a
#: block type that fits no conv of the arch);
#: what was saved before is intact. Other :data:`USER_ERRORS` (missing data, a corrupt resumable state,
#: a diverged run, ...) end with status 1.
REFUSALS: tuple[type[Exception], ...] = (UsageError, NonFiniteWeightsError, UnwritablePathError,
                                         BlockTypeNotApplicableError)


def exit_status(error: BaseException) -> int:
    """The exit status a script ends with on ``error``: 2 for :data:`REFUSALS`, else 1."""
    return 2 if isinstance(error, REFUSALS) else 1


def report_error(prog: str, error: object, status: int = 2) -> int:
    """Print ``PROG: error: ERROR`` on stderr and return ``status`` (for ``return report_error(...)`` in a main)."""
    print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
    return status


def exit_with_error(prog: str, error: object, status: int = 2) -> NoReturn:
    """:func:`report_error`, then exit with ``status``."""
    raise SystemExit(report_error(prog, error, status))


class OneLineUsageParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose refusals are two lines on stderr, status 2::

        usage: do_acnet.py -a ARCH -b BLOCK [options]; see -h
        do_acnet.py: error: argument --epochs: invalid int value: 'x'

    ``short_usage`` is the first line's command part (default: the program name); ``-h`` prints the
    full usage and help as usual.
    """

    def __init__(self, *args: Any, short_usage: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.short_usage = short_usage or f"{self.prog} [options]"

    def usage_hint(self) -> str:
        return f"usage: {self.short_usage}; see -h"

    def print_usage_hint(self, file: Any = None) -> None:
        print(self.usage_hint(), file=file or sys.stderr, flush=True)

    def error(self, message: str) -> NoReturn:
        self.print_usage_hint()
        exit_with_error(self.prog, message, 2)
