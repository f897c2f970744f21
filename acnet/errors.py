"""The one base class of every error a user of the project is meant to read.

Contract: ``str(error)`` is one line that names the problem and the fix (a file, an argument, a
command to run). Library code raises its own subclasses; the scripts catch :class:`ACNetError` once
and print ``SCRIPT: error: message`` (no traceback). Anything else that escapes is a bug.
"""
from __future__ import annotations

__all__ = ["ACNetError", "WeightsError", "NonFiniteWeightsError"]


class ACNetError(Exception):
    """Base of every user-facing error (acnet and the framework around it): a one-line, actionable message."""


class WeightsError(ACNetError, RuntimeError):
    """A weights file or state dict cannot be used: missing, corrupt, unsafe or not matching the model."""


class NonFiniteWeightsError(WeightsError):
    """Weights holding NaN or inf (a diverged run's): refused before anything is computed or written."""
