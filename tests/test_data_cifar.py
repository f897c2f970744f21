"""CIFAR files: the on-disk format, the restricted unpickler, and every documented error."""
from __future__ import annotations

import os
import pickle
import pickletools
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from data import DatasetError, create_loaders
from data.cifar import load_cifar, read_cifar_batch
from fakedata import write_fake_cifar10, write_fake_cifar100


def _trusted_load(path: Path) -> dict:
    with open(path, "rb") as fh:
        return pickle.load(fh, encoding="bytes")


def _globals(path: Path) -> set:
    return {arg for op, arg, _ in pickletools.genops(path.read_bytes()) if op.name == "GLOBAL"}


@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar10")
    write_fake_cifar10(root, num_train=53, num_test=17, seed=3)
    return root


# ---------------------------------------------------------------------------------------------
# The fixture format itself
# ---------------------------------------------------------------------------------------------
def test_python2_style_files_look_like_the_official_ones(cifar10_root):
    folder = cifar10_root / "cifar-10-batches-py"
    expected = {f"data_batch_{i}" for i in range(1, 6)} | {"test_batch", "batches.meta",
                                                            "readme.html"}
    assert {p.name for p in folder.iterdir()} == expected
    raw = (folder / "data_batch_1").read_bytes()
    assert raw[:2] == b"\x80\x02"  # protocol 2
    assert _globals(folder / "data_batch_1") == {
        "numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    opcodes = {op.name for op, _, _ in pickletools.genops(raw)}
    assert "BINUNICODE" not in opcodes and "SHORT_BINSTRING" in opcodes  # Python 2 str keys
    batch = _trusted_load(folder / "data_batch_1")
    assert set(batch) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (11, 3072)
    assert isinstance(batch[b"labels"], list) and all(type(v) is int for v in batch[b"labels"])
    meta = _trusted_load(folder / "batches.meta")
    assert meta[b"label_names"][0] == b"airplane" and meta[b"num_vis"] == 3072


def test_numpy_style_files_use_current_numpy_globals(tmp_path):
    folder = write_fake_cifar100(tmp_path, num_train=10, num_test=5, pickle_style="numpy")
    assert _globals(folder / "train") == {
        "_codecs encode", "numpy._core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    assert set(_trusted_load(folder / "train")) == {
        b"filenames", b"batch_label", b"fine_labels", b"coarse_labels", b"data"}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["python2", "numpy"])
def test_cifar10_loads_exactly_the_file_contents(tmp_path, style):
    folder = write_fake_cifar10(tmp_path, num_train=23, num_test=9, seed=1, pickle_style=style)
    train = load_cifar("cifar10", tmp_path, train=True, download=False)
    batches = [_trusted_load(folder / f"data_batch_{i}") for i in range(1, 6)]
    rows = np.concatenate([b[b"data"] for b in batches])
    labels = sum((b[b"labels"] for b in batches), [])
    assert train.images.dtype == torch.uint8 and train.images.shape == (23, 3, 32, 32)
    assert train.labels.dtype == torch.int64 and train.labels.tolist() == labels
    # each 3072-byte row is the R, G, B planes, row-major: pixel (c, h, w) at c*1024 + h*32 + w
    assert train.images[7, 2, 5, 30].item() == rows[7, 2 * 1024 + 5 * 32 + 30]
    assert np.array_equal(train.images.numpy().reshape(23, 3072), rows)
    assert train.classes[9] == "truck"
    test = load_cifar("cifar10", tmp_path, train=False, download=False)
    assert test.labels.tolist() == _trusted_load(folder / "test_batch")[b"labels"]


@pytest.mark.parametrize("style", ["python2", "numpy"])
def test_cifar100_uses_fine_labels(tmp_path, style):
    folder = write_fake_cifar100(tmp_path, num_train=30, num_test=12, pickle_style=style)
    train = load_cifar("cifar100", folder, train=True, download=False)
    assert train.labels.tolist() == _trusted_load(folder / "train")[b"fine_labels"]
    assert len(train.classes) == 100 and train.images.shape == (30, 3, 32, 32)
    train_loader, eval_loader = create_loaders("cifar100", tmp_path, 8, download=False)
    assert train_loader.num_classes == eval_loader.num_classes == 100
    assert eval_loader.num_samples == 12


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_batches_re_saved_by_python3_at_any_protocol_load(tmp_path, protocol):
    folder = write_fake_cifar10(tmp_path, num_train=10, num_test=6)
    original = _trusted_load(folder / "test_batch")
    resaved = {key.decode(): value for key, value in original.items()}  # str keys, as Python 3
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump(resaved, fh, protocol=protocol)
    test = load_cifar("cifar10", tmp_path, train=False, download=False)
    assert np.array_equal(test.images.numpy().reshape(6, 3072), original[b"data"])
    assert test.labels.tolist() == original[b"labels"]


def test_root_conventions(cifar10_root, monkeypatch, tmp_path):
    via_root = load_cifar("cifar10", cifar10_root, train=False, download=False)
    via_folder = load_cifar("cifar10", cifar10_root / "cifar-10-batches-py", train=False,
                            download=False)
    assert torch.equal(via_root.images, via_folder.images)
    monkeypatch.chdir(tmp_path)
    os.symlink(cifar10_root, tmp_path / "cifar10_data")  # the original README's `ln -s`
    via_default = load_cifar("cifar10", None, train=False, download=False)
    assert torch.equal(via_default.labels, via_root.labels)


# ---------------------------------------------------------------------------------------------
# Tampered, truncated and malformed files
# ---------------------------------------------------------------------------------------------
class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_tampered_pickle_never_runs_code(tmp_path):
    folder = write_fake_cifar10(tmp_path, num_train=10, num_test=5)
    marker = tmp_path / "pwned"
    with open(folder / "data_batch_2", "wb") as fh:
        pickle.dump({b"data": _Exploit(marker), b"labels": []}, fh, protocol=2)
    with pytest.raises(DatasetError, match=r"refusing to load .*data_batch_2.*'posix\.system'"):
        load_cifar("cifar10", tmp_path, train=True, download=False)
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1q\x00\x85R.",           # builtins.eval
    b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R.",  # non-latin1
    b"\x80\x02cnumpy\nload\nX\x01\x00\x00\x00x\x85R.",                        # numpy.load
])
def test_unpickler_admits_only_the_cifar_globals(tmp_path, payload):
    path = tmp_path / "batch"
    path.write_bytes(payload)
    with pytest.raises(DatasetError, match="batch"):
        read_cifar_batch(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_gives_clear_error(tmp_path, damage):
    folder = write_fake_cifar10(tmp_path, num_train=20, num_test=5)
    path = folder / "data_batch_3"
    raw = path.read_bytes()
    damaged = {"truncate": raw[: len(raw) // 2], "empty": b"",
               "garbage": b"<html>404 Not Found</html>" * 10}  # e.g. a failed download's page
    path.write_bytes(damaged[damage])
    with pytest.raises(DatasetError, match=r"data_batch_3 is truncated or corrupt"):
        load_cifar("cifar10", tmp_path, train=True, download=False)


@pytest.mark.parametrize("content, message", [
    ([1, 2, 3], "holds a list"),
    ({b"labels": [0]}, "lacks"),
    ({b"labels": [0], b"data": np.zeros((1, 3072), np.float32)}, "must be a uint8"),
    ({b"labels": [0, 1], b"data": np.zeros((1, 3072), np.uint8)}, "2 labels for 1 images"),
    ({b"labels": [10], b"data": np.zeros((1, 3072), np.uint8)}, r"labels outside \[0, 10\)"),
])
def test_malformed_batch_gives_clear_error(tmp_path, content, message):
    folder = write_fake_cifar10(tmp_path, num_train=10, num_test=5)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump(content, fh, protocol=2)
    with pytest.raises(DatasetError, match=message):
        load_cifar("cifar10", tmp_path, train=False, download=False)


# ---------------------------------------------------------------------------------------------
# Missing files and downloading
# ---------------------------------------------------------------------------------------------
def test_missing_without_download_names_folder_files_and_fix(tmp_path):
    with pytest.raises(DatasetError) as info:
        create_loaders("cifar10", tmp_path / "nowhere", download=False)
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in message
    assert "data_batch_1" in message and "test_batch" in message
    assert "cifar-10-python.tar.gz" in message and "ln -s" in message
    assert "\n" not in message


def test_data_dir_that_is_a_file_is_reported(tmp_path):
    (tmp_path / "cifar.tar.gz").write_bytes(b"not a folder")
    with pytest.raises(DatasetError, match=r"cifar\.tar\.gz is a file, not a directory"):
        create_loaders("cifar10", tmp_path / "cifar.tar.gz", download=False)


def test_network_failure_gives_clear_error(tmp_path):
    def offline(spec, parent):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    with pytest.raises(DatasetError, match=r"Downloading it failed \(URLError.*name resolution"):
        create_loaders("cifar10", tmp_path, download=offline)
    assert not (tmp_path / "cifar-10-batches-py").exists()


def test_downloader_is_used_when_files_are_missing(tmp_path):
    calls = []

    def fake_download(spec, parent):
        calls.append((spec.name, parent))
        write_fake_cifar100(parent, num_train=8, num_test=4)

    train, _ = create_loaders("cifar100", tmp_path / "c100", 4, download=fake_download)
    assert calls == [("cifar100", tmp_path / "c100")] and train.num_samples == 8


def test_incomplete_folder_is_reported_not_overwritten(tmp_path):
    folder = write_fake_cifar10(tmp_path, num_train=10, num_test=5)
    (folder / "data_batch_4").unlink()

    def must_not_download(spec, parent):
        raise AssertionError("an incomplete folder must not be downloaded over")

    with pytest.raises(DatasetError, match=r"missing: data_batch_4\).*incomplete"):
        load_cifar("cifar10", tmp_path, train=True, download=must_not_download)
    assert (folder / "data_batch_5").is_file()

