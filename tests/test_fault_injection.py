"""Fault injection (issue #25): SIGKILL at random points of a tiny run -- some the moment an atomic save's
temporary file appears (inside a save) -- each followed by ``-c continue``. Every trial must end with the
finish.hdf5 of an uninterrupted run (bitwise), the same files and no stray temporary file, and show_log must
never call the dead run ``running``. Trials run four at a time; the random delays are seeded (reproducible)."""
from __future__ import annotations

import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import show_log
from acnet import load_hdf5
from tests.runprocs import TINY, run, start, wait_for

NAME = "cfqkbnc_acb_synthetic_train"
SHORT = [*TINY, "--synthetic-num-train", "64", "--epochs", "3"]  # later options win: 4 iterations x 3 epochs
TRIALS = 11
#: trials killed the moment the temporary file of one of these atomic saves appears (inside the save)
SAVES = (".latest.pth.", ".init.hdf5.", ".finish.hdf5.", ".finish_deploy.hdf5.", ".summary.json.")


def top_level(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir())


def stray(folder: Path) -> list:
    return [str(p) for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".write-test.")]


def status(folder: Path) -> str:
    runs = show_log.discover_runs(folder) if (folder / "log.txt").exists() else []
    return runs[0].status(5) if runs else "(not a run yet)"


def kill_trial(root: Path, index: int, delay: float, in_save: str | None) -> dict:
    """Start the run, SIGKILL it (after ``delay`` s of training, or inside the save whose temporary file starts
    with ``in_save``), check show_log, continue."""
    out = root / f"trial{index}"
    folder = out / NAME
    process = start(root, *SHORT, "--output-dir", out)
    assert wait_for(lambda: (folder / "log.txt").exists() or process.poll() is not None, timeout=300)
    if in_save:
        def in_a_save() -> bool:
            try:
                return any(e.name.startswith(in_save) for e in os.scandir(folder)) or process.poll() is not None
            except OSError:
                return False
        wait_for(in_a_save, timeout=300, poll=0.0005)
    else:
        time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    killed = process.returncode == -signal.SIGKILL
    after_kill = status(folder)
    left = stray(folder)  # a save cut short leaves its temporary file: the next command removes it
    resumed = run(root, *SHORT, "-c", "continue", "--output-dir", out, timeout=600)
    return {"index": index, "killed": killed, "after_kill": after_kill, "resumed": resumed, "folder": folder,
            "left": left, "in_save": in_save}


def test_sigkill_anywhere_then_continue_gives_the_uninterrupted_result(tmp_path):
    ref_folder = tmp_path / "reference" / NAME
    reference = start(tmp_path, *SHORT, "--output-dir", tmp_path / "reference")
    assert wait_for(lambda: (ref_folder / "log.txt").exists(), timeout=300)
    logging_from = time.monotonic()
    assert reference.wait(timeout=300) == 0, reference.communicate()[1]
    reference.communicate()
    expected = load_hdf5(ref_folder / "finish.hdf5")
    rng = random.Random(25)
    # random delays over the logged part of a run (training, saves, post-training): the trials run four at a
    # time, slower than the reference, so these fall before their end
    delays = [rng.uniform(0.0, 0.8 * (time.monotonic() - logging_from)) for _ in range(TRIALS)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        trials = list(pool.map(lambda i: kill_trial(tmp_path, i, delays[i], SAVES[i] if i < len(SAVES) else None),
                               range(TRIALS)))
    assert sum(t["killed"] for t in trials) >= 10, [t["after_kill"] for t in trials]
    assert any(t["killed"] and t["left"] for t in trials if t["in_save"]), [t["left"] for t in trials]
    for trial in trials:
        folder, resumed = trial["folder"], trial["resumed"]
        assert not trial["after_kill"].startswith("running"), trial
        if trial["killed"] and trial["after_kill"] not in ("(not a run yet)", "finished"):
            # 'finished': killed after the run recorded its end (e.g. at interpreter exit)
            assert trial["after_kill"].startswith(("interrupted at epoch ", "finished")), trial["after_kill"]
        assert resumed.returncode == 0, (trial["index"], trial["after_kill"], resumed.stderr[-2000:])
        weights = load_hdf5(folder / "finish.hdf5")
        assert weights.keys() == expected.keys()
        assert all(torch.equal(weights[k], expected[k]) for k in expected), trial["index"]
        assert top_level(folder) == top_level(ref_folder), trial["index"]
        assert stray(folder) == [], trial["index"]
        assert status(folder).startswith("finished"), status(folder)
