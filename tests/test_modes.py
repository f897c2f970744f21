"""do_acnet.py's table of modes and the run module: one Mode per way to run, typed commands, run names."""
from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys
from pathlib import Path

import pytest

from utils.command import Command
from utils.errors import UsageError
from utils.modes.cli import parse_command
from utils.modes.registry import MODES
from utils.rundir.identity import experiment_name, parse_run_name, qat_experiment_name

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def weights(tmp_path) -> Path:
    path = tmp_path / "w.hdf5"
    path.write_bytes(b"")
    return path


def mode_options(weights: Path, tmp_path: Path) -> dict:
    return {"train": [], "eval": ["--eval-only", str(weights)], "convert": ["--convert", str(weights),
                                                                          str(tmp_path / "d.hdf5")],
            "export": ["--export-onnx", str(weights), str(tmp_path / "m.onnx")],
            "qat": ["--qat", "--init-weights", str(weights)]}


def test_each_mode_is_selected_by_its_option_and_gets_a_typed_command(weights, tmp_path):
    options = mode_options(weights, tmp_path)
    assert set(options) == set(MODES)
    for name, extra in options.items():
        mode, cmd = parse_command(["-a", "src56", "-b", "dbb", "--seed", "3", "--epochs", "2", *extra])
        assert mode is MODES[name] and isinstance(cmd, Command) and cmd.mode == name
        assert (cmd.arch, cmd.block_type, cmd.seed, cmd.dataset, cmd.input_size) == ("src56", "dbb", 3, "cifar10", 32)
        assert cmd.recipe.epochs == 2 and cmd.overrides == {"epochs": 2} and cmd.recipe.lr == 0.2
        with pytest.raises(dataclasses.FrozenInstanceError):
            cmd.seed = 4  # type: ignore[misc]


def test_two_modes_at_once_are_refused(weights, tmp_path):
    options = mode_options(weights, tmp_path)
    for first, second in itertools.combinations([m for m in MODES if m != "train"], 2):
        with pytest.raises(UsageError, match=f"{MODES[first].option} and {MODES[second].option} are separate tools"):
            parse_command(["-a", "cfqkbnc", *options[first], *options[second]])


def test_run_names_round_trip():
    for arch, block, dataset, own, seed in [("src56", "acb", "cifar10", "cifar10", 0),
                                            ("cfqkbnc", "orepa", "synthetic", "cifar10", 2),
                                            ("sres18", "base", "cifar100", "imagenet", 11)]:
        name = experiment_name(arch, block, dataset, own, seed)
        parsed = parse_run_name(name)
        assert (parsed.arch, parsed.block_type) == (arch, block)
        assert parsed.dataset == (None if dataset == own else dataset) and parsed.seed == (seed or None)
    assert experiment_name("src56", "acb", "cifar10", "cifar10") == "src56_acb_train"
    assert qat_experiment_name("cfqkbnc_acb_synthetic_s2_train") == "cfqkbnc_acb_synthetic_s2_qat"


def test_the_command_line_names_the_run_folder(weights, tmp_path):
    _, cmd = parse_command(["-a", "cfqkbnc", "-b", "acb", "--dataset", "synthetic", "--seed", "1",
                            "--output-dir", str(tmp_path)])
    assert cmd.paths().root == tmp_path / "cfqkbnc_acb_synthetic_s1_train"
    assert cmd.qat_name == "cfqkbnc_acb_synthetic_s1_qat"
    _, named = parse_command(["-a", "cfqkbnc", "--exp-name", "mine", "--output-dir", str(tmp_path)])
    assert named.paths().summary == tmp_path / "mine" / "summary.json"


def _without_torch(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter at the repository root where ``import torch`` fails."""
    return subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None\n" + code],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_the_command_lines_parse_without_torch(tmp_path):
    """-h, a refused command line, the table of modes and reproduce.py's plan import no torch."""
    registries = _without_torch("import acnet.registry, data, constructor")
    assert registries.returncode == 0, registries.stderr
    run = "import runpy; sys.argv = {argv!r}; runpy.run_path(sys.argv[0], run_name='__main__')"
    helped = _without_torch(run.format(argv=["do_acnet.py", "-h"]))
    assert helped.returncode == 0 and "--export-onnx" in helped.stdout and "src56" in helped.stdout, helped.stderr
    refused = _without_torch(run.format(argv=["do_acnet.py", "-a", "src56", "--convert", "x", "y", "--qat"]))
    assert refused.returncode == 2 and "--convert and --qat are separate tools" in refused.stderr, refused.stderr
    planned = _without_torch(run.format(argv=["reproduce.py", "--archs", "cfqkbnc", "--blocks", "base", "acb",
                                              "--seeds", "0", "--output-dir", str(tmp_path), "--dry-run", "--",
                                              "--epochs", "1"]))
    assert planned.returncode == 0 and planned.stdout.count("do_acnet.py -a cfqkbnc") == 2, planned.stderr
    table = _without_torch("from utils.modes.cli import parse_command\n"
                           "mode, cmd = parse_command(['-a', 'vc', '-b', 'dbb', '--eval-only', 'w.hdf5'])")
    assert "does not exist" in table.stderr and "UsageError" in table.stderr  # checked, torch never needed
