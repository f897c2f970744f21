"""reproduce.py: planning (names, resume actions, conflicts, option checks), --dry-run, and a tiny real
sweep (2 archs x 2 blocks x 2 seeds, 1 epoch) that is interrupted, resumed without redoing finished runs,
and has one failing run that does not stop the others."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import reproduce

REPO = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--synthetic-num-train", "16", "--synthetic-num-val", "8", "--batch-size", "8",
        "--workers", "0", "--device", "cpu"]
SWEEP = ["--archs", "cfqkbnc", "src56", "--blocks", "base", "acb", "--seeds", "0", "1", "--dataset", "synthetic",
         "--gpus", "cpu", "-n", "1"]
NAMES = [f"{arch}_{block}_synthetic{seed}_train" for arch in ("cfqkbnc", "src56") for block in ("base", "acb")
         for seed in ("", "_s1")]


def dry_run(capsys, out: Path, *extra: str, sweep=SWEEP) -> list:
    assert reproduce.main([*sweep, "--output-dir", str(out), "--dry-run", "--", *TINY, *extra]) == 0
    return capsys.readouterr().out.splitlines()


# ------------------------------------------------------------------------------------------- planning
def test_dry_run_prints_one_do_acnet_command_per_run(tmp_path, capsys):
    lines = dry_run(capsys, tmp_path / "exps")
    assert lines[0].startswith("# 8 runs (CPU, one run at a time)")
    commands = lines[1:]
    assert len(commands) == 8
    assert commands[0] == ("python do_acnet.py -a cfqkbnc -b base --seed 0 --output-dir " + str(tmp_path / "exps")
                           + " --dataset synthetic --no-progress " + " ".join(TINY))
    assert [c.split()[3:8:2] for c in commands[:3]] == [["cfqkbnc", "base", "0"], ["cfqkbnc", "base", "1"],
                                                        ["cfqkbnc", "acb", "0"]]
    assert not (tmp_path / "exps").exists()  # a dry run writes nothing


def test_dry_run_with_torchrun_groups(tmp_path, capsys):
    sweep = ["--archs", "vc", "--blocks", "dbb", "--seeds", "3", "--gpus", "0,1,2,3", "--nproc-per-run", "2",
             "--dataset", "synthetic"]
    header, line = dry_run(capsys, tmp_path, sweep=sweep)
    assert header.startswith("# 1 runs (2 run(s) at a time on GPUs 0,1 | 2,3)")
    assert line.startswith("python -m torch.distributed.run --standalone --nproc-per-node=2 do_acnet.py -a vc -b dbb "
                           "--seed 3 ")


def test_resume_actions_from_the_run_folders(tmp_path, capsys):
    out = tmp_path / "exps"
    (out / NAMES[1]).mkdir(parents=True)
    (out / NAMES[1] / "latest.pth").write_bytes(b"state")  # interrupted: continue
    (out / NAMES[2]).mkdir()
    (out / NAMES[2] / "log.txt").write_text("")  # killed before its first epoch: from scratch
    recipe = {"arch": "cfqkbnc", "block_type": "acb", "dataset": "synthetic", "seed": 1, "epochs": 1,
              "batch_size": 8, "synthetic_num_train": 16, "synthetic_num_val": 8}
    for name, epochs in ((NAMES[3], 1), (NAMES[4], 7)):
        (out / name).mkdir()
        (out / name / "summary.json").write_text("{}")
        (out / name / "recipe.json").write_text(json.dumps({**recipe, "epochs": epochs}))
    (out / NAMES[4] / "recipe.json").write_text(json.dumps({**recipe, "arch": "src56", "block_type": "base",
                                                            "seed": 0, "epochs": 7}))
    lines = dry_run(capsys, out)
    assert lines[2].endswith(" -c continue") and "-c" not in lines[3].split()
    assert lines[4] == f"# done: {NAMES[3]}"
    assert lines[5] == (f"# conflict: {NAMES[4]}: finished with another recipe: epochs 7 (sweep: 1); "
                        "use another --output-dir or remove the folder")


@pytest.mark.parametrize("extra, message", [
    (["--seed", "3"], "seed is set by the sweep, not after '--': use --seeds"),
    (["--seed", "0"], "seed is set by the sweep"),  # even the default: it would override every run's
    (["--se=2"], "seed is set by the sweep"),  # an abbreviation argparse accepts
    (["--arch", "cfqkbnc"], "arch is set by the sweep"),
    (["-a", "vc"], "arch is set by the sweep"),
    (["--output-dir", "x"], "output-dir is set by the sweep, not after '--': use --output-dir"),
    (["-c", "continue"], "conti-or-fs is set by the sweep"),
    (["--epochs", "x"], "options for do_acnet.py: argument --epochs: invalid int value: 'x'"),
    (["--lr", "-1"], "bad value"),
    (["--eval-only", "w.hdf5"], "eval-only is set by the sweep, not after '--': use (training only)"),
    (["--convert", "a", "b"], "convert is set by the sweep"),
    (["--export-onnx", "w.hdf5", "m.onnx"], "export-onnx is set by the sweep"),  # every mode that is no training
    (["--qat"], "qat is set by the sweep"),  # run, from the table of modes
])
def test_bad_extra_options_are_one_line(tmp_path, capsys, extra, message):
    assert reproduce.main([*SWEEP, "--output-dir", str(tmp_path), "--dry-run", "--", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("reproduce.py: error: ") and message in err[-1]


@pytest.mark.parametrize("argv, message", [
    (["--archs", "nope"], "unknown arch 'nope'; choose from cfqkbnc"),
    (["--archs", "vc", "--blocks", "xyz"], "unknown block type 'xyz'"),
    (["--archs", "vc", "--gpus", "0,a"], "--gpus takes comma-separated GPU ids"),
    (["--archs", "vc", "--gpus", "0", "--nproc-per-run", "2"], "--nproc-per-run 2 needs that many GPUs"),
])
def test_bad_sweep_options_are_one_line(capsys, argv, message):
    assert reproduce.main([*argv, "--dry-run"]) == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------ a real sweep
def sweep_command(out: Path) -> list:
    return [sys.executable, str(REPO / "reproduce.py"), *SWEEP, "--output-dir", str(out), "--", *TINY]


def processes_mentioning(text: str) -> list:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def headers(run: Path) -> int:
    """How many times reproduce.py started this run (one header line in console.txt per start)."""
    lines = (run / "console.txt").read_text().splitlines()
    return sum("reproduce.py:" in line and line.startswith("# ") for line in lines)


def test_a_sweep_interrupted_resumed_and_with_a_failing_run(tmp_path, capsys):
    out = tmp_path / "exps"
    broken = out / "src56_base_synthetic_s1_train"
    broken.mkdir(parents=True)
    (broken / "latest.pth").write_bytes(b"not a checkpoint")  # this run fails (-c continue on a corrupt state)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}

    # 1. start the sweep, interrupt it (Ctrl-C) once a run has finished
    first = subprocess.Popen(sweep_command(out), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list(out.glob("*/summary.json")) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGINT)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 130, stdout + stderr
    assert stderr.strip().splitlines()[-1].startswith("reproduce.py: interrupted: stopped 1 running run(s)")
    assert "Traceback" not in stderr
    assert processes_mentioning(str(out)) == []  # no run left behind
    done_before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}
    assert NAMES[0] in done_before and 1 <= len(done_before) < 8
    assert "starting cfqkbnc_base_synthetic_train on CPU" in stdout

    # 2. the same command again: finished runs are skipped, the rest done, the broken one reported
    second = subprocess.run(sweep_command(out), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 1, second.stdout + second.stderr
    lines = second.stdout.splitlines()
    assert lines[0].startswith(f"sweep of 8 runs into {out}: {len(done_before)} already done")
    for name, mtime in done_before.items():
        assert (out / name / "summary.json").stat().st_mtime_ns == mtime, f"{name} was redone"
        assert headers(out / name) == 1
        assert f"starting {name}" not in second.stdout
    assert "continuing src56_base_synthetic_s1_train on CPU" in second.stdout
    failed = [line for line in lines if "FAILED src56_base_synthetic_s1_train (exit status 1)" in line]
    assert failed and "do_acnet.py: error:" in failed[0] and f"[log: {broken / 'console.txt'}]" in failed[0]
    assert "sweep finished in" in second.stdout and "7/8 runs done, 1 failed" in second.stdout
    for name in NAMES:
        assert (out / name / "summary.json").is_file() == (name != broken.name), name
        summary = json.loads((out / name / "summary.json").read_text()) if name != broken.name else None
        if summary:
            assert (summary["seed"], summary["epochs"], summary["dataset"]) == (int("_s1" in name), 1, "synthetic")
    progress = [line for line in lines if line.startswith("[")]
    assert progress[-1].startswith("[7/8 done, 0 running, 1 failed, 0 queued")
    assert any("; ETA " in line for line in progress)

    # 3. it ends with the statistics over seeds of the sweep's runs
    tables = second.stdout[second.stdout.index("Over seeds"):]
    groups = [line.split() for line in tables.splitlines()[3:7]]
    assert [(g[0], g[2], g[3], g[4]) for g in groups] == [
        ("cfqkbnc", "base", "2", "0,1"), ("cfqkbnc", "acb", "2", "0,1"), ("src56", "base", "1", "0"),
        ("src56", "acb", "2", "0,1")]
    comparison = tables[tables.index("Base vs ACB/DBB"):]
    src56 = next(line for line in comparison.splitlines() if line.startswith("src56"))
    assert "no interval: 1 finished base and 2 finished acb run(s)" in src56
    cfqkbnc = next(line for line in comparison.splitlines() if line.startswith("cfqkbnc")).split()
    assert cfqkbnc[3:5] == ["2", "2"] and cfqkbnc[10] != "-"  # an interval and a p-value

    # 4. a run killed after training (finish.hdf5, no summary.json yet) is continued, not retrained
    resumed = out / NAMES[3]
    (resumed / "summary.json").unlink()
    (resumed / "finish_deploy.hdf5").unlink()
    finish = (resumed / "finish.hdf5").stat().st_mtime_ns
    third = subprocess.run(sweep_command(out), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 1, third.stdout + third.stderr
    assert third.stdout.splitlines()[0].startswith(
        f"sweep of 8 runs into {out}: 6 already done, 2 to continue, 0 to start")
    assert f"continuing {NAMES[3]} on CPU" in third.stdout and f"done {NAMES[3]} in" in third.stdout
    assert (resumed / "summary.json").is_file() and (resumed / "finish.hdf5").stat().st_mtime_ns == finish
    assert "finish.hdf5 exists: training skipped" in (resumed / "log.txt").read_text()

    # 5. a sweep of another recipe into the same folder does not take these runs for its own
    capsys.readouterr()
    assert reproduce.main([*SWEEP, "--output-dir", str(out), "--dry-run", "--", "--epochs", "2", *TINY[2:]]) == 0
    conflicts = [line for line in capsys.readouterr().out.splitlines() if line.startswith("# conflict:")]
    assert len(conflicts) == 7 and all("epochs 1 (sweep: 2)" in line for line in conflicts)


def test_the_readme_sweep_commands_plan_as_described(tmp_path, capsys, monkeypatch):
    import shlex

    from quickstart import DOCS, code_blocks, section

    (block,) = code_blocks(section("Reproducing a table", DOCS / "reproducing.md"), "bash")
    commands = [shlex.split(line) for line in block.strip().splitlines()]
    monkeypatch.chdir(tmp_path)
    expected = {"cfqkbnc src56 vc": 45, "cfqkbnc": 9}
    for argv in commands:
        assert argv[:2] == ["python", "reproduce.py"]
        own, extra = reproduce.split_extra(argv[2:])
        assert reproduce.main([*own, "--gpus", "cpu", "--dry-run", "--", *extra]) == 0
        lines = capsys.readouterr().out.splitlines()
        archs = " ".join(argv[argv.index("--archs") + 1:argv.index("--blocks")])
        assert lines[0].startswith(f"# {expected[archs]} runs (CPU") and len(lines) == expected[archs] + 1
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("visible, expected", [(None, 2), ("1", 1), ("0,1", 2), ("", 0), ("-1", 0), ("1,7,0", 1),
                                               ("GPU-5f0e,GPU-77aa", 2)])
def test_gpus_are_counted_as_cuda_sees_them_without_torch(tmp_path, monkeypatch, visible, expected):
    """--gpus auto: nvidia-smi's GPUs, narrowed by CUDA_VISIBLE_DEVICES (up to its first entry that is no device)."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-5f0e)'\necho 'GPU 1: NVIDIA H100 (UUID: GPU-77aa)'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert reproduce.visible_gpu_count() == expected
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # no driver: CPU
    assert reproduce.visible_gpu_count() == 0
