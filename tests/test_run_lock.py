"""Runs in child processes with real signals (issue #25's repros 1-3, 5, 6, 9): the folder lock, the state a
reader can trust, nothing saved ever deleted, summary.json merged, reading modes use the run's data."""
from __future__ import annotations

import json
import re
import signal
import socket
import time
from pathlib import Path

import pytest

import do_acnet
import show_log
from tests.runprocs import TINY, error_lines, run, saved_epochs, start, stop, wait_for
from utils.rundir.record import STATE_FILE, RunLock

NAME = "cfqkbnc_acb_synthetic_train"


def state_of(run_dir: Path) -> dict:
    return json.loads((run_dir / STATE_FILE).read_text())


def status_of(run_dir: Path) -> str:
    (found,) = show_log.discover_runs(run_dir)
    return found.status(5)


def one_error(err: str, pattern: str) -> str:
    lines = error_lines(err)
    assert len(lines) == 1 and re.search(pattern, lines[0]), err
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished tiny run (its folder), trained once for this module."""
    root = tmp_path_factory.mktemp("finished")
    result = run(root, *TINY, "--output-dir", "out")
    assert result.returncode == 0, result.stderr
    return root / "out" / NAME


def test_ctrl_c_then_the_same_command_keeps_the_saved_work(tmp_path):
    """Repro 1: the same command after Ctrl-C is refused in one line naming both choices; nothing is touched;
    -c restart moves the old files aside."""
    folder = tmp_path / "out" / NAME
    command = [*TINY, "--epochs", "8", "--output-dir", "out"]
    process = start(tmp_path, *command)
    assert wait_for(lambda: saved_epochs(folder / "log.txt") >= 2)
    code, _, err = stop(process, signal.SIGINT)
    assert code == 130, err
    assert "interrupted in epoch" in error_lines(err)[0] and "resume with:" in error_lines(err)[0]
    saved = state_of(folder)
    assert saved["state"] == "interrupted" and saved["epoch"] >= 2
    assert status_of(folder).startswith(f"interrupted at epoch {saved['epoch']}, ")
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}

    again = run(tmp_path, *command)
    assert again.returncode == 2
    one_error(again.stderr, r"holds an interrupted run .*resume it with -c continue, or start over with -c restart "
                            r"\(its files move into previous-<time>/\), or use a new --exp-name")
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before

    restart = run(tmp_path, *TINY, "-c", "restart", "--output-dir", "out")
    assert restart.returncode == 0, restart.stderr
    (previous,) = folder.glob("previous-*")
    assert {p.name: p.read_bytes() for p in previous.iterdir() if p.is_file()} == \
        {name: data for name, data in before.items() if name != ".lock"}
    assert state_of(folder)["state"] == "finished" and status_of(folder).startswith("finished")


def _crash_script(tmp_path: Path, body: str) -> Path:
    """A do_acnet.py whose post-training comparison runs ``body`` first (a crash or a real signal there)."""
    script = tmp_path / "crashing_do_acnet.py"
    script.write_text("import os, signal, sys, time\n"
                      f"sys.path.insert(0, {str(Path(do_acnet.__file__).parent)!r})\n"
                      "import utils.engine.posttrain\n"
                      "def compare_models(*args, **kwargs):\n"
                      f"    {body}\n"
                      "utils.engine.posttrain.compare_models = compare_models\n"
                      "import do_acnet\n"
                      "do_acnet.main()\n")
    return script


def test_no_dead_run_reads_running(tmp_path):
    """Repro 3: SIGTERM, SIGKILL, a crash and Ctrl-C during post-training: each is recorded (or, for SIGKILL,
    told by the free lock), never shown as running."""
    crash = _crash_script(tmp_path, "raise RuntimeError('simulated crash')")
    ctrl_c = _crash_script(tmp_path / "..", "os.kill(os.getpid(), signal.SIGINT); time.sleep(30)")
    children = {
        "term": start(tmp_path, *TINY, "--epochs", "30", "--output-dir", "term"),  # stopped long before their end
        "kill": start(tmp_path, *TINY, "--epochs", "30", "--output-dir", "kill"),
        "crash": start(tmp_path, *TINY, "--output-dir", "crash", script=str(crash)),
        "post": start(tmp_path, *TINY, "--output-dir", "post", script=str(ctrl_c)),
    }
    for name, sig in (("term", signal.SIGTERM), ("kill", signal.SIGKILL)):
        folder = tmp_path / name / NAME
        assert wait_for(lambda: saved_epochs(folder / "log.txt") >= 1)
        if name == "kill":
            assert status_of(folder).startswith("running")  # alive: the lock is held
        code, _, err = stop(children[name], sig)
        assert code == (130 if sig == signal.SIGTERM else -signal.SIGKILL), err
        status = status_of(folder)
        assert status.startswith("interrupted at epoch "), status
        epoch = int(status.split()[3].rstrip(","))
        assert 1 <= saved_epochs(folder / "log.txt") <= epoch  # the state is written before the log's line
    assert "killed" in status_of(tmp_path / "kill" / NAME)
    assert state_of(tmp_path / "term" / NAME)["reason"].startswith("interrupted in epoch")

    code, _, err = children["crash"].wait(timeout=300), *children["crash"].communicate()
    assert code == 1 and "simulated crash" in err
    folder = tmp_path / "crash" / NAME
    assert state_of(folder)["state"] == "failed" and state_of(folder)["reason"] == "RuntimeError: simulated crash"
    assert (folder / "log.txt").read_text().splitlines()[-1].endswith("ERROR: RuntimeError: simulated crash")
    assert status_of(folder) == "failed, 2/5 evals, RuntimeError: simulated crash"

    code, _, err = children["post"].wait(timeout=300), *children["post"].communicate()
    assert code == 130, err
    one_error(err, r"interrupted: training had finished .*finish\.hdf5 is complete")
    assert state_of(tmp_path / "post" / NAME)["state"] == "interrupted"
    assert status_of(tmp_path / "post" / NAME).startswith("interrupted at epoch 2, ")


def test_a_sweep_s_ctrl_c_leaves_its_runs_interrupted(tmp_path):
    """Repro 3: a reproduce.py child stopped by the sweep's Ctrl-C (SIGTERM to the child) reads interrupted."""
    sweep = start(tmp_path, "--archs", "cfqkbnc", "--blocks", "acb", "--seeds", "0", "--dataset", "synthetic",
                  "--output-dir", "out", "--gpus", "cpu", "--", *TINY[6:], "--epochs", "8", script="reproduce.py")
    folder = tmp_path / "out" / NAME
    assert wait_for(lambda: saved_epochs(folder / "log.txt") >= 1)
    code, _, err = stop(sweep, signal.SIGINT)
    assert code == 130, err
    assert state_of(folder)["state"] == "interrupted"
    assert status_of(folder).startswith("interrupted at epoch ")


def test_n_commands_at_once_on_one_folder_one_trains(tmp_path):
    """Repro 2 and the stress test: 4 commands of different lr started at once: exactly one trains, the others
    are refused in one line naming the holder; the folder holds that one run only."""
    rates = ("0.1", "0.05", "0.02", "0.01")
    children = [start(tmp_path, *TINY, "--epochs", "6", "--lr", lr, "--exp-name", "shared", "--output-dir", "out")
                for lr in rates]
    results = [(p.wait(timeout=600), *p.communicate()) for p in children]
    winners = [lr for lr, (code, _, _) in zip(rates, results) if code == 0]
    assert len(winners) == 1, [r[2][-300:] for r in results]
    host = re.escape(socket.gethostname())
    for lr, (code, _, err) in zip(rates, results):
        if lr != winners[0]:
            assert code == 2, err
            one_error(err, rf"out/shared is in use by pid \d+ on {host} since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d "
                           r"\(do_acnet\.py training cfqkbnc / acb\): wait for it to end, or use another --exp-name$")
    folder = tmp_path / "out" / "shared"
    recipe = json.loads((folder / "recipe.json").read_text())
    log = (folder / "log.txt").read_text()
    assert recipe["lr"] == float(winners[0]) and f"--lr {winners[0]} " in recipe["command_line"]
    assert log.count("training cfqkbnc / acb on synthetic") == 1 and f"lr {winners[0]}," in log
    assert log.count("saved resumable state") == 6 and json.loads((folder / "summary.json").read_text())["epochs"] == 6
    assert state_of(folder)["state"] == "finished" and sorted(p.name for p in folder.glob(".*")) == [".lock"]


def test_a_second_continue_is_refused_naming_the_holder(finished, tmp_path):
    lock = RunLock(finished)
    lock.acquire("the test")
    try:
        refused = run(finished.parents[1], *TINY, "-c", "continue", "--output-dir", "out")
    finally:
        lock.release()
    assert refused.returncode == 2
    one_error(refused.stderr, rf"is in use by pid \d+ on .* \(the test\)")


def test_export_keeps_the_summary_and_reading_modes_use_the_run_s_data(finished, tmp_path):
    """Repros 5 and 6: --export-onnx --quantize int8 and --eval-only on a synthetic run use its data (no CIFAR
    download), the export's keys survive a re-run of the training command."""
    pytest.importorskip("onnxruntime")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    summary_before = json.loads((finished / "summary.json").read_text())
    export = run(cwd, "-a", "cfqkbnc", "-b", "acb", "--export-onnx", finished / "finish.hdf5", cwd / "m.onnx",
                 "--quantize", "int8", "--calib-images", "16")
    assert export.returncode == 0, export.stderr
    evaluation = run(cwd, "-a", "cfqkbnc", "-b", "acb", "--eval-only", finished)
    assert evaluation.returncode == 0, evaluation.stderr
    assert " on synthetic (32 images): top1=" in evaluation.stdout
    assert sorted(p.name for p in cwd.iterdir()) == ["m.int8.onnx", "m.onnx"]  # no cifar10_data/
    merged = json.loads((finished / "summary.json").read_text())
    assert {"int8_top1", "fp32_top1", "onnx_opset", "calib_images"} <= set(merged)
    assert {k: v for k, v in merged.items() if k in summary_before} == summary_before

    again = run(finished.parents[1], *TINY, "--output-dir", "out")  # post-training steps again
    assert again.returncode == 0, again.stderr
    rewritten = json.loads((finished / "summary.json").read_text())
    assert set(rewritten) == set(merged) and rewritten["int8_top1"] == merged["int8_top1"]


def test_another_identity_is_refused_before_anything_is_written(finished, capsys):
    """Repro 9: -b dbb into an acb run, -a src56 into a cfqkbnc run: one short line, arch first, nothing written."""
    before = {p.name: p.read_bytes() for p in finished.iterdir() if p.is_file()}
    out = str(finished.parent)
    for argv, first in ((["-b", "dbb"], "block_type='dbb' (run has 'acb')"),
                        (["-a", "src56"], "arch='src56' (run has 'cfqkbnc')")):
        with pytest.raises(SystemExit) as info:
            do_acnet.main([*TINY, *argv, "--exp-name", NAME, "--output-dir", out])
        assert info.value.code == 2
        (line,) = [l for l in capsys.readouterr().err.splitlines() if ": error:" in l]
        assert f"holds a finished run with a different recipe: {first}" in line and len(line) < 400
    assert {p.name: p.read_bytes() for p in finished.iterdir() if p.is_file()} == before
    time.sleep(0)
