"""display_hdf5.py: statistics and totals on original-style and project files, filters, clear errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import display_hdf5

REPO = Path(__file__).resolve().parents[1]


def write_original_style(path: Path) -> dict:
    """An ACB training-time file as the original code writes it: flat datasets, '/' -> '+' (no groups)."""
    rng = np.random.default_rng(0)
    arrays = {
        "stem+square_conv.weight": rng.normal(size=(8, 3, 3, 3)).astype(np.float32),
        "stem+ver_conv.weight": rng.normal(size=(8, 3, 3, 1)).astype(np.float32),
        "stem+hor_conv.weight": rng.normal(size=(8, 3, 1, 3)).astype(np.float32),
        "linear.weight": rng.normal(size=(10, 8)).astype(np.float32),
        "linear.bias": np.zeros(10, np.float32),
    }
    for bn in ("square_bn", "ver_bn", "hor_bn"):
        arrays[f"stem+{bn}.weight"] = np.full(8, 1 / 3, np.float32)
        arrays[f"stem+{bn}.bias"] = np.zeros(8, np.float32)
        arrays[f"stem+{bn}.running_mean"] = rng.normal(size=8).astype(np.float32)
        arrays[f"stem+{bn}.running_var"] = rng.uniform(0.5, 2, size=8).astype(np.float32)
        arrays[f"stem+{bn}.num_batches_tracked"] = np.array(7, dtype=np.int64)
    with h5py.File(path, "w") as handle:
        for key, value in arrays.items():
            handle.create_dataset(key, data=value)
    return arrays


def test_original_style_file_totals(tmp_path, capsys):
    path = tmp_path / "finish.hdf5"
    write_original_style(path)
    assert display_hdf5.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "stem.square_conv.weight" in out and "stem+square_conv" not in out
    totals = display_hdf5.totals_of([display_hdf5.array_stats(n, a, 1e-5) for n, a, _ in display_hdf5.iter_arrays(path)])
    assert (totals.conv_kernel, totals.matrix) == (8 * 3 * 9 + 2 * 8 * 3 * 3, 80)
    assert (totals.bn_mean, totals.bn_var, totals.bn_gamma, totals.bn_beta, totals.bias) == (24, 24, 24, 24, 10)
    assert totals.vector == 4 * 24 + 10 and totals.other == 3
    assert totals.parameters == totals.total - 48
    assert "BN mean 24, var 24, gamma 24, beta 24; bias 10" in out


def test_project_file_parameter_count_matches_torch(tmp_path):
    """A file from acnet.save_hdf5: learnable parameters equal torch's count, in state-dict order."""
    from acnet.hdf5 import save_hdf5

    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 1, bias=True),
                          nn.Flatten(), nn.Linear(4 * 30 * 30, 10))
    path = tmp_path / "w.hdf5"
    save_hdf5(model.state_dict(), path)
    names = [n for n, _, _ in display_hdf5.iter_arrays(path)]
    assert names == list(model.state_dict())
    stats = [display_hdf5.array_stats(n, a, 1e-5) for n, a, _ in display_hdf5.iter_arrays(path)]
    totals = display_hdf5.totals_of(stats)
    assert totals.parameters == sum(p.numel() for p in model.parameters())
    assert (totals.bn_gamma, totals.bn_beta, totals.bias) == (16, 16, 16 + 4 + 10)


def test_array_statistics():
    stats = display_hdf5.array_stats("w", np.array([[-1.0, 0.0], [1e-6, 2.0]], np.float32), 1e-5)
    assert (stats.positive, stats.negative, stats.zero, stats.near_zero) == (2, 1, 1, 2)
    assert stats.mean == pytest.approx(0.25 + 2.5e-7)
    assert stats.std == pytest.approx(np.std([-1.0, 0.0, 1e-6, 2.0]))
    assert display_hdf5.array_stats("e", np.zeros((0, 3)), 1e-5).mean is None
    assert display_hdf5.array_stats("s", np.array(b"text"), 1e-5).mean is None


def test_nested_groups_strings_and_stored_dtype(tmp_path, capsys):
    path = tmp_path / "other.hdf5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("block/conv/kernel", data=np.ones((2, 2, 3, 3), np.float32))
        handle.create_dataset("note", data="trained with something else")
        stored = handle.create_dataset("half+weight", data=np.ones(4, np.float32))
        stored.attrs["torch_dtype"] = "torch.bfloat16"
    assert display_hdf5.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "block.conv.kernel" in out and "2x2x3x3" in out
    assert "float32 (torch.bfloat16)" in out
    assert "conv kernel 36, matrix 0, vector 4, total 40" in out


def test_filter_restricts_rows_and_totals(tmp_path, capsys):
    path = tmp_path / "finish.hdf5"
    write_original_style(path)
    assert display_hdf5.main([str(path), "--filter", "ver_"]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines()[2:] if line.startswith("stem")]
    assert rows and all("ver_" in name for name in rows)
    assert "totals over 6 arrays matching 'ver_'" in out
    assert "conv kernel 72, matrix 0" in out


@pytest.mark.parametrize("kind, message", [
    ("missing", "no such file"),
    ("text", "is not an HDF5 file"),
    ("truncated", "is corrupt or truncated"),
    ("directory", "is a directory"),
])
def test_bad_files_give_one_line_and_nonzero_exit(tmp_path, kind, message):
    path = tmp_path / "w.hdf5"
    if kind == "text":
        path.write_text("epoch 1 top1=3\n")
    elif kind == "truncated":
        write_original_style(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "directory":
        path.mkdir()
    result = subprocess.run([sys.executable, "display_hdf5.py", str(path)], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert result.stdout == ""
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_checkpoint_hint_for_torch_files(tmp_path, capsys):
    path = tmp_path / "model.pth"
    torch.save({"w": torch.ones(2)}, path)
    assert display_hdf5.main([str(path)]) == 2
    assert "acnet.load_state_dict_file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- a real run


@pytest.mark.parametrize("file_name, summary_key", [("finish.hdf5", "params_train"),
                                                    ("finish_deploy.hdf5", "params_deploy")])
def test_parameter_totals_of_a_tiny_real_run(quickstart_run, file_name, summary_key):
    summary = json.loads((quickstart_run / "summary.json").read_text())
    stats = [display_hdf5.array_stats(n, a, 1e-5) for n, a, _ in display_hdf5.iter_arrays(quickstart_run / file_name)]
    assert display_hdf5.totals_of(stats).parameters == summary[summary_key]
