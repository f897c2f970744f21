"""Safe loading of weight files: formats, containers, wrapper prefixes, and the documented errors."""
from __future__ import annotations

import pathlib

import pytest
import torch
from torch import nn

from acnet.hdf5 import save_hdf5
from acnet.weights import WeightsError, as_state_dict, load_state_dict_file, strip_wrapper_prefixes


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


@pytest.mark.parametrize(
    "content", [b"", b"\x00\x01garbage" * 100, b"PK\x03\x04 not really a zip"], ids=["empty", "garbage", "fake-zip"]
)
def test_corrupt_files(tmp_path, content):
    (tmp_path / "bad.pth").write_bytes(content)
    with pytest.raises(WeightsError, match="not a readable weights file.*corrupt or truncated"):
        load_state_dict_file(tmp_path / "bad.pth")


def test_truncated_checkpoint(tmp_path):
    torch.save({f"w{i}": torch.randn(128, 128) for i in range(4)}, tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "w.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        load_state_dict_file(tmp_path / "w.pth")


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
