"""The progress of a training epoch on the console of rank 0 (stderr), moving every iteration.

On a terminal: a tqdm bar advanced by every iteration (tqdm redraws it at most every ``mininterval``
seconds, so the cost per iteration is a counter). Elsewhere (a log file, a pipe, a batch system's
output) a bar's carriage returns would pile up in the file: one plain line each time another tenth of
the epoch is done instead, at most :data:`LINES_PER_EPOCH` lines per epoch::

    epoch 3/90: 30% 90/300 it, 41.2 it/s, loss=1.2345 top1=56.78 lr=0.1 img_s=5270

The metrics are the latest the engine read (every ``print_freq`` iterations and at the end of the
epoch: its only host syncs), so a line may show none yet. The engine's log lines (log.txt) do not change.
"""
from __future__ import annotations

import sys
import time
from typing import IO, Optional

__all__ = ["LINES_PER_EPOCH", "EpochProgress"]

#: The most progress lines one epoch writes to a console that is not a terminal.
LINES_PER_EPOCH = 10


class EpochProgress:
    """The progress of one epoch of ``total`` iterations: :meth:`step` after each, :meth:`metrics` when
    the engine reads them, :meth:`finish` when the epoch is done, :meth:`close` in any case (Ctrl-C, an
    error). ``enabled=False``: nothing at all."""

    def __init__(self, total: int, desc: str, enabled: bool = True, stream: Optional[IO[str]] = None) -> None:
        self.total, self.desc, self.done = total, desc, 0
        self.stream = sys.stderr if stream is None else stream
        self.postfix = ""
        self.start = time.perf_counter()
        self.bar = None
        self.lines = False
        if not enabled or total <= 0:
            return
        if _is_terminal(self.stream):
            from tqdm import tqdm  # only for a terminal: a log file gets plain lines

            self.bar = tqdm(total=total, desc=desc, unit="it", leave=False, dynamic_ncols=True, file=self.stream)
        else:
            self.lines = True

    def step(self) -> None:
        """One more iteration done."""
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif (self.lines and self.done < self.total
              and self.done * LINES_PER_EPOCH // self.total > (self.done - 1) * LINES_PER_EPOCH // self.total):
            self._write_line()  # the last one by finish(), after the epoch's last metrics

    def metrics(self, **values: str) -> None:
        """The latest metrics (formatted), shown from now on."""
        self.postfix = " ".join(f"{key}={value}" for key, value in values.items())
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)

    def finish(self) -> None:
        """The epoch completed (its last metrics given): a log gets its last line; then :meth:`close`."""
        if self.lines and self.done == self.total:
            self._write_line()
        self.close()

    def close(self) -> None:
        """The bar goes away (also on Ctrl-C or an error); nothing more is written."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.lines = False

    def _write_line(self) -> None:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        line = (f"{self.desc}: {100 * self.done // self.total:3d}% {self.done}/{self.total} it, "
                f"{self.done / elapsed:.1f} it/s")
        self.stream.write(line + (f", {self.postfix}" if self.postfix else "") + "\n")
        self.stream.flush()


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
