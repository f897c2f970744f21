"""Atomic file writing: the one place every file the project writes goes through.

A writer works on a temporary file in the destination's directory; only when it finishes without
an exception is the temporary file flushed, fsync'ed and renamed over the destination
(``os.replace`` is atomic on POSIX and Windows). A crash or kill at any moment therefore leaves
either the previous complete file or the new complete file, never a partial one.

A destination that cannot be written (a read-only file system, a parent that is a file, no
permission, a full disk) raises :class:`UnwritablePathError`, an ``OSError`` whose message is one
line naming the path, the reason and what to do; nothing is left behind (the temporary file is
removed, the previous file is intact). :func:`save_torch` is ``torch.save`` through the same path:
torch's own file writer reports a full disk as ``unexpected pos`` with no errno, so the bytes go
through a Python file whose ``OSError`` is kept.
"""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Optional, Union

from .errors import ACNetError

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["atomic_path", "atomic_open", "save_torch", "ensure_writable_dir", "UnwritablePathError"]


class UnwritablePathError(ACNetError, OSError):
    """An output path that cannot be written; ``str()`` is one line: ``cannot write 'PATH': REASON; FIX``.

    ``fix`` (settable by the caller, who knows how to go on: e.g. "run again with -c continue") defaults
    to what the reason calls for: free space on a full disk or quota, a writable place for a read-only
    file system or a permission error, nothing when the reason says it (a parent that is a file).
    """

    def __init__(self, path: PathLike, cause: OSError, fix: Optional[str] = None):
        super().__init__(cause.errno, cause.strerror)
        self.path = Path(path)
        self.cause = cause
        self.fix = fix if fix is not None else _default_fix(self.path, cause.errno)

    @property
    def reason(self) -> str:
        cause = self.cause
        if cause.errno in _REASONS:
            # h5py and others put a multi-line report in strerror; the errno says it in a few words
            reason = _REASONS[cause.errno]
        else:
            reason = (cause.strerror or str(cause) or type(cause).__name__).strip().splitlines()[0]
        blocking_file = next((p for p in self.path.parents if p.is_file()), None)
        if cause.errno in (errno.ENOTDIR, errno.EEXIST) and blocking_file is not None:
            return f"'{blocking_file}' is a file, not a directory"
        culprit = getattr(cause, "filename", None)
        if culprit is not None and Path(culprit) != self.path and not Path(culprit).name.startswith("."):
            reason += f": '{culprit}'"  # the parent that could not be made (not our temporary file)
        return reason

    def __str__(self) -> str:
        return f"cannot write '{self.path}': {self.reason}" + (f"; {self.fix}" if self.fix else "")


def _default_fix(path: Path, code: Optional[int]) -> str:
    where = f"'{path.parent}'"
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"free space on the file system of {where} (the previous file, if any, is intact) and try again"
    if code == errno.EROFS:
        return "choose a place on a writable file system"
    if code in (errno.EACCES, errno.EPERM):
        return f"make {where} writable for this user or choose another place"
    return ""


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


def save_torch(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)``, atomically; an OS error of the write is an :class:`UnwritablePathError`.

    torch's C++ writer turns a failed write (a full disk) into ``RuntimeError: ... unexpected pos``
    with no errno; writing through a Python file object that keeps the ``OSError`` it raised lets the
    real reason through. Nothing is left behind on failure.
    """
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        sink = _ErrorKeepingWriter(fh)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise
        fh.flush()


class _ErrorKeepingWriter:
    """A write-only file object for ``torch.save`` that remembers the ``OSError`` of its file."""

    def __init__(self, fh: IO[bytes]):
        self._fh = fh
        self.error: Optional[OSError] = None

    def write(self, data: Any) -> int:
        try:
            return self._fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            self._fh.flush()
        except OSError as exc:
            self.error = exc
            raise


# Errors of writing the temporary file or renaming it that are about the place, not the writer.
_NO_SPACE_OR_ACCESS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO,
                       errno.EISDIR, errno.ENOTDIR, errno.EXDEV}
# The reason of an errno in a few words (lower case: it follows "cannot write 'PATH': ").
_REASONS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EFBIG: "file too large for the file system", errno.EROFS: "read-only file system",
            errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
            errno.EIO: "input/output error (a failing disk or network file system)"}


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
