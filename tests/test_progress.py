"""utils.engine.progress: the epoch's progress moves with every iteration; a console that is not a terminal gets
at most 10 plain lines per epoch, the last one with the epoch's last metrics."""
from __future__ import annotations

import io
import re

import pytest

from utils.engine.progress import LINES_PER_EPOCH, EpochProgress

LINE = re.compile(r"epoch 2/5: +(\d+)% (\d+)/(\d+) it, [\d.]+ it/s(, .*)?")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_epoch(total: int, stream, metrics_every: int = 50) -> EpochProgress:
    progress = EpochProgress(total, "epoch 2/5", stream=stream)
    for step in range(1, total + 1):
        if step % metrics_every == 0:
            progress.metrics(loss=f"{1 / step:.4f}", top1="50.00")
        progress.step()
    progress.metrics(loss="0.1234", top1="99.00")  # the epoch's last read
    progress.finish()
    return progress


@pytest.mark.parametrize("total", [1, 3, 10, 11, 25, 300, 1001])
def test_a_log_gets_at_most_ten_lines_per_epoch_ending_at_100_percent(total):
    log = io.StringIO()
    run_epoch(total, log)
    lines = log.getvalue().splitlines()
    assert len(lines) == min(total, LINES_PER_EPOCH)
    parsed = [LINE.fullmatch(line) for line in lines]
    assert all(parsed), lines
    done = [int(m.group(2)) for m in parsed]
    assert done == sorted(set(done)) and done[-1] == total and all(int(m.group(3)) == total for m in parsed)
    assert [int(m.group(1)) for m in parsed][-1] == 100
    assert lines[-1].endswith(", loss=0.1234 top1=99.00")  # the last line after the last metrics
    if total >= 100:  # the lines are evenly spread: one per tenth
        assert [int(m.group(1)) for m in parsed] == list(range(10, 101, 10))
        assert "loss=" in lines[-2]  # metrics read mid-epoch appear on the next line


def test_an_interrupted_epoch_writes_no_last_line_and_a_disabled_one_nothing():
    log = io.StringIO()
    progress = EpochProgress(100, "epoch 2/5", stream=log)
    for _ in range(35):
        progress.step()
    progress.close()  # Ctrl-C: the engine's finally
    progress.step()
    assert len(log.getvalue().splitlines()) == 3
    quiet = io.StringIO()
    run_epoch(100, quiet).close()
    silent = EpochProgress(100, "epoch 2/5", enabled=False, stream=quiet)
    silent.step()
    silent.finish()
    assert len(quiet.getvalue().splitlines()) == 10


def test_a_terminal_gets_a_bar_advanced_by_every_iteration():
    term = Terminal()
    progress = EpochProgress(10, "epoch 2/5", stream=term)
    for step in range(1, 11):
        progress.step()
        assert progress.bar.n == step  # not only every print_freq iterations
    progress.metrics(loss="0.5000")
    progress.finish()
    text = term.getvalue()
    assert "epoch 2/5" in text and "\n" not in text.strip("\n")  # a bar redrawn in place, no log lines
