"""A dataset is declared once: one loader function and one ``register_dataset`` line, and every tool has it.

The dataset below is a folder holding ``tiny.npz`` (NumPy's archive, the layout of Keras' ``mnist.npz`` /
``cifar10``: ``x_train`` uint8 NHWC, ``y_train``, ``x_test``, ``y_test``, plus the class names), registered
at run time: no file of the project is edited. do_acnet.py lists it, trains on it from its default folder,
records it in the run, and evaluates and converts the run's weights on it read back from that record; an
arch defined for it takes its input size and class count from it; a 224-pixel arch refuses it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from acnet import load_state_dict_file
from data import DatasetArgumentError, DatasetError, DatasetSpec, LoaderRequest, register_dataset, unregister_dataset

NAME = "tinynpz"
CLASSES = ("red", "green", "blue", "grey")
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------ the new dataset: one function
def build_loaders(request: LoaderRequest):
    """``<data dir>/tiny.npz`` -> (train, eval) loaders: both splits on the device (``data.tensor_loaders``)."""
    path = Path(request.data_dir) / "tiny.npz"
    if not path.is_file():
        raise DatasetError(f"{path} does not exist; write the arrays with numpy.savez or pass --data-dir")
    with np.load(path, allow_pickle=False) as arrays:
        def split(images: str, labels: str):
            return torch.from_numpy(arrays[images]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(arrays[labels])
        train, val, classes = split("x_train", "y_train"), split("x_test", "y_test"), [str(c) for c in arrays["classes"]]
    request.check_fixed("image_size", 32)
    request.check_fixed("num_classes", len(classes))
    return data.tensor_loaders(request, train, val, num_classes=len(classes), classes=classes)


SPEC = DatasetSpec(NAME, f"{__name__}:build_loaders", input_size=32, num_classes=len(CLASSES), mean=MEAN, std=STD,
                   default_dir="tiny_data", description="a tiny npz archive (test)")


@pytest.fixture
def tiny_dataset():
    register_dataset(SPEC)  # the one registration line
    yield SPEC
    unregister_dataset(NAME)


def write_tiny_npz(folder: Path, num_train: int = 64, num_test: int = 32, seed: int = 0) -> Path:
    """Each class a colour plus noise: uint8 NHWC images, int64 labels, the class names."""
    rng = np.random.default_rng(seed)
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [128, 128, 128]])

    def split(count: int):
        labels = np.arange(count) % len(CLASSES)
        images = colours[labels][:, None, None, :] + rng.normal(0, 30, (count, 32, 32, 3))
        return images.clip(0, 255).astype(np.uint8), labels.astype(np.int64)

    (x_train, y_train), (x_test, y_test) = split(num_train), split(num_test)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "tiny.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
             classes=np.array(CLASSES))
    return folder / "tiny.npz"


# ------------------------------------------------------------------------ the tests
@pytest.mark.slow
def test_a_registered_dataset_trains_evaluates_converts_and_is_listed(tiny_dataset, tmp_path, monkeypatch, capsys):
    import do_acnet

    monkeypatch.chdir(tmp_path)  # the data is found in the spec's default folder, ./tiny_data
    write_tiny_npz(tmp_path / "tiny_data")
    with pytest.raises(SystemExit):
        do_acnet.main(["-h"])
    assert NAME in capsys.readouterr().out

    exps = tmp_path / "exps"
    common = ["-a", "cfqkbnc", "-b", "acb", "--workers", "0", "--no-progress"]
    do_acnet.main([*common, "--dataset", NAME, "--epochs", "1", "--batch-size", "32", "--output-dir", str(exps)])
    run = exps / f"cfqkbnc_acb_{NAME}_train"
    recipe = json.loads((run / "recipe.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert recipe["dataset"] == NAME and summary["dataset"] == NAME
    assert summary["max_rel_logit_diff"] < 1e-5
    assert f"on {NAME}" in (run / "log.txt").read_text()
    assert load_state_dict_file(run / "finish.hdf5")["fc2.weight"].shape[0] == len(CLASSES)  # the data's classes

    capsys.readouterr()
    do_acnet.main([*common, "--eval-only", str(run / "finish.hdf5")])  # no --dataset: the run's record says
    deploy = tmp_path / "deploy.hdf5"
    do_acnet.main([*common, "--convert", str(run / "finish.hdf5"), str(deploy)])
    do_acnet.main([*common, "--dataset", NAME, "--eval-only", str(deploy)])
    printed = capsys.readouterr().out
    assert f"{run / 'finish.hdf5'} on {NAME} (32 images): top1={summary['train_top1']:.4f}" in printed
    assert f"{deploy} on {NAME} (32 images): top1={summary['deploy_top1']:.4f}" in printed

    with pytest.raises(SystemExit) as refused:  # a 224-pixel arch does not fit 32x32 images
        do_acnet.main(["-a", "sres18", "-b", "base", "--dataset", NAME, "--output-dir", str(exps)])
    assert refused.value.code == 2
    assert f"--dataset {NAME} does not fit (use one of: imagenet, synthetic)" in capsys.readouterr().err


def test_the_loaders_follow_the_spec(tiny_dataset, tmp_path):
    write_tiny_npz(tmp_path)
    train, val = data.create_loaders(NAME, tmp_path, 16, eval_batch_size=32)
    assert (len(train), len(val), train.num_classes, val.classes) == (4, 1, 4, list(CLASSES))
    images, labels = next(iter(val))
    with np.load(tmp_path / "tiny.npz") as arrays:
        raw = torch.from_numpy(arrays["x_test"]).permute(0, 3, 1, 2).double() / 255
        expected = (raw - torch.tensor(MEAN, dtype=torch.double)[:, None, None]) / torch.tensor(
            STD, dtype=torch.double)[:, None, None]
        assert torch.equal(labels, torch.from_numpy(arrays["y_test"]))
    torch.testing.assert_close(images.double(), expected, rtol=0, atol=1e-5)  # the spec's mean / std
    with pytest.raises(DatasetArgumentError, match=f"dataset '{NAME}' has num_classes 4, but num_classes=10"):
        data.create_loaders(NAME, tmp_path, 16, num_classes=10)
    with pytest.raises(DatasetArgumentError, match=rf"unexpected options \['num_train'\] for dataset '{NAME}'"):
        data.create_loaders(NAME, tmp_path, 16, num_train=4)
    with pytest.raises(DatasetError, match="tiny.npz does not exist"):
        data.create_loaders(NAME, tmp_path / "elsewhere", 16)


def test_a_class_folder_dataset_is_one_spec_line_naming_the_imagenet_factory(tmp_path, monkeypatch):
    from fakedata import write_fake_imagefolder

    spec = register_dataset(DatasetSpec("folders32", "data.imagenet:build_loaders", input_size=32, mean=MEAN, std=STD,
                                        default_dir="folders32_data"))
    try:
        monkeypatch.chdir(tmp_path)
        write_fake_imagefolder(tmp_path / "folders32_data", num_classes=3, per_class_train=2, per_class_val=2)
        train, val = data.create_loaders("folders32", None, 4, workers=0)
        assert (train.image_size, val.num_classes, val.num_samples) == (32, 3, 6)
        images, _ = next(iter(val))
        assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32)
        expected = (images.double() / 255 - torch.tensor(MEAN, dtype=torch.double)[:, None, None]) / torch.tensor(
            STD, dtype=torch.double)[:, None, None]
        torch.testing.assert_close(data.to_device(val, images, "cpu").double(), expected, rtol=0, atol=1e-5)
        register_dataset(DatasetSpec("folders32", spec.loader, input_size=32), replace=True)  # no default folder
        with pytest.raises(DatasetArgumentError, match="'folders32' is read from class folders and has no default"):
            data.create_loaders("folders32", None, 4, workers=0)
    finally:
        unregister_dataset("folders32")


def test_an_arch_defined_for_the_dataset_takes_its_size_and_classes(tiny_dataset):
    import constructor
    from constructor.registry import arch_for_dataset

    spec = arch_for_dataset("tinyquick", NAME, "Cifar-quick on the tiny set", constructor.ARCHS["cfqkbnc"].factory)
    assert (spec.dataset, spec.input_size, spec.num_classes) == (NAME, 32, 4)
    model = spec.build(constructor.make_builder("acb"))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(ValueError, match="'synthetic' declares no input size"):
        arch_for_dataset("x", "synthetic", "", constructor.ARCHS["cfqkbnc"].factory)


def test_the_registry_refuses_bad_entries_and_is_read_live(tiny_dataset):
    from data.imagenet import IMAGENET_MEAN, IMAGENET_STD
    from data.registry import datasets_for_input_size, get_dataset

    assert data.dataset_names()[-1] == NAME and NAME in data.DATASETS and data.DEFAULT_ROOTS[NAME] == "tiny_data"
    assert datasets_for_input_size(32) == ("cifar10", "cifar100", "synthetic", NAME)
    assert datasets_for_input_size(224) == ("imagenet", "synthetic")
    assert datasets_for_input_size(64) == data.dataset_names()  # no dataset declares 64: not checked
    with pytest.raises(ValueError, match="already registered"):
        register_dataset(SPEC)
    with pytest.raises(ValueError, match="non-empty lower-case"):
        register_dataset(DatasetSpec("Tiny", SPEC.loader))
    with pytest.raises(ValueError, match="'package.module:function'"):
        register_dataset(DatasetSpec("tiny2", "tests.test_new_dataset.build_loaders"))
    broken = register_dataset(DatasetSpec("tiny2", "no_such_module:build_loaders"))
    try:
        with pytest.raises(DatasetArgumentError, match="its loader 'no_such_module:build_loaders' cannot be imported"):
            data.create_loaders("tiny2", None, 16)
    finally:
        unregister_dataset(broken.name)
    assert unregister_dataset(NAME) is SPEC and NAME not in data.dataset_names()
    with pytest.raises(DatasetArgumentError, match=f"unknown dataset '{NAME}'; choose one of cifar10, cifar100"):
        data.create_loaders(NAME, None, 16)
    assert (get_dataset("imagenet").mean, get_dataset("imagenet").std) == (IMAGENET_MEAN, IMAGENET_STD)
    register_dataset(SPEC)  # for the fixture's teardown


def test_dataset_names_need_no_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import data, data.registry as registry\n"
            "print(','.join(registry.dataset_names()), ','.join(data.DATASETS), registry.get_dataset('cifar10').default_dir)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    names = "cifar10,cifar100,imagenet,synthetic"
    assert done.stdout.split() == [names, names, "cifar10_data"]
