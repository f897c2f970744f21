"""Run many cases in a worker subprocess so that a crash or a hang fails one case, not the caller.

The caller (:func:`run_isolated`) starts ``python benchmarks/isolated.py MODULE:FUNCTION``, sends the
cases (JSON objects) on its stdin and reads one line per case back: ``START i`` before case ``i``
runs, then ``DONE i <json>`` with ``FUNCTION(case)``'s result (a JSON-able dict; an exception in
the case is reported as ``{"error": "..."}``). When the worker dies inside a case (segfault, abort,
heap corruption) or a case exceeds its time limit (the worker is killed), that case is recorded as
a ``crash`` / ``hang`` and a fresh worker continues with the next case. One worker start (the torch
import) is paid per crash, not per case.
"""
from __future__ import annotations

import importlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
#: Seconds a fresh worker may take to import its module before its first case starts.
STARTUP_TIMEOUT_S = 120.0


def _describe_exit(code: Optional[int]) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def _start_worker(target: str, cases: Sequence[Dict[str, Any]], env: Dict[str, str]) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), target],
        cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, bufsize=1,
    )
    payload = "".join(json.dumps(case) + "\n" for case in cases)

    def feed() -> None:  # a thread: the worker may stop reading (crash) before taking every case
        try:
            proc.stdin.write(payload)
            proc.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass

    threading.Thread(target=feed, daemon=True).start()
    return proc


def _reader(stream, lines: "queue.Queue[Optional[str]]") -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def run_isolated(target: str, cases: Sequence[Dict[str, Any]], case_timeout_s: float,
                 threads: int = 1) -> List[Dict[str, Any]]:
    """``[FUNCTION(case) for case in cases]``, each run in a worker subprocess (see module docstring).

    ``target``: ``"module:function"`` importable from the repository root or ``tests/``.
    Each result is the function's dict plus ``"seconds"``; a failed case is ``{"error": ...}``
    (an exception), ``{"crash": ...}`` (the worker died) or ``{"hang": ...}`` (killed after
    ``case_timeout_s``). ``threads``: torch intra-op threads in the worker.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = str(threads)
    env["ACNET_ISOLATED_THREADS"] = str(threads)
    results: List[Optional[Dict[str, Any]]] = [None] * len(cases)
    start = 0
    while start < len(cases):
        proc = _start_worker(target, cases[start:], env)
        lines: "queue.Queue[Optional[str]]" = queue.Queue()
        threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
        stderr_lines: "queue.Queue[Optional[str]]" = queue.Queue()
        stderr_thread = threading.Thread(target=_reader, args=(proc.stderr, stderr_lines), daemon=True)
        stderr_thread.start()
        current: Optional[int] = None
        started = time.monotonic()
        deadline = started + STARTUP_TIMEOUT_S
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                proc.kill()
                proc.wait()
                index = start if current is None else current
                what = f"case {index}" if current is not None else "worker start-up"
                results[index] = {"hang": f"{what} still running after {deadline - started:.0f} s; killed"}
                start = index + 1
                break
            if line is None:  # the worker's stdout closed: it finished, or it died
                code = proc.wait()
                pending = [i for i in range(start, len(cases)) if results[i] is None]
                if not pending:
                    start = len(cases)
                    break
                index = current if current is not None else pending[0]
                stderr_thread.join(timeout=5)
                tail = "".join(line for line in stderr_lines.queue if line)[-600:].strip().replace("\n", " | ")
                results[index] = {"crash": _describe_exit(code) + (f": {tail}" if tail else "")}
                start = index + 1
                break
            kind, _, rest = line.rstrip("\n").partition(" ")
            if kind == "START":
                current = start + int(rest)
                started = time.monotonic()
                deadline = started + case_timeout_s
            elif kind == "DONE":
                index_text, _, payload = rest.partition(" ")
                index = start + int(index_text)
                results[index] = {**json.loads(payload), "seconds": time.monotonic() - started}
                current = None
                deadline = time.monotonic() + case_timeout_s  # the next START (or the exit) follows at once
    return [r if r is not None else {"crash": "no result"} for r in results]


def failures(cases: Sequence[Dict[str, Any]], results: Sequence[Dict[str, Any]]) -> List[str]:
    """One line per case whose result is an error, a crash or a hang."""
    lines = []
    for case, result in zip(cases, results):
        for kind in ("crash", "hang", "error"):
            if kind in result:
                lines.append(f"{kind}: {json.dumps(case)}: {result[kind]}")
                break
    return lines


def serve(function: Callable[[Dict[str, Any]], Dict[str, Any]]) -> None:
    """Worker loop: run ``function`` on each JSON line of stdin, reporting as the module docstring says."""
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints of the cases must not garble the protocol
    for i, line in enumerate(sys.stdin):
        case = json.loads(line)
        out.write(f"START {i}\n")
        out.flush()
        try:
            result = function(case)
        except Exception as exc:  # reported as the case's failure
            frames = traceback.extract_tb(exc.__traceback__)
            where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
            result = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}{where}"}
        out.write(f"DONE {i} {json.dumps(result)}\n")
        out.flush()


if __name__ == "__main__":
    module_name, _, function_name = sys.argv[1].partition(":")
    threads = int(os.environ.get("ACNET_ISOLATED_THREADS", "1"))
    import torch

    torch.set_num_threads(threads)
    serve(getattr(importlib.import_module(module_name), function_name))
