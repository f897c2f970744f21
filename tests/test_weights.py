"""Safe loading of weight files: formats, containers, wrapper prefixes, and the documented errors."""
from __future__ import annotations

import gzip
import os
import pathlib
import pickle
import subprocess
import sys
import zipfile

import pytest
import torch
from torch import nn

from acnet.hdf5 import save_hdf5
from acnet.weights import WeightsError, as_state_dict, load_state_dict_file, strip_wrapper_prefixes

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _small_state() -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))
    model[1].running_var.uniform_(0.5, 2.0)
    return model.state_dict()


def _assert_equal_states(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_plain_state_dict_checkpoint(tmp_path):
    state = _small_state()
    torch.save(state, tmp_path / "w.pth")
    _assert_equal_states(load_state_dict_file(tmp_path / "w.pth"), state)


def test_legacy_non_zip_checkpoint(tmp_path):
    state = _small_state()
    torch.save(state, tmp_path / "w.pt", _use_new_zipfile_serialization=False)
    _assert_equal_states(load_state_dict_file(tmp_path / "w.pt"), state)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: {"state_dict": s, "epoch": 3, "best_top1": 71.2},
        lambda s: {"model": s, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}, "epoch": 9},
        lambda s: {"checkpoint": 1, "model_state_dict": s},
        lambda s: {"net": {"state_dict": s}},
    ],
    ids=["state_dict", "model+optimizer", "model_state_dict", "nested"],
)
def test_training_checkpoint_containers_are_unwrapped(tmp_path, wrap):
    state = _small_state()
    torch.save(wrap(state), tmp_path / "ckpt.pth")
    _assert_equal_states(load_state_dict_file(tmp_path / "ckpt.pth"), state)


def test_ddp_and_compile_prefixes_are_stripped(tmp_path):
    state = _small_state()
    torch.save({"state_dict": {f"_orig_mod.module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pth")
    _assert_equal_states(load_state_dict_file(tmp_path / "ddp.pth"), state)


def test_prefix_shared_by_only_some_keys_is_kept():
    state = {"module.weight": torch.ones(1), "head.weight": torch.ones(1)}
    assert list(strip_wrapper_prefixes(state)) == ["module.weight", "head.weight"]


def test_hdf5_is_recognised_by_content_not_name(tmp_path):
    state = _small_state()
    save_hdf5(state, tmp_path / "weights.pth")  # misleading extension
    torch.save(state, tmp_path / "weights.hdf5")  # and the other way round
    _assert_equal_states(load_state_dict_file(tmp_path / "weights.pth"), state)
    _assert_equal_states(load_state_dict_file(tmp_path / "weights.hdf5"), state)


def test_hdf5_with_ddp_prefix_is_stripped(tmp_path):
    state = _small_state()
    save_hdf5({f"module.{k}": v for k, v in state.items()}, tmp_path / "finish.hdf5")
    _assert_equal_states(load_state_dict_file(tmp_path / "finish.hdf5"), state)


def test_module_and_mapping_inputs():
    model = nn.Conv2d(2, 2, 1)
    assert set(as_state_dict(model)) == {"weight", "bias"}
    assert set(as_state_dict({"model": model.state_dict(), "epoch": 1})) == {"weight", "bias"}


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match=r"weights file not found: '.*missing\.pth'"):
        load_state_dict_file(tmp_path / "missing.pth")


def test_directory(tmp_path):
    with pytest.raises(WeightsError, match="is a directory"):
        load_state_dict_file(tmp_path)


def _zip_of_other_files(path: pathlib.Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "hello")


def _hdf5_of_strings(path: pathlib.Path) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("name", data="resnet18")


# (how to make the file, what the one-line error must say it is)
NOT_WEIGHTS = {
    "text": (lambda p: p.write_text("see notes\n"), r"is not a weights file: .*a text file \(beginning 'see notes'\)"),
    "empty": (lambda p: p.write_bytes(b""), r"is not a weights file: .*an empty file \(0 bytes\)"),
    "garbage": (lambda p: p.write_bytes(b"\x00\x01garbage" * 100), r"binary data of an unknown format"),
    "fake-zip": (lambda p: p.write_bytes(b"PK\x03\x04 not really a zip"), r"a truncated or corrupt zip archive"),
    "other-zip": (_zip_of_other_files, r"a zip archive of other files \('notes.txt'\)"),
    "plain-pickle": (lambda p: p.write_bytes(pickle.dumps({"a": 1}, protocol=4)),
                     r"a Python pickle that is not a torch checkpoint"),
    "single-byte": (lambda p: p.write_bytes(b"Q"), r"is not a weights file"),
    "torch-str": (lambda p: torch.save("hello", p), r"holds a str, not a state dict"),
    "torch-int": (lambda p: torch.save(3, p), r"holds an int, not a state dict"),
    "torch-empty-dict": (lambda p: torch.save({}, p), r"holds no tensors \(an empty state dict\)"),
    "hdf5-strings": (_hdf5_of_strings, r"non-numeric"),
    "torchscript": (lambda p: torch.jit.save(torch.jit.script(nn.Conv2d(2, 2, 1)), p),
                    r"a TorchScript archive \(torch.jit.save\).*torch.jit.load"),
    "npy": (lambda p: p.write_bytes(b"\x93NUMPY\x01\x00" + b" " * 64), r"a numpy \.npy array"),
    "npz": (lambda p: _numpy_archive(p), r"a numpy \.npz archive \('w.npy'\)"),
    "gzip": (lambda p: p.write_bytes(gzip.compress(b"x" * 100)), r"a gzip-compressed file"),
}


def _numpy_archive(path: pathlib.Path) -> None:
    import numpy as np

    with open(path, "wb") as fh:
        np.savez(fh, w=np.zeros(3))


@pytest.mark.parametrize("kind", sorted(NOT_WEIGHTS))
def test_a_file_that_is_no_weights_file_is_one_weights_error_saying_what_it_is(tmp_path, kind, recwarn):
    make, says = NOT_WEIGHTS[kind]
    path = tmp_path / "n.pth"
    make(path)
    with pytest.raises(WeightsError, match=says) as caught:
        load_state_dict_file(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]  # no torch warning on the way


@pytest.mark.parametrize("serialization", ["zip", "legacy"])
def test_truncated_checkpoint(tmp_path, serialization):
    torch.save({f"w{i}": torch.randn(128, 128) for i in range(4)}, tmp_path / "w.pth",
               _use_new_zipfile_serialization=serialization == "zip")
    data = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "w.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"is a damaged torch checkpoint \(.*corrupt or truncated|"
                                           r"truncated or corrupt zip"):
        load_state_dict_file(tmp_path / "w.pth")


def test_random_and_damaged_files_are_weights_errors_or_state_dicts(tmp_path):
    """Hypothesis over random bytes and truncated / byte-flipped real checkpoints and hdf5 files
    (tests/weights_fuzz.py), in a subprocess: a reader crash or hang fails the test, not pytest."""
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "weights_fuzz.py"), str(tmp_path), "200"],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stdout.strip() == "ok 400"


class _RunsCodeWhenUnpickled:
    """Unpickling this would create a marker file: the attack weights_only=True must refuse."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_loading_never_runs_code_from_the_file(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"w": torch.ones(1)}, "payload": _RunsCodeWhenUnpickled(marker)}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="refusing to load .*could run code.*weights_only=False"):
        load_state_dict_file(tmp_path / "evil.pth")
    assert not marker.exists()


def test_pickled_module_is_refused_with_the_fix(tmp_path):
    torch.save(nn.Conv2d(2, 2, 1), tmp_path / "whole_model.pth")
    with pytest.raises(WeightsError, match=r"Save only the state dict \(torch.save\(model.state_dict\(\)"):
        load_state_dict_file(tmp_path / "whole_model.pth")


def test_checkpoint_without_a_state_dict(tmp_path):
    torch.save({"epoch": 3, "optimizer": {"param_groups": []}}, tmp_path / "opt_only.pth")
    with pytest.raises(WeightsError, match="is not a state dict: 2 entries are not named tensors: 'epoch'"):
        load_state_dict_file(tmp_path / "opt_only.pth")


def test_checkpoint_holding_a_list(tmp_path):
    torch.save([torch.ones(1)], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="holds a list, not a state dict"):
        load_state_dict_file(tmp_path / "list.pth")
