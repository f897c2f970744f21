"""The one base class of every error a user of the project is meant to read.

Contract: ``str(error)`` is one line that names the problem and the fix (a file, an argument, a
command to run). Library code raises its own subclasses; the scripts catch :class:`ACNetError` once
and print ``SCRIPT: error: message`` (no traceback). Anything else that escapes is a bug.
"""
from __future__ import annotations

from typing import Optional

__all__ = ["ACNetError", "WeightsError", "NonFiniteWeightsError", "BlockTypeNotApplicableError", "exception_line"]


class ACNetError(Exception):
    """Base of every user-facing error (acnet and the framework around it): a one-line, actionable message."""


class WeightsError(ACNetError, RuntimeError):
    """A weights file or state dict cannot be used: missing, corrupt, unsafe or not matching the model."""


class NonFiniteWeightsError(WeightsError):
    """Weights holding NaN or inf (a diverged run's): refused before anything is computed or written."""


class BlockTypeNotApplicableError(ACNetError, ValueError):
    """``-b TYPE`` on an architecture none of whose convs the block type's rule takes (one line, with the archs
    it fits): a refusal, nothing is written."""


def exception_line(exc: BaseException, *, whole: bool = False, sentence: bool = False, type_name: bool = False,
                   limit: Optional[int] = None) -> str:
    """``exc`` as one line to quote in a message: its first non-empty line (``whole``: all its lines joined,
    whitespace collapsed); ``sentence``: only up to the first ``". "``; ``type_name``: as ``Type: text``
    (a trailing colon dropped); at most ``limit`` characters (``...`` marks a cut for a limit of 4 or more).
    An exception without text is its type name."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = " ".join(" ".join(lines).split()) if whole else lines[0]
    if sentence:
        text = text.split(". ")[0]
    if type_name:
        text = f"{type(exc).__name__}: {text}".rstrip(": ")
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..." if limit >= 4 else text[:limit]
    return text
