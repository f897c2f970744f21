"""A full disk and other OS errors while saving (latest.pth, hdf5 weights, JSON, log.txt): one line naming the
file, the reason and the fix, the previous file intact, no temporary file left, an ERROR line in the run's
log.txt and exit status 2 with no traceback. Injected OSErrors (tests/inject_oserror.py: the write of the
file's bytes fails after a first part reached the disk) in-process and in a do_acnet.py process, and a real
full tmpfs where this user may mount one."""
from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

import acnet.fileio as fileio
from acnet import load_hdf5, save_hdf5
from acnet.fileio import UnwritablePathError
from inject_oserror import failing_open
from test_engine import _trainer
from utils.rundir.checkpoint import load_state, save_json, save_state
from utils.rundir.record import LOCK_FILE
from utils.rundir.log import TensorBoard

ROOT = Path(__file__).resolve().parents[1]
TINY = ["-a", "cfqkbnc", "-b", "acb", "--dataset", "synthetic", "--synthetic-num-train", "64",
        "--synthetic-num-val", "32", "--batch-size", "32", "--workers", "0", "--no-progress"]
REASONS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
           errno.EACCES: "permission denied", errno.EROFS: "read-only file system"}
FIXES = {errno.ENOSPC: "free space on the file system of", errno.EDQUOT: "free space on the file system of",
         errno.EACCES: "writable for this user or choose another place", errno.EROFS: "writable file system"}


def stray_files(directory: Path) -> list[str]:
    """Hidden or temporary files a failed save may leave; the folder's lock file is the run's, not a leftover."""
    return sorted(p.name for p in directory.rglob("*")
                  if (p.name.startswith(".") or p.name.endswith(".tmp")) and p.name != LOCK_FILE)


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text, text
    return text


# ------------------------------------------------------------------------------------------ the writers
@pytest.mark.parametrize("code", sorted(REASONS), ids=lambda c: errno.errorcode[c])
def test_a_failed_checkpoint_save_is_one_line_and_keeps_the_previous_state(code, tmp_path, monkeypatch):
    path = tmp_path / "latest.pth"
    save_state({"epoch": 1, "model": {"w": torch.ones(4096)}}, path)
    monkeypatch.setattr(fileio, "open", failing_open(code, "latest.pth", 1), raising=False)
    with pytest.raises(UnwritablePathError) as info:
        save_state({"epoch": 2, "model": {"w": torch.zeros(4096)}}, path)
    assert one_line(info.value) == f"cannot write '{path}': {REASONS[code]}; " + info.value.fix
    assert FIXES[code] in info.value.fix and info.value.errno == code
    assert torch.load(path, weights_only=True)["epoch"] == 1  # the previous state, intact
    assert stray_files(tmp_path) == []


def test_without_an_injected_error_torch_save_through_python_files_round_trips(tmp_path):
    state = {"epoch": 3, "model": {"w": torch.randn(3, 5), "n": torch.tensor(7)}, "rng": [torch.get_rng_state()]}
    save_state(state, tmp_path / "latest.pth")
    loaded = torch.load(tmp_path / "latest.pth", weights_only=True)
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert torch.equal(loaded["rng"][0], state["rng"][0])


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=lambda c: errno.errorcode[c])
def test_a_failed_json_write_is_one_line_and_keeps_the_previous_file(code, tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    save_json({"train_top1": 50.0}, path)
    monkeypatch.setattr(fileio, "open", failing_open(code, "summary.json", 1), raising=False)
    with pytest.raises(UnwritablePathError, match=rf"^cannot write '{re.escape(str(path))}': {REASONS[code]}; "):
        save_json({"train_top1": 60.0, "padding": "x" * 200}, path)
    assert json.loads(path.read_text()) == {"train_top1": 50.0}
    assert stray_files(tmp_path) == []


@pytest.mark.parametrize("code", [errno.EACCES, errno.ENOSPC], ids=lambda c: errno.errorcode[c])
def test_a_failed_hdf5_rename_is_one_line_and_keeps_the_previous_weights(code, tmp_path, monkeypatch):
    path = tmp_path / "finish.hdf5"
    save_hdf5({"w": torch.ones(3)}, path)

    def refuse(src, dst):
        raise OSError(code, os.strerror(code), str(dst))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(UnwritablePathError, match=rf"^cannot write '{re.escape(str(path))}': {REASONS[code]}; "):
        save_hdf5({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(load_hdf5(path)["w"], torch.ones(3)) and stray_files(tmp_path) == []


def test_a_multi_line_strerror_becomes_the_errnos_few_words(tmp_path):
    """h5py puts a many-line report in strerror; the line keeps the reason only."""
    cause = OSError(errno.ENOSPC, "Can't synchronously write data (file write failed: time = Mon\n, errno = 28, ...)")
    error = UnwritablePathError(tmp_path / "init.hdf5", cause)
    assert one_line(error).startswith(f"cannot write '{tmp_path / 'init.hdf5'}': no space left on device; free space")


# ------------------------------------------------------------------------------------------ the engine
NOTHING_SAVED = r"run the command again: nothing resumable was saved yet \(only init\.hdf5, the initial weights\)"
EPOCH_1_SAVED = r"run again with -c continue: the last resumable state, latest\.pth after epoch 1 \(iteration 4\), is intact"


@pytest.mark.parametrize("code,nth,reason,fix,saved", [
    (errno.ENOSPC, 1, "no space left on device", "free space on '{dir}'", NOTHING_SAVED),
    (errno.ENOSPC, 2, "no space left on device", "free space on '{dir}'", EPOCH_1_SAVED),
    (errno.EROFS, 2, "read-only file system", "make the file system of '{dir}' writable", EPOCH_1_SAVED),
    (errno.EACCES, 2, "permission denied", "make '{dir}' writable", EPOCH_1_SAVED),
], ids=["ENOSPC-first", "ENOSPC-second", "EROFS", "EACCES"])
def test_the_engine_stops_in_one_line_with_an_error_line_in_its_log(code, nth, reason, fix, saved, tmp_path,
                                                                     monkeypatch):
    trainer, _ = _trainer(tmp_path, epochs=3)
    monkeypatch.setattr(fileio, "open", failing_open(code, "latest.pth", nth), raising=False)
    with pytest.raises(UnwritablePathError) as info:
        trainer.fit(TensorBoard(tmp_path / "tb", enabled=False))
    message = one_line(info.value)
    fix = re.escape(fix.format(dir=tmp_path))
    assert re.fullmatch(rf"cannot write '{re.escape(str(tmp_path / 'latest.pth'))}': {reason}; {fix} and {saved}",
                        message), message
    assert (tmp_path / "log.txt").read_text().splitlines()[-1].split(" ", 2)[2] == f"ERROR: {message}"
    assert stray_files(tmp_path) == [] and not (tmp_path / "finish.hdf5").exists()
    if nth == 2:
        assert load_state(tmp_path / "latest.pth")["epoch"] == 1
    else:
        assert not (tmp_path / "latest.pth").exists()


def test_an_error_line_that_cannot_be_written_leaves_log_txt_as_it_was(tmp_path, monkeypatch, caplog):
    from utils.rundir.log import RunLog

    log = RunLog(tmp_path / "log.txt")
    log.write("epoch 1 iter 4 saved resumable state latest.pth")
    before = (tmp_path / "log.txt").read_text()
    monkeypatch.setattr(fileio, "open", failing_open(errno.ENOSPC, "log.txt", 1), raising=False)
    log.write_error("cannot write 'latest.pth': no space left on device; ...")  # does not raise
    assert (tmp_path / "log.txt").read_text() == before and len(log) == 1 and stray_files(tmp_path) == []
    assert "ERROR: cannot write 'latest.pth'" in caplog.text  # the logger (the console) still has it


def test_the_engine_stops_in_one_line_when_log_txt_cannot_be_written(tmp_path, monkeypatch):
    trainer, _ = _trainer(tmp_path, epochs=3)
    monkeypatch.setattr(fileio, "open", failing_open(errno.ENOSPC, "log.txt", 4), raising=False)
    with pytest.raises(UnwritablePathError, match=rf"^cannot write '{re.escape(str(tmp_path / 'log.txt'))}': no "
                                                  r"space left on device; free space on .* and run"):
        trainer.fit(TensorBoard(tmp_path / "tb", enabled=False))
    assert stray_files(tmp_path) == []


# ------------------------------------------------------------------------------------------ do_acnet.py processes
def run(args: list, *, inject: tuple[str, str, int] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    prefix = [str(ROOT / "tests" / "inject_oserror.py"), *map(str, inject)] if inject else []
    return subprocess.run([sys.executable, *prefix, str(ROOT / "do_acnet.py"), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_stopped_by_a_full_disk(result: subprocess.CompletedProcess, run_dir: Path) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert re.fullmatch(rf"do_acnet\.py: error: cannot write '{re.escape(str(run_dir / 'latest.pth'))}': no space "
                        rf"left on device; free space on '{re.escape(str(run_dir))}' and run again with -c continue: "
                        r"the last resumable state, latest\.pth after epoch 1 \(iteration 2\), is intact", lines[0])
    message = lines[0].removeprefix("do_acnet.py: error: ")
    assert (run_dir / "log.txt").read_text().splitlines()[-1].split(" ", 2)[2] == f"ERROR: {message}"
    assert load_state(run_dir / "latest.pth")["epoch"] == 1
    assert stray_files(run_dir) == [] and not (run_dir / "finish.hdf5").exists()
    return message


def test_do_acnet_on_a_full_disk_exits_2_in_one_line_and_continues_after(tmp_path):
    out = tmp_path / "exps"
    run_dir = out / "cfqkbnc_acb_synthetic_train"
    stopped = run([*TINY, "--epochs", "2", "--output-dir", out], inject=("ENOSPC", "latest.pth", 2))
    assert_stopped_by_a_full_disk(stopped, run_dir)
    resumed = run([*TINY, "--epochs", "2", "--output-dir", out, "-c", "continue"])
    assert resumed.returncode == 0, resumed.stderr
    assert (run_dir / "finish_deploy.hdf5").is_file() and json.loads((run_dir / "summary.json").read_text())


def test_a_full_disk_before_training_is_one_line_too(tmp_path, capsys, monkeypatch):
    """recipe.json, the first file a run writes, on a full disk: one line, status 2, no temporary file."""
    import do_acnet

    monkeypatch.setattr(fileio, "open", failing_open(errno.ENOSPC, "recipe.json", 1), raising=False)
    with pytest.raises(SystemExit) as info:
        do_acnet.main([*TINY, "--epochs", "1", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    run_dir = tmp_path / "cfqkbnc_acb_synthetic_train"
    assert info.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.strip() == (f"do_acnet.py: error: cannot write '{run_dir / 'recipe.json'}': no space left on device; "
                           f"free space on the file system of '{run_dir}' (the previous file, if any, is intact) "
                           "and try again")
    assert stray_files(tmp_path) == [] and not (run_dir / "recipe.json").exists()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2.5 MiB tmpfs (room for init.hdf5 and one latest.pth of the tiny run, not two); skipped where this
    user may not mount one."""
    mount = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2560k", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_do_acnet_on_a_real_full_tmpfs(small_tmpfs):
    """The second latest.pth does not fit beside the first: stopped in one line, the first intact."""
    run_dir = small_tmpfs / "cfqkbnc_acb_synthetic_train"
    stopped = run([*TINY, "--epochs", "2", "--output-dir", small_tmpfs])
    assert_stopped_by_a_full_disk(stopped, run_dir)


def test_a_full_disk_under_convert_is_one_line_with_no_partial_file(small_tmpfs, tmp_path, capsys):
    import constructor
    import do_acnet

    src = tmp_path / "w.hdf5"
    save_hdf5(constructor.build_model("cfqkbnc", "acb").state_dict(), src)
    free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
    (small_tmpfs / "filler").write_bytes(b"\0" * (free - 200 * 1024))  # 200 KiB left: the deploy weights need ~470
    with pytest.raises(SystemExit) as info:
        do_acnet.main(["-a", "cfqkbnc", "-b", "acb", "--convert", str(src), str(small_tmpfs / "deploy.hdf5")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert re.fullmatch(rf"do_acnet\.py: error: cannot write '{re.escape(str(small_tmpfs / 'deploy.hdf5'))}': no space "
                        rf"left on device; free space on the file system of '{re.escape(str(small_tmpfs))}' .*",
                        err.strip()), err
    assert sorted(os.listdir(small_tmpfs)) == ["filler"]
