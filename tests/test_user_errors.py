"""What users bring, through every entry point: files that are no weights files, places that cannot be
written, a run directory for --eval-only, a finished run re-used with another recipe, Ctrl-C, --amp
without native bf16, a batch larger than the training set, and the relative logit difference. Each
ends in one line (or does what was asked and says so), never a traceback or a partial file.

Unwritable places are paths under a regular file: that fails for root too (CI runs as root, for whom
a read-only mode bit means nothing)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import do_acnet
import kernel_skeleton
import robustness
import show_log
from acnet import WeightsError, acnet_fuse_and_load, load_state_dict_file
from utils.engine import guards
from utils.engine.evaluation import load_model_for_eval

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = ["-a", "cfqkbnc", "-b", "acb", "--dataset", "synthetic"]
TINY_RUN = ["--epochs", "1", "--synthetic-num-train", "64", "--synthetic-num-val", "32", "--batch-size", "32",
            "--no-progress"]
NOT_WEIGHTS = r"'[^']*n\.pth' is not a weights file: neither hdf5 nor a torch checkpoint, it is a text file"


def one_error_line(err: str, pattern: str) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    assert len(lines) == 1 and re.search(pattern, lines[0]), err


def main_fails(argv, capsys, status: int, pattern: str) -> None:
    with pytest.raises(SystemExit) as info:
        do_acnet.main([str(a) for a in argv])
    assert info.value.code == status
    one_error_line(capsys.readouterr().err, pattern)


@pytest.fixture
def notes(tmp_path) -> Path:
    path = tmp_path / "n.pth"
    path.write_text("see notes\n")
    return path


@pytest.fixture
def blocked(tmp_path) -> Path:
    """A regular file: any path under it cannot be created."""
    path = tmp_path / "a_file"
    path.write_text("not a directory\n")
    return path


def no_files_left(directory: Path, *allowed: str) -> None:
    found = sorted(p.name for p in directory.rglob("*"))
    assert found == sorted(allowed), found


# ------------------------------------------------------------------------------ bad weights files
def test_the_issues_text_file_through_eval_only_is_one_line_in_a_real_process(notes):
    result = subprocess.run([sys.executable, str(ROOT / "do_acnet.py"), *SYNTHETIC, "--eval-only", str(notes)],
                            cwd=notes.parent, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and re.search(NOT_WEIGHTS, result.stderr), result.stderr


def test_a_text_file_is_a_weights_error_through_every_entry_point(notes, tmp_path, capsys):
    main_fails([*SYNTHETIC, "--eval-only", notes, "--synthetic-num-val", "8"], capsys, 1, NOT_WEIGHTS)
    main_fails(["-a", "cfqkbnc", "-b", "acb", "--convert", notes, tmp_path / "d.hdf5"], capsys, 1, NOT_WEIGHTS)
    assert not (tmp_path / "d.hdf5").exists()
    assert robustness.main([str(notes), *SYNTHETIC]) == 2
    one_error_line(capsys.readouterr().err, NOT_WEIGHTS)
    assert kernel_skeleton.main([str(notes)]) == 2
    one_error_line(capsys.readouterr().err, NOT_WEIGHTS)
    for load in (lambda: load_state_dict_file(notes), lambda: load_model_for_eval("cfqkbnc", "acb", notes),
                 lambda: acnet_fuse_and_load(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), notes)):
        with pytest.raises(WeightsError, match=NOT_WEIGHTS):
            load()


def test_a_directory_for_convert_says_it_is_a_directory(tmp_path, capsys):
    main_fails(["-a", "cfqkbnc", "-b", "acb", "--convert", tmp_path, tmp_path / "d.hdf5"], capsys, 2,
               "is a directory")


# ------------------------------------------------------------------------------ --eval-only DIR
def test_eval_only_of_a_run_directory_evaluates_its_deploy_weights(quickstart_run, capsys, caplog):
    caplog.set_level("INFO", logger="do_acnet")
    do_acnet.main([*SYNTHETIC, "--eval-only", str(quickstart_run)])
    out = capsys.readouterr().out
    assert out.startswith(f"{quickstart_run / 'finish_deploy.hdf5'} on synthetic (256 images): top1=")
    assert f"{quickstart_run} is a run directory: evaluating its finish_deploy.hdf5" in caplog.text


def test_eval_only_of_a_directory_without_weights_says_so(tmp_path, capsys):
    main_fails([*SYNTHETIC, "--eval-only", tmp_path], capsys, 2,
               r"is a directory with no weights file \(neither finish_deploy\.hdf5 nor finish\.hdf5")


# ------------------------------------------------------------------------------ unwritable places
def test_an_unwritable_output_dir_is_one_line_and_writes_nothing(blocked, capsys):
    main_fails([*SYNTHETIC, *TINY_RUN, "--output-dir", blocked / "exps"], capsys, 2,
               rf"cannot write '{re.escape(str(blocked))}/exps/cfqkbnc_acb_synthetic_train': "
               rf"'{re.escape(str(blocked))}' is a file, not a directory")


def test_an_unwritable_convert_destination_is_one_line(quickstart_run, blocked, tmp_path, capsys):
    src = quickstart_run / "finish.hdf5"
    main_fails(["-a", "cfqkbnc", "-b", "acb", "--convert", src, blocked / "deploy.hdf5"], capsys, 2,
               "is a file, not a directory")
    main_fails(["-a", "cfqkbnc", "-b", "acb", "--convert", src, tmp_path], capsys, 2,
               rf"cannot write '{re.escape(str(tmp_path))}': it is a directory")
    no_files_left(tmp_path, "a_file")


def test_an_unwritable_plot_is_one_line(quickstart_run, blocked, capsys):
    pytest.importorskip("matplotlib")
    assert show_log.main([str(quickstart_run.parent), "--plot", str(blocked / "top1.png")]) == 2
    err = capsys.readouterr().err
    one_error_line(err, r"^show_log\.py: error: --plot: cannot write .*top1\.png': .*a_file' is a file")
    no_files_left(blocked.parent, "a_file")


# ------------------------------------------------------------------------------ runs that would do something else
def copy_of_quickstart_run(quickstart_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "exps"
    shutil.copytree(quickstart_run, out / quickstart_run.name)
    return out


def test_a_finished_run_with_another_recipe_is_refused(quickstart_run, tmp_path, capsys):
    out = copy_of_quickstart_run(quickstart_run, tmp_path)
    run = out / quickstart_run.name
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    main_fails([*SYNTHETIC, "--epochs", "4", "--lr", "0.05", "--output-dir", out], capsys, 2,
               r"holds a finished run with a different recipe: lr=0\.05 \(run has 0\.1\), epochs=4 \(run has 3\); "
               r".*new --exp-name, or remove that folder")
    main_fails([*SYNTHETIC, "--output-dir", out], capsys, 2, r"epochs=150 \(run has 3\)")  # the arch's default
    # another seed is another run folder, unless --exp-name names this one
    main_fails([*SYNTHETIC, "--epochs", "3", "--seed", "1", "--exp-name", run.name, "--output-dir", out], capsys, 2,
               r"seed=1 \(run has 0\)")
    main_fails([*SYNTHETIC, "--epochs", "5", "-c", "continue", "--output-dir", out], capsys, 2, r"epochs=5")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_a_batch_larger_than_the_training_set_is_refused(tmp_path, capsys):
    main_fails([*SYNTHETIC, "--epochs", "1", "--synthetic-num-train", "40", "--batch-size", "64",
                "--output-dir", tmp_path / "exps"], capsys, 2,
               r"global batch size 64 is larger than the training set \(40 images\): every epoch would be one "
               r"batch of 40.*--batch-size 40 or less")
    assert not (tmp_path / "exps").exists()


def test_amp_on_a_cpu_without_native_bf16_is_warned_once(tmp_path, monkeypatch):
    monkeypatch.setattr(guards, "cpu_has_native_bf16", lambda: False)
    do_acnet.main([*SYNTHETIC, *TINY_RUN, "--amp", "--output-dir", str(tmp_path)])
    log = (tmp_path / "cfqkbnc_acb_synthetic_train" / "log.txt").read_text()
    assert log.count("--amp on a CPU without native bf16") == 1 and "several times slower" in log
    monkeypatch.setattr(guards, "cpu_has_native_bf16", lambda: True)
    assert guards.amp_cpu_warning("cpu", True) is None and guards.amp_cpu_warning("cuda", True) is None


@pytest.mark.parametrize("flags, native", [("fpu sse avx2 avx512f", False), ("avx512f avx512_bf16", True),
                                           ("amx_bf16 amx_tile", True)])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, flags, native):
    (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert guards.cpu_has_native_bf16(tmp_path / "cpuinfo") is native
    assert guards.cpu_has_native_bf16(tmp_path / "absent") is None


def test_resume_command_replaces_any_conti_option():
    assert guards.resume_argv(["-a", "x", "-c", "fs", "--epochs", "3"]) == ["-a", "x", "--epochs", "3", "-c",
                                                                            "continue"]
    assert guards.resume_argv(["--conti-or-fs=fs", "-cfs", "-a", "x"]) == ["-a", "x", "-c", "continue"]


def test_ctrl_c_during_training_is_one_line_with_the_resume_command(tmp_path):
    """SIGINT to a real training process after its first saved epoch."""
    argv = [*SYNTHETIC, "--epochs", "40", "--synthetic-num-train", "128", "--synthetic-num-val", "16",
            "--batch-size", "32", "--no-progress", "--print-freq", "1", "--workers", "0"]
    process = subprocess.Popen([sys.executable, str(ROOT / "do_acnet.py"), *argv], cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = tmp_path / "acnet_exps" / "cfqkbnc_acb_synthetic_train" / "log.txt"
    try:
        deadline = time.monotonic() + 240
        while not (log.is_file() and "saved resumable state" in log.read_text()):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.2)
        time.sleep(0.5)  # into the next epoch
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    run = log.parent
    one_error_line(err, rf"interrupted in epoch \d+/40 at iteration \d+; {re.escape(str(Path('acnet_exps', run.name)))}"
                        r"/latest\.pth holds the state after epoch \d+ \(iteration \d+\); resume with: python "
                        r"do_acnet\.py .* -c continue$")
    saved_epoch = int(re.search(r"after epoch (\d+)", err).group(1))
    assert not list(run.rglob("*.tmp")) and not (run / "finish.hdf5").exists()
    import show_log  # the log says how the run ended, so show_log leaves it out of the statistics

    record = show_log.read_run(run)
    assert (record.state, record.end_message.split(" at ")[0]) == ("interrupted", f"interrupted in epoch {saved_epoch + 1}/40")
    state = torch.load(run / "latest.pth", weights_only=True)
    assert state["epoch"] == saved_epoch
    command = err.split("resume with: ", 1)[1].split()
    assert command[:2] == ["python", "do_acnet.py"] and command[2:-2] == argv


# ------------------------------------------------------------------------------ relative logit difference
def test_summary_states_the_logit_difference_relative_to_the_logits(quickstart_run):
    import data
    from utils.engine.posttrain import relative_logit_diff

    summary = json.loads((quickstart_run / "summary.json").read_text())
    log = (quickstart_run / "log.txt").read_text()
    match = re.search(r"max abs logit diff (\S+) \(relative (\S+) of max \|logit\| (\S+)\)", log)
    assert match, log
    diff, relative, scale = map(float, match.groups())
    assert summary["max_rel_logit_diff"] == pytest.approx(summary["max_abs_logit_diff"] / scale, rel=2e-3)
    assert relative == pytest.approx(summary["max_rel_logit_diff"], rel=2e-3) and diff > 0
    # the scale is the training-time model's largest |logit| on the test set
    model = load_model_for_eval("cfqkbnc", "acb", quickstart_run / "finish.hdf5")
    _, loader = data.create_loaders("synthetic", None, 128, num_train=1, num_val=256)
    with torch.no_grad():
        largest = max(model(images).abs().max().item() for images, _ in loader)
    assert scale == pytest.approx(largest, rel=2e-3)
    assert relative_logit_diff(5.15e10, 1e16) == pytest.approx(5.15e-6) and relative_logit_diff(0.0, 0.0) == 0.0
