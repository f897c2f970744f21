"""Atomic file writing: the one place every file the project writes goes through.

A writer works on a temporary file in the destination's directory; only when it finishes without
an exception is the temporary file flushed, fsync'ed and renamed over the destination
(``os.replace`` is atomic on POSIX and Windows). A crash or kill at any moment therefore leaves
either the previous complete file or the new complete file, never a partial one.

A destination that cannot be written (a read-only file system, a parent that is a file, no
permission, a full disk) raises :class:`UnwritablePathError`, an ``OSError`` whose message is one
line naming the path and the reason; nothing is left behind.
"""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator, Union

from .errors import ACNetError

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["atomic_path", "atomic_open", "ensure_writable_dir", "UnwritablePathError"]


class UnwritablePathError(ACNetError, OSError):
    """An output path that cannot be written; ``str()`` is one line: the path and the reason."""

    def __init__(self, path: PathLike, cause: OSError):
        super().__init__(cause.errno, cause.strerror)
        self.path = Path(path)
        self.cause = cause

    def __str__(self) -> str:
        reason = self.cause.strerror or str(self.cause) or type(self.cause).__name__
        blocking_file = next((p for p in self.path.parents if p.is_file()), None)
        if self.cause.errno in (errno.ENOTDIR, errno.EEXIST) and blocking_file is not None:
            reason = f"'{blocking_file}' is a file, not a directory"
        else:
            culprit = getattr(self.cause, "filename", None)
            if culprit is not None and Path(culprit) != self.path and not Path(culprit).name.startswith("."):
                reason += f": '{culprit}'"  # the parent that could not be made (not our temporary file)
        return f"cannot write '{self.path}': {reason}"


def ensure_writable_dir(path: PathLike) -> Path:
    """Create directory ``path`` (and its parents) if needed and check a file can be created in it.

    Raises :class:`UnwritablePathError` (one line: the path and the reason) otherwise; leaves no file.
    """
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=str(directory))
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise UnwritablePathError(directory, exc) from None
    return directory


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yield a temporary file name next to ``path``; rename it onto ``path`` on success.

    For writers that want a file name (h5py, ``torch.save``). On an exception the temporary file
    is removed and ``path`` is left untouched.
    """
    dest = Path(path)
    if dest.is_dir():
        raise UnwritablePathError(dest, IsADirectoryError(errno.EISDIR, "it is a directory, give a file name"))
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=str(dest.parent))
    except OSError as exc:
        raise UnwritablePathError(dest, exc) from None
    os.close(fd)
    try:
        # mkstemp creates the file 0600; give it the permissions a plain open() would have.
        os.chmod(tmp, 0o666 & ~_current_umask())
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, UnwritablePathError) and exc.errno in _NO_SPACE_OR_ACCESS:
            raise UnwritablePathError(dest, exc) from None
        raise


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file for writing (``"w"`` or ``"wb"``); it replaces ``path`` on success."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()


# Errors of writing the temporary file or renaming it that are about the place, not the writer.
_NO_SPACE_OR_ACCESS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO,
                       errno.EISDIR, errno.ENOTDIR, errno.EXDEV}


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (best effort; not supported on every platform)."""
    try:
        fd = os.open(str(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
