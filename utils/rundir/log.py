"""The run's ``log.txt`` and TensorBoard scalars (written by rank 0 only).

``log.txt`` lines are ``YYYY-MM-DD HH:MM:SS <message>``. Only evaluation lines contain ``top1=``::

    2026-11-22 16:00:00 epoch 5 iter 1955 val top1=93.2100 top5=99.8000 loss=0.234500

Other lines (epoch summaries with ``train_acc1=``/``train_loss=``, notes) never do. The file is kept
in memory and rewritten atomically on every line, so a kill never leaves a torn line; on resume it
is cut back to the lines that existed when the resumable state was saved.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from acnet.fileio import atomic_open

__all__ = ["RunLog", "TensorBoard", "eval_line"]

logger = logging.getLogger("do_acnet")


def eval_line(epoch: int, iteration: int, metrics: dict[str, float], split: str = "val") -> str:
    """The evaluation line show_log.py parses (tokens ``epoch <int>``, ``top1=``, ``top5=``, ``loss=``)."""
    return (f"epoch {epoch} iter {iteration} {split} top1={metrics['top1']:.4f} top5={metrics['top5']:.4f} "
            f"loss={metrics['loss']:.6f}")


class RunLog:
    """Timestamped lines to ``log.txt`` (when ``enabled``) and to the ``do_acnet`` logger."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True, keep_existing: bool = False):
        self.path = Path(path)
        self.enabled = enabled
        self.lines: list[str] = []
        if enabled and keep_existing and self.path.is_file():
            self.lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()

    def __len__(self) -> int:
        return len(self.lines)

    def truncate(self, num_lines: int) -> None:
        """Drop the lines written after the resumable state that the run continues from."""
        if self.enabled and num_lines < len(self.lines):
            self.lines = self.lines[:num_lines]
            self._flush()

    def write(self, message: str, level: int = logging.INFO) -> None:
        """A free-form line; it must not contain ``top1=`` (reserved for :meth:`write_eval`)."""
        if "top1=" in message:
            raise ValueError(f"only evaluation lines may contain 'top1=': {message!r}")
        self._append(message, level)

    def write_error(self, error: object) -> None:
        """The ``ERROR: <error>`` line a run ends with (show_log reads it), best effort: when log.txt
        itself cannot be written (a full disk) the line goes to the logger only; the command's own
        one-line error says the same."""
        kept = len(self.lines)
        try:
            self.write(f"ERROR: {error}", logging.ERROR)  # logged first, then written
        except OSError:  # acnet.fileio.UnwritablePathError: log.txt keeps its previous lines
            del self.lines[kept:]

    def write_eval(self, epoch: int, iteration: int, metrics: dict[str, float], split: str = "val") -> None:
        self._append(eval_line(epoch, iteration, metrics, split), logging.INFO)

    def _append(self, message: str, level: int) -> None:
        logger.log(level, message)
        if self.enabled:
            self.lines.append(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}")
            self._flush()

    def _flush(self) -> None:
        with atomic_open(self.path, "w") as fh:
            fh.write("\n".join(self.lines) + ("\n" if self.lines else ""))


class TensorBoard:
    """Scalars to TensorBoard under ``log_dir``; a no-op when disabled (ranks > 0).

    ``resume_step``: the iteration the run starts or continues from (0 for a fresh run). Points an
    earlier (killed) process logged after it are hidden, the ones at or before it are kept, so a
    resumed run shows every point an uninterrupted run shows (SummaryWriter's ``purge_step`` drops
    steps ``>= purge_step``, hence ``resume_step + 1``; the point logged at the resumed iteration
    itself, the end of the saved epoch, belongs to the saved state).
    """

    def __init__(self, log_dir: str | os.PathLike, enabled: bool = True, resume_step: int | None = None):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            purge_step = None if resume_step is None else resume_step + 1
            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
