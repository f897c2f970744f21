"""The run record, lock and state of utils/rundir/record.py, and how show_log / reproduce read them (in-process).

Runs in other processes (signals, concurrent commands) are in test_run_lock.py and test_fault_injection.py.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest

import do_acnet
import reproduce
import show_log
from utils.modes.cli import parse_command
from utils.rundir.record import (LOCK_FILE, STATE_FILE, RecordError, RunBusyError, RunLock, RunSession, command_with_run_data,
                          identity, lock_holder, make_record, merge_summary, move_aside, read_record, read_state,
                          record_conflicts, remove_stale_temporaries, write_record, write_state)
from utils.rundir.identity import ExperimentPaths

SYNTHETIC = ["-a", "cfqkbnc", "-b", "acb", "--dataset", "synthetic"]


def command(*argv):
    return parse_command([str(a) for a in argv])[1]


# ------------------------------------------------------------------------------------------ the record
def test_one_writer_one_reader_and_the_identity(tmp_path):
    cmd = command(*SYNTHETIC, "--epochs", "3", "--synthetic-num-val", "16", "--seed", "2")
    paths = ExperimentPaths(tmp_path / "run")
    write_record(paths, make_record(cmd, cmd.recipe, "train", device="cpu"))
    record = read_record(paths)
    assert record["kind"] == "train" and record["device"] == "cpu"
    ident = identity(record)
    assert list(ident)[:7] == ["kind", "arch", "block_type", "dataset", "synthetic_num_train", "synthetic_num_val",
                               "seed"]
    assert (ident["dataset"], ident["synthetic_num_val"], ident["seed"], ident["epochs"]) == ("synthetic", 16, 2, 3)
    assert "device" not in ident and "command_line" not in ident  # how it ran is not what it is
    assert read_record(ExperimentPaths(tmp_path / "none")) is None
    # records written before 'kind' existed
    assert read_record(_with_record(tmp_path / "old_qat", {"arch": "vc", "qat": True}))["kind"] == "qat"
    assert read_record(_with_record(tmp_path / "old_ft", {"arch": "vc", "init_weights": {"path": "w"}}))["kind"] == \
        "finetune"


def _with_record(folder: Path, record: dict) -> ExperimentPaths:
    folder.mkdir(parents=True)
    (folder / "recipe.json").write_text(json.dumps(record))
    return ExperimentPaths(folder)


def test_conflicts_name_the_arch_first_and_only_fields_both_know():
    src56 = identity(make_record(command("-a", "src56", "-b", "acb", "--dataset", "synthetic"),
                                 command("-a", "src56", "--dataset", "synthetic").recipe, "train"))
    cfq = command(*SYNTHETIC)
    recorded = identity(make_record(cfq, cfq.recipe, "train"))
    conflicts = record_conflicts(recorded, src56)
    assert conflicts[0] == "arch='src56' (run has 'cfqkbnc')"
    assert any(c.startswith("lr=0.2") for c in conflicts[1:])
    assert record_conflicts({"arch": "vc"}, {"arch": "vc", "lr": 1.0}) == []  # a field the run lacks: not compared


@pytest.mark.parametrize("name, text", [("recipe.json", '{"arch": "cfq'), ("summary.json", "[1, 2]")])
def test_a_corrupt_record_is_one_line_naming_the_file(tmp_path, capsys, name, text):
    """Repro 9: no false 'different recipe' refusal; the run is 'unreadable' in show_log."""
    run = tmp_path / "exps" / "cfqkbnc_acb_synthetic_train"
    run.mkdir(parents=True)
    (run / "log.txt").write_text("2026-11-22 16:00:00 epoch 1 iter 2 val top1=10.0 top5=50.0 loss=2.3\n")
    (run / name).write_text(text)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(SystemExit) as info:
        do_acnet.main([*SYNTHETIC, "--epochs", "1", "--output-dir", str(tmp_path / "exps"), "--no-progress"])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{run / name} is corrupt" in err[0] and "different recipe" not in err[0], err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing written, no lock file left
    (status,) = [r.status(5) for r in show_log.discover_runs(tmp_path / "exps")]
    assert status.startswith("unreadable: ") and name in status


def test_merge_summary_keeps_every_mode_s_keys(tmp_path):
    path = tmp_path / "summary.json"
    merge_summary(path, {"arch": "vc", "deploy_top1": 90.0})
    merge_summary(path, {"int8_top1": 89.5, "onnx_opset": 18})
    merge_summary(path, {"qat_top1": 1.0}, section="qat")
    merge_summary(path, {"deploy_top1": 91.0})  # a re-run of the training mode's post-training steps
    assert json.loads(path.read_text()) == {"arch": "vc", "deploy_top1": 91.0, "int8_top1": 89.5, "onnx_opset": 18,
                                            "qat": {"qat_top1": 1.0}}
    path.write_text("{not json")
    with pytest.raises(RecordError, match="summary.json is corrupt"):
        merge_summary(path, {"x": 1})
    assert path.read_text() == "{not json"  # never replaced by a summary of some of its fields


def test_move_aside_and_stale_temporaries(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("log.txt", "latest.pth", ".latest.pth.abc123.tmp", LOCK_FILE):
        (run / name).write_text(name)
    (run / "tensorboard").mkdir()
    assert remove_stale_temporaries(run) == [".latest.pth.abc123.tmp"]
    moved = move_aside(run)
    assert moved.parent == run and moved.name.startswith("previous-")
    assert sorted(p.name for p in moved.iterdir()) == ["latest.pth", "log.txt", "tensorboard"]
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE, moved.name]
    assert move_aside(run) is None  # nothing more to move (an earlier previous-* stays where it is)


# ------------------------------------------------------------------------------------------ lock and state
def test_the_lock_names_its_holder_and_is_free_once_released(tmp_path):
    first = RunLock(tmp_path)
    first.acquire("do_acnet.py training cfqkbnc / acb")
    holder = lock_holder(tmp_path)
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(RunBusyError) as info:  # a second open file description: refused, like another process
        RunLock(tmp_path).acquire("another")
    message = str(info.value)
    assert "\n" not in message and f"is in use by pid {os.getpid()} on {socket.gethostname()} since " in message
    assert "do_acnet.py training cfqkbnc / acb" in message and "another --exp-name" in message
    first.release()
    assert lock_holder(tmp_path) is None
    second = RunLock(tmp_path)
    second.acquire("again")  # no stale lock
    second.release()


def test_a_filesystem_without_flock_stops_the_run_in_one_line(tmp_path, monkeypatch):
    import errno
    import fcntl

    def unsupported(fd, operation):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(fcntl, "flock", unsupported)
    with pytest.raises(RunBusyError, match=r"cannot lock .*the filesystem does not support flock; use a local "
                                           r"--output-dir"):
        RunLock(tmp_path).acquire("t")


def test_a_running_state_without_a_live_holder_reads_interrupted(tmp_path):
    paths = ExperimentPaths(tmp_path)
    write_state(paths, "running", epoch=2, epochs=5)
    (tmp_path / LOCK_FILE).write_text("")
    state = read_state(tmp_path)
    assert state["state"] == "interrupted" and state["epoch"] == 2 and state["reason"].startswith("killed")
    lock = RunLock(tmp_path)
    lock.acquire("live")
    assert read_state(tmp_path)["state"] == "running"
    lock.release()
    (tmp_path / STATE_FILE).write_text("{")
    with pytest.raises(RecordError, match=STATE_FILE):
        read_state(tmp_path)


def test_a_session_records_every_exit_and_writes_nothing_before_it_begins(tmp_path):
    from utils.rundir.log import RunLog

    paths = ExperimentPaths(tmp_path / "out" / "run")
    with pytest.raises(ValueError):
        with RunSession(paths, "t"):
            raise ValueError("bad option")  # before begin(): the folders it created are removed
    assert not (tmp_path / "out").exists()
    for exc, state, reason in ((RuntimeError("boom\nmore"), "failed", "RuntimeError: boom"),
                               (KeyboardInterrupt(), "interrupted", "interrupted")):
        with pytest.raises(type(exc)):
            with RunSession(paths, "t", epochs=4) as session:
                session.begin(RunLog(paths.log), epoch=0)
                session.saved(1)
                raise exc
        recorded = json.loads((paths.root / STATE_FILE).read_text())
        assert (recorded["state"], recorded["reason"], recorded["epoch"], recorded["epochs"]) == (state, reason, 1, 4)
        last = paths.log.read_text().splitlines()[-1]
        assert last.endswith("ERROR: RuntimeError: boom" if state == "failed" else "interrupted")
        assert lock_holder(paths.root) is None
    with RunSession(paths, "t") as session:
        session.begin(None)
    assert json.loads((paths.root / STATE_FILE).read_text())["state"] == "finished"


# ------------------------------------------------------------------------------------------ readers
def _fake_run(root: Path, name: str, block: str, seed: int, epochs: int, top1: float, *, kind: str = "train",
              state: str = "finished", lock: bool = True) -> Path:
    run = root / name
    run.mkdir(parents=True)
    lines = [f"2026-11-22 16:00:0{i} epoch {i + 1} iter {i + 1} val top1={top1 + i} top5=99.0 loss=0.5"
             for i in range(2)]
    (run / "log.txt").write_text("\n".join(lines) + "\n")
    (run / "recipe.json").write_text(json.dumps({"kind": kind, "arch": "cfqkbnc", "block_type": block,
                                                 "dataset": "synthetic", "seed": seed, "epochs": epochs,
                                                 "lr": 0.1, "synthetic_num_train": None}))
    if state == "finished":
        (run / "summary.json").write_text(json.dumps({"deploy_top1": top1 + 1, "train_top1": top1 + 1}))
    (run / STATE_FILE).write_text(json.dumps({"state": state, "epoch": 1, "reason": None}))
    if lock:
        (run / LOCK_FILE).write_text("")
    return run


def test_show_log_groups_by_recipe_and_lists_derived_runs_apart(tmp_path):
    """Repro 4: runs of other epochs are never pooled; a dead 'running' run reads 'interrupted at epoch N'."""
    for seed in (0, 1):
        _fake_run(tmp_path, f"cfqkbnc_base_s{seed}_e1", "base", seed, 1, 10.0)
        _fake_run(tmp_path, f"cfqkbnc_acb_s{seed}_e3", "acb", seed, 3, 30.0)
        _fake_run(tmp_path, f"cfqkbnc_acb_s{seed}_e1", "acb", seed, 1, 11.0)
    _fake_run(tmp_path, "cfqkbnc_acb_qat", "acb", 0, 1, 50.0, kind="qat")
    _fake_run(tmp_path, "cfqkbnc_acb_killed", "acb", 4, 1, 5.0, state="running")
    runs = show_log.discover_runs(tmp_path)
    groups = show_log.group_runs(runs)
    assert sorted((g.block_type, g.variant, len(g.runs)) for g in groups) == [
        ("acb", "epochs=1", 3), ("acb", "epochs=3", 2), ("base", "epochs=1", 2)]
    (comparison,) = [c for c in show_log.comparisons(runs) if c.base is not None and c.other is not None]
    assert {r.name for r in comparison.other.runs} >= {"cfqkbnc_acb_s0_e1", "cfqkbnc_acb_s1_e1"}  # like with like
    assert sorted(row[1] for row in show_log.group_rows(groups, 5)) == [
        "synthetic [epochs=1]", "synthetic [epochs=1]", "synthetic [epochs=3]"]
    text = show_log.report(runs, 5, "text")
    runs_table, derived_table = text.split("\n\nRuns")[0], text.split("Derived runs")[1]
    assert "cfqkbnc_acb_qat" not in runs_table.split("Over seeds")[0] and "cfqkbnc_acb_qat" in derived_table
    killed = next(r for r in runs if r.name == "cfqkbnc_acb_killed")
    assert killed.status(5).startswith("interrupted at epoch 1, ")


def test_a_sweep_conflict_never_enters_its_table(tmp_path, capsys):
    """Repro 4: reproduce reports CONFLICT for a finished run of another recipe and leaves it out."""
    out = tmp_path / "exps"
    cmd = command(*SYNTHETIC, "--epochs", "3", "--output-dir", out)
    record = make_record(cmd, cmd.recipe, "train")
    run = _fake_run(out, "cfqkbnc_acb_synthetic_train", "acb", 0, 3, 70.0)
    (run / "recipe.json").write_text(json.dumps(record))
    sweep = ["--archs", "cfqkbnc", "--blocks", "acb", "--seeds", "0", "--dataset", "synthetic", "--output-dir",
             str(out), "--dry-run", "--", "--epochs", "1"]
    assert reproduce.main(sweep) == 0
    assert "# conflict: cfqkbnc_acb_synthetic_train: finished with another recipe: epochs 3 (sweep: 1)" in \
        capsys.readouterr().out
    args = reproduce.build_parser().parse_args(sweep[:-3])
    (planned,) = reproduce.plan(args, ["--epochs", "1"])
    assert planned.status == "conflict"
    assert "cfqkbnc_acb_synthetic_train" not in reproduce.final_report([planned], 5, "text")


def test_modes_reading_a_run_take_its_data(tmp_path):
    """Repro 6 (in-process part): the run's dataset and sizes unless the command line names them."""
    cmd = command(*SYNTHETIC, "--synthetic-num-train", "40", "--synthetic-num-val", "24", "--seed", "3")
    paths = ExperimentPaths(tmp_path / "run")
    write_record(paths, make_record(cmd, cmd.recipe, "train"))
    (paths.root / "finish.hdf5").write_bytes(b"")
    evaluation = command("-a", "cfqkbnc", "-b", "acb", "--eval-only", paths.root / "finish.hdf5")
    assert evaluation.dataset == "cifar10"
    taken = command_with_run_data(evaluation, paths.root / "finish.hdf5")
    assert (taken.dataset, taken.data.synthetic_num_train, taken.data.synthetic_num_val, taken.seed) == \
        ("synthetic", 40, 24, 3)
    explicit = command("-a", "cfqkbnc", "-b", "acb", "--dataset", "cifar10", "--eval-only", paths.root)
    assert command_with_run_data(explicit, paths.root).dataset == "cifar10"
    shutil.rmtree(paths.root)


def test_continue_of_a_run_killed_before_its_first_save_starts_it_again(tmp_path, capsys):
    """-c continue where the run wrote its record and state but no latest.pth: nothing to lose, it trains."""
    args = [*SYNTHETIC, "--epochs", "1", "--synthetic-num-train", "32", "--synthetic-num-val", "16", "--batch-size",
            "16", "--workers", "0", "--no-progress", "--output-dir", tmp_path]
    cmd = command(*args)
    paths = cmd.paths()
    write_record(paths, make_record(cmd, cmd.recipe, "train"))
    write_state(paths, "running", epoch=0, epochs=1)
    do_acnet.main([str(a) for a in [*args, "-c", "continue"]])
    log = paths.log.read_text()
    assert "-c continue: no epoch of this run was saved (latest.pth does not exist): training from the start" in log
    assert json.loads((paths.root / STATE_FILE).read_text())["state"] == "finished"


def test_a_full_disk_when_recording_the_end_keeps_the_run_s_own_error(tmp_path, monkeypatch):
    import errno

    import utils.rundir.record

    paths = ExperimentPaths(tmp_path / "run")
    with pytest.raises(RuntimeError, match="the run's own error"):
        with RunSession(paths, "t") as session:
            session.begin(None)

            def no_space(obj, path):
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(utils.rundir.record, "_save_json", no_space)
            raise RuntimeError("the run's own error")
    assert lock_holder(paths.root) is None


def test_an_unfinished_run_of_another_identity_is_refused_before_writing(tmp_path, capsys):
    cmd = command(*SYNTHETIC, "--epochs", "2", "--output-dir", tmp_path)
    paths = cmd.paths()
    write_record(paths, make_record(cmd, cmd.recipe, "train"))
    paths.log.write_text("2026-11-22 16:00:00 training cfqkbnc / acb ...\n")
    before = {p.name: p.read_bytes() for p in paths.root.iterdir()}
    with pytest.raises(SystemExit) as info:
        do_acnet.main([*SYNTHETIC, "-b", "dbb", "--epochs", "2", "--exp-name", paths.root.name, "--output-dir",
                       str(tmp_path)])
    assert info.value.code == 2
    (line,) = [l for l in capsys.readouterr().err.splitlines() if ": error:" in l]
    assert line.endswith(f"{paths.root} holds another run: block_type='dbb' (run has 'acb'); use a new --exp-name, "
                         "or start over with -c restart (its files move into previous-<time>/)")
    assert {p.name: p.read_bytes() for p in paths.root.iterdir()} == before


def test_a_lock_kept_by_a_dead_holder_s_children_is_free(tmp_path):
    """A data loader worker forked by a killed run shares its lock for a moment: readers call the run dead, a
    new command waits for the lock instead of being refused."""
    import subprocess
    import sys
    import threading

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    orphan = RunLock(tmp_path)  # stands for the worker: it holds the lock, the file names the dead process
    orphan.acquire("t")
    os.pwrite(orphan.fd, json.dumps({"pid": dead_pid, "host": socket.gethostname()}).encode().ljust(200), 0)
    assert lock_holder(tmp_path) is None
    threading.Timer(2.0, orphan.release).start()  # the worker notices and exits
    successor = RunLock(tmp_path)
    successor.acquire("continue")  # waits past the usual second, then holds it
    assert lock_holder(tmp_path)["pid"] == os.getpid()
    successor.release()
