"""Run a script with an OS error injected into the writes of one file: a full disk, no permission, ...

    python tests/inject_oserror.py ERRNO NAME NTH SCRIPT [ARGS...]

The NTH time (1-based) a file named NAME is written through :mod:`acnet.fileio` (``torch.save``'s bytes
in :func:`acnet.fileio.save_torch`, JSON and text in :func:`acnet.fileio.atomic_open`), the write raises
``OSError(ERRNO)`` after the first bytes went to disk, as a file system that fills up does. Everything
else runs unchanged; SCRIPT runs as ``__main__`` with ARGS. Used by tests/test_save_errors.py.
"""
from __future__ import annotations

import builtins
import errno
import os
import runpy
import sys
from pathlib import Path


class FailingFile:
    """A binary or text file whose writes fail with ``OSError(code)`` once ``allowed`` bytes are written."""

    def __init__(self, fh, code: int, allowed: int = 64):
        self._fh = fh
        self._code = code
        self._allowed = allowed

    def write(self, data):
        if len(data) > self._allowed:
            self._fh.write(data[:self._allowed])
            self._fh.flush()  # the partial bytes reach the temporary file, as on a disk that fills up
            raise OSError(self._code, os.strerror(self._code))
        self._allowed -= len(data)
        return self._fh.write(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()
        return False


def failing_open(code: int, name: str, nth: int):
    """An ``open`` whose ``nth`` opening for writing of a file named ``name`` (its temporary file
    ``.NAME.XXXXXXXX.tmp``, see acnet.fileio.atomic_path) gives a :class:`FailingFile`."""
    seen = {"count": 0}
    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        if "w" in mode and Path(str(file)).name.startswith(f".{name}."):
            seen["count"] += 1
            if seen["count"] == nth:
                return FailingFile(fh, code)
        return fh

    return open_


def install(code: int, name: str, nth: int) -> None:
    """Make the ``nth`` write of a file named ``name`` through acnet.fileio fail with ``OSError(code)``."""
    import acnet.fileio as fileio

    fileio.open = failing_open(code, name, nth)  # the module's global name shadows the builtin there only


def main() -> None:
    code_name, name, nth, script, *args = sys.argv[1:]
    install(getattr(errno, code_name), name, int(nth))
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
