"""A refused command is the short usage hint and the one error line README promises (not argparse's whole
usage), for do_acnet.py, reproduce.py and show_log.py; a corrupt or truncated latest.pth (-c continue) or
hdf5 weights file (--convert, --eval-only, --init-weights) is one line naming the file and the fix."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import constructor
import do_acnet
import reproduce
import show_log
from acnet import save_hdf5
from utils.rundir.checkpoint import save_state

ROOT = Path(__file__).resolve().parents[1]
HINT = {"do_acnet.py": "usage: do_acnet.py -a ARCH -b BLOCK [options]; see -h",
        "reproduce.py": "usage: reproduce.py --archs ARCH [ARCH ...] [options] [-- do_acnet.py options]; see -h",
        "show_log.py": "usage: show_log.py [ROOT] [EXCLUDE ...] [options]; see -h"}
SYNTHETIC = ["-a", "cfqkbnc", "-b", "acb", "--dataset", "synthetic", "--synthetic-num-train", "32",
             "--synthetic-num-val", "16", "--batch-size", "16", "--workers", "0", "--no-progress"]


def hint_and_error(err: str, script: str, pattern: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0] == HINT[script], err
    assert re.fullmatch(rf"{re.escape(script)}: error: {pattern}", lines[1]), err


# ------------------------------------------------------------------------------------------ the usage hint
@pytest.mark.parametrize("argv,pattern", [
    (["-a", "cfqkbnc", "--epochs", "0"], r".*epochs must be >= 1, got 0"),  # a check of ours
    (["-a", "resnet9000"], r"argument -a/--arch: invalid choice: 'resnet9000' .*"),  # argparse's own
    (["-b", "acb"], r"the following arguments are required: -a/--arch"),
    (["-a", "cfqkbnc", "--epochs", "x"], r"argument --epochs: invalid int value: 'x'"),
    (["-a", "cfqkbnc", "--convert", "a.hdf5", "b.hdf5", "--eval-only", "c.hdf5"], r"--eval-only and --convert .*"),
])
def test_do_acnet_refusals_are_the_hint_and_one_line(argv, pattern, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        do_acnet.main(argv)
    assert info.value.code == 2
    hint_and_error(capsys.readouterr().err, "do_acnet.py", pattern)
    assert os.listdir(tmp_path) == []


def test_a_refusal_found_while_running_has_the_hint_too(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        do_acnet.main([*SYNTHETIC, "--sync-bn", "--output-dir", str(tmp_path / "exps")])
    assert info.value.code == 2
    hint_and_error(capsys.readouterr().err, "do_acnet.py", r"--sync-bn needs CUDA .*")


@pytest.mark.slow
def test_a_real_process_prints_the_two_lines():
    refused = subprocess.run([sys.executable, str(ROOT / "do_acnet.py"), "-a", "cfqkbnc", "--lr", "-1"], cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stdout == ""
    hint_and_error(refused.stderr, "do_acnet.py", r".*lr must be > 0.*")


def test_help_still_prints_the_whole_usage(capsys):
    with pytest.raises(SystemExit) as info:
        do_acnet.main(["-h"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and out.startswith("usage: do_acnet.py [-h] -a ARCH")
    assert "--export-onnx" in out and "--seed" in out


def test_reproduce_and_show_log_refusals_are_the_hint_and_one_line(tmp_path, capsys):
    assert reproduce.main(["--archs", "nosuch"]) == 2
    hint_and_error(capsys.readouterr().err, "reproduce.py", r"unknown arch 'nosuch'; choose from .*")
    with pytest.raises(SystemExit) as info:
        reproduce.main(["--blocks", "acb"])
    assert info.value.code == 2
    hint_and_error(capsys.readouterr().err, "reproduce.py", r"the following arguments are required: --archs")
    with pytest.raises(SystemExit) as info:
        show_log.main([str(tmp_path), "--bogus"])
    assert info.value.code == 2
    hint_and_error(capsys.readouterr().err, "show_log.py", r"unrecognized arguments: --bogus")


# ------------------------------------------------------------------------------------------ corrupt files
def one_error_line(capsys, argv, status: int, pattern: str) -> None:
    with pytest.raises(SystemExit) as info:
        do_acnet.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert info.value.code == status and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and re.fullmatch(rf"do_acnet\.py: error: {pattern}", err.strip()), err


@pytest.mark.parametrize("keep", [0, 100, 0.5], ids=["empty", "100_bytes", "half"])
def test_a_truncated_latest_pth_is_one_line_naming_it_and_the_fix(keep, tmp_path, capsys):
    run_dir = tmp_path / "exps" / "cfqkbnc_acb_synthetic_train"
    state = run_dir / "latest.pth"
    save_state({"model": constructor.build_model("cfqkbnc", "acb").state_dict(), "epoch": 1}, state)
    data = state.read_bytes()
    state.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
    one_error_line(capsys, [*SYNTHETIC, "--output-dir", tmp_path / "exps", "-c", "continue"], 1,
                   rf"the resumable state {re.escape(str(state))} is unreadable or corrupt \((an empty file|\d+ bytes; "
                   r"\w+: [^;]+); a copy cut short or a disk error leaves such a file\): it cannot be resumed; start "
                   r"the run over with a new --exp-name, or delete it and run with -c fs")
    assert sorted(p.name for p in run_dir.iterdir()) == ["latest.pth"]  # nothing else written, the file kept


@pytest.fixture(scope="module")
def truncated_hdf5(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "finish.hdf5"
    save_hdf5(constructor.build_model("cfqkbnc", "acb").state_dict(), path)
    path.write_bytes(path.read_bytes()[:4096])
    return path


@pytest.mark.parametrize("mode", ["convert", "eval_only", "init_weights"])
def test_a_truncated_hdf5_is_one_line_for_every_tool(mode, truncated_hdf5, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = {"convert": ["--convert", truncated_hdf5, tmp_path / "deploy.hdf5"],
             "eval_only": ["--eval-only", truncated_hdf5],
             "init_weights": ["--init-weights", truncated_hdf5, "--epochs", "1", "--output-dir", tmp_path / "exps"]}
    one_error_line(capsys, [*SYNTHETIC, *extra[mode]], 1,
                   rf"'{re.escape(str(truncated_hdf5))}' is not a readable hdf5 weights file \(corrupt, truncated or "
                   r"another format\): .*truncated file.*\. Re-create it, .*")
    assert os.listdir(tmp_path) == []
