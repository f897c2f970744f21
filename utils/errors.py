"""The framework's user-facing errors and the one way a script reports them.

Every error a user is meant to read derives from :class:`acnet.errors.ACNetError` (``str(error)`` is
one line naming the problem and the fix). The framework adds :class:`UsageError`, a command line that
cannot run (nothing is written; exit status 2). A script catches :data:`USER_ERRORS` once and calls
:func:`report_error`, which prints ``SCRIPT: error: message`` on stderr, argparse-style.
"""
from __future__ import annotations

import sys
from typing import NoReturn

from acnet.errors import ACNetError

__all__ = ["ACNetError", "UsageError", "TrainingSetupError", "USER_ERRORS", "report_error", "exit_with_error"]


class UsageError(ACNetError):
    """A command line (or an argument of a framework call) that cannot run; nothing was written."""


class TrainingSetupError(UsageError, ValueError):
    """The model, data and recipe cannot train together (e.g. no full batch per rank)."""


#: What a script reports in one line instead of a traceback (``data.DatasetError`` derives from the base too).
USER_ERRORS: tuple[type[Exception], ...] = (ACNetError,)


def report_error(prog: str, error: object, status: int = 2) -> int:
    """Print ``PROG: error: ERROR`` on stderr and return ``status`` (for ``return report_error(...)`` in a main)."""
    print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
    return status


def exit_with_error(prog: str, error: object, status: int = 2) -> NoReturn:
    """:func:`report_error`, then exit with ``status``."""
    raise SystemExit(report_error(prog, error, status))
