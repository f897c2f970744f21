"""robustness.py: the distortions, symmetric inputs scoring the same, and the check on a tiny real run."""
from __future__ import annotations

import argparse
import csv
import io
import json

import numpy as np
import pytest
import torch
from torch import nn

import robustness


def test_distortions_match_numpy():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    expected = {
        "original": images.numpy(),
        "flip_left_right": images.numpy()[..., ::-1],
        "flip_up_down": images.numpy()[..., ::-1, :],
        "rotate_90": np.rot90(images.numpy(), 1, axes=(2, 3)),
        "rotate_180": np.rot90(images.numpy(), 2, axes=(2, 3)),
    }
    assert list(robustness.DISTORTIONS) == list(expected)
    for name, transform in robustness.DISTORTIONS.items():
        np.testing.assert_array_equal(transform(images).numpy(), expected[name], err_msg=name)


def test_rotation_of_non_square_images_is_a_clear_error():
    with pytest.raises(ValueError, match="square images, got 4x6"):
        robustness.rotate90(torch.zeros(1, 3, 4, 6))


class TinyNet(nn.Module):
    """A conv net with no built-in symmetry: flipped inputs give different logits in general."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def batches(symmetric_axes=(), seed=0, count=3, batch=16):
    generator = torch.Generator().manual_seed(seed)
    result = []
    for _ in range(count):
        images = torch.randn(batch, 3, 8, 8, generator=generator)
        for axis in symmetric_axes:
            images = images + images.flip(axis)
        result.append((images, torch.randint(0, 5, (batch,), generator=generator)))
    return result


def test_horizontally_symmetric_inputs_score_the_same_flipped():
    model = TinyNet().eval()
    results = robustness.robustness_metrics(model, batches(symmetric_axes=(3,)), "cpu")
    assert set(results) == set(robustness.DISTORTIONS)
    assert results["flip_left_right"] == results["original"]
    assert results["original"]["num_samples"] == 48
    # both-axes-symmetric inputs: up-down flip and 180-degree rotation change nothing either
    both = robustness.robustness_metrics(model, batches(symmetric_axes=(2, 3)), "cpu")
    assert both["flip_up_down"] == both["original"] == both["rotate_180"]


def test_distortions_do_reach_the_model():
    model = TinyNet().eval()
    results = robustness.robustness_metrics(model, batches(), "cpu")
    losses = {name: metrics["loss"] for name, metrics in results.items()}
    assert len(set(losses.values())) == len(losses)


def fake_results():
    def metrics(top1):
        return {"top1": top1, "top5": 99.0, "loss": 0.5, "num_samples": 100}
    return {
        "base": {"original": metrics(90.0), "flip_left_right": metrics(89.5), "rotate_90": metrics(40.0)},
        "acb": {"original": metrics(91.0), "flip_left_right": metrics(91.0), "rotate_90": metrics(45.25)},
    }


def test_result_tables():
    headers, rows = robustness.result_rows(fake_results(), "text")
    assert headers == ["distortion", "base top1", "drop", "acb top1", "drop"]
    assert rows == [["original", "90.00", "", "91.00", ""],
                    ["flip_left_right", "89.50", "-0.50", "91.00", "+0.00"],
                    ["rotate_90", "40.00", "-50.00", "45.25", "-45.75"]]
    headers, rows = robustness.result_rows(fake_results(), "csv")
    assert rows[5] == ("acb", "rotate_90", "45.2500", "99.0000", "0.500000", "-45.75", "100")


def make_args(**overrides):
    defaults = dict(arch=None, block_type=None, dataset=None, num_classes=None, data_dir=None)
    return argparse.Namespace(**{**defaults, **overrides})


def test_resolve_run_directory(tmp_path):
    run = tmp_path / "cfqkbnc_acb_synthetic_train"
    run.mkdir()
    (run / "recipe.json").write_text(json.dumps({"arch": "cfqkbnc", "block_type": "acb", "dataset": "synthetic",
                                                 "seed": 3, "epochs": 3}))
    with pytest.raises(robustness.RobustnessError, match="has neither finish_deploy.hdf5 nor finish.hdf5"):
        robustness.resolve_target(run, make_args())
    (run / "finish.hdf5").write_bytes(b"")
    target = robustness.resolve_target(run, make_args())
    assert (target.arch, target.block_type, target.dataset, target.weights.name) == (
        "cfqkbnc", "acb", "synthetic", "finish.hdf5")
    assert target.data_options == {"image_size": 32, "seed": 3}
    (run / "finish_deploy.hdf5").write_bytes(b"")
    assert robustness.resolve_target(run, make_args()).weights.name == "finish_deploy.hdf5"
    assert target.data_dir is None


def test_run_settings_precedence(tmp_path):
    """summary.json over recipe.json over the directory name; command-line options over all."""
    run = tmp_path / "cfqkbnc_base_cifar100_train"
    run.mkdir()
    (run / "finish.hdf5").write_bytes(b"")
    recipe = {"arch": "cfqkbnc", "block_type": "base", "data_dir": "/data/c100"}
    (run / "recipe.json").write_text(json.dumps(recipe))
    target = robustness.resolve_target(run, make_args())
    assert (target.dataset, target.data_dir) == ("cifar100", "/data/c100")  # the name, as the recipe says none
    (run / "recipe.json").write_text(json.dumps({**recipe, "dataset": "cifar10"}))  # the dataset actually used
    assert robustness.resolve_target(run, make_args()).dataset == "cifar10"
    (run / "summary.json").write_text(json.dumps({"arch": "cfqkbnc", "block_type": "base", "dataset": "synthetic"}))
    assert robustness.resolve_target(run, make_args()).dataset == "synthetic"
    override = robustness.resolve_target(run, make_args(dataset="cifar10", block_type="acb", data_dir="/mine"))
    assert (override.dataset, override.block_type, override.data_dir) == ("cifar10", "acb", "/mine")


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/missing.hdf5", "-a", "cfqkbnc", "-b", "acb"], "no such run directory or weights file"),
    (["{tmp}/w.hdf5"], "say what the weights are with -a/--arch and -b/--block-type"),
    (["{tmp}"], "has no recipe.json"),
    (["{tmp}/w.hdf5", "-a", "nosuchnet", "-b", "acb"], "nosuchnet"),
    (["{tmp}/w.hdf5", "-a", "cfqkbnc", "-b", "acb", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["{tmp}/w.hdf5", "-a", "cfqkbnc", "-b", "acb", "--device", "gpu0"], "is not a device"),
    *([(["{tmp}/w.hdf5", "-a", "cfqkbnc", "-b", "acb", "--device", "cuda"], "CUDA is not available")]
      if not torch.cuda.is_available() else []),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "w.hdf5").write_bytes(b"not hdf5")
    assert robustness.main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("dataset, num_classes", [("cifar10", 10), ("cifar100", 100)])
def test_weights_file_on_cifar_files(tmp_path, capsys, dataset, num_classes):
    """A bare deploy weights file, evaluated on CIFAR files in the official format (head size from the set)."""
    import constructor
    from acnet import save_hdf5
    from fakedata import write_fake_cifar10, write_fake_cifar100

    writer = write_fake_cifar10 if dataset == "cifar10" else write_fake_cifar100
    writer(tmp_path / "data", num_train=20, num_test=40)
    torch.manual_seed(0)
    model = constructor.build_model("cfqkbnc", "dbb", deploy=True, num_classes=num_classes)
    save_hdf5(model.state_dict(), tmp_path / "deploy.hdf5")
    argv = [str(tmp_path / "deploy.hdf5"), "-a", "cfqkbnc", "-b", "dbb", "--dataset", dataset, "--data-dir",
            str(tmp_path / "data"), "--no-download", "--workers", "0", "--device", "cpu", "--format", "csv"]
    assert robustness.main(argv) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["distortion"] for r in rows] == list(robustness.DISTORTIONS)
    assert {r["num_samples"] for r in rows} == {"40"}
    assert rows[0]["run"] == "deploy.hdf5"


def test_missing_dataset_is_one_clear_line(tmp_path, capsys):
    import constructor
    from acnet import save_hdf5

    save_hdf5(constructor.build_model("cfqkbnc", "base", deploy=True).state_dict(), tmp_path / "w.hdf5")
    argv = [str(tmp_path / "w.hdf5"), "-a", "cfqkbnc", "-b", "base", "--data-dir", str(tmp_path / "none"),
            "--no-download"]
    assert robustness.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("robustness.py: error: ") and err.count("\n") == 1, err


def test_tiny_real_run(quickstart_run, capsys):
    """On the README quickstart's run: the undistorted top-1 is the deploy top-1 of its summary."""
    summary = json.loads((quickstart_run / "summary.json").read_text())
    assert robustness.main([str(quickstart_run), "--format", "csv", "--workers", "0", "--batch-size", "64"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["distortion"] for r in rows] == list(robustness.DISTORTIONS)
    assert float(rows[0]["top1"]) == pytest.approx(summary["deploy_top1"], abs=1e-3)
    assert all(int(r["num_samples"]) == int(rows[0]["num_samples"]) > 0 for r in rows)
