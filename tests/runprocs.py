"""do_acnet.py runs in child processes, for the tests that signal, kill or race them (tests/test_run_lock.py,
tests/test_fault_injection.py): tiny synthetic runs of cfqkbnc, one thread each, no loader workers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: A tiny run: 2 epochs of 8 iterations, an evaluation each epoch.
TINY = ["-a", "cfqkbnc", "-b", "acb", "--dataset", "synthetic", "--synthetic-num-train", "128",
        "--synthetic-num-val", "32", "--batch-size", "16", "--epochs", "2", "--val-every", "1", "--workers", "0",
        "--no-progress"]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def argv(*args, script: str = "do_acnet.py") -> list:
    return [sys.executable, str(REPO / script), *[str(a) for a in args]]


def start(cwd: Path, *args, script: str = "do_acnet.py") -> subprocess.Popen:
    return subprocess.Popen(argv(*args, script=script), cwd=cwd, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def run(cwd: Path, *args, script: str = "do_acnet.py", timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(argv(*args, script=script), cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def wait_for(predicate, timeout: float = 120, poll: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return False


def saved_epochs(log: Path) -> int:
    """How many 'saved resumable state' lines log.txt has (the epochs saved)."""
    try:
        return log.read_text().count("saved resumable state")
    except OSError:
        return 0


def stop(process: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 120) -> tuple:
    process.send_signal(sig)
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def error_lines(err: str) -> list:
    """The ``do_acnet.py: error:`` lines of a child's stderr."""
    return [line for line in err.splitlines() if ": error:" in line]
