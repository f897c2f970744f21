"""The errors the data package raises: one clear message naming the problem and the fix."""
from __future__ import annotations

from acnet.errors import ACNetError

__all__ = ["DatasetError", "DatasetArgumentError"]


class DatasetError(ACNetError, RuntimeError):
    """A dataset is missing, empty, corrupt or cannot be downloaded."""


class DatasetArgumentError(DatasetError, ValueError):
    """An argument of the data package is invalid (unknown dataset, bad batch size, rank, ...)."""
