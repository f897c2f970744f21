"""hdf5 weight files in the original ACNet format: round trips, compatibility, errors, atomic writes."""
from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from acnet.hdf5 import load_hdf5, save_hdf5
from acnet.weights import WeightsError


def _assert_same_state(expected: dict, loaded: dict) -> None:
    assert list(loaded) == list(expected)
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype, key
        assert loaded[key].shape == value.shape, key
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]
)
def test_round_trip_keeps_dtype_shape_values(tmp_path, dtype):
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(3, 2, 1, 4, generator=generator) * 10
    tensor = values > 0 if dtype is torch.bool else values.to(dtype)
    state = {"layer.weight": tensor, "layer.num_batches_tracked": torch.tensor(7), "empty": torch.zeros(0, 3)}
    save_hdf5(state, tmp_path / "w.hdf5")
    _assert_same_state(state, load_hdf5(tmp_path / "w.hdf5"))


def test_module_state_dict_round_trip_keeps_order_and_loads_strictly(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(2, 2))
    model[1].running_mean.uniform_(-1, 1)
    save_hdf5(model, tmp_path / "model.hdf5")
    loaded = load_hdf5(tmp_path / "model.hdf5")
    _assert_same_state(model.state_dict(), loaded)
    fresh = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(2, 2))
    fresh.load_state_dict(loaded, strict=True)
    assert torch.equal(fresh[1].running_mean, model[1].running_mean)


@given(
    st.dictionaries(
        st.text(alphabet="abcxyz./_0123456789", min_size=1, max_size=12).filter(lambda k: k not in (".", "..")),
        hnp.arrays(
            dtype=st.sampled_from([np.float32, np.float64, np.int32, np.int64]),
            shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=3),
        ),
        max_size=5,
    )
)
def test_round_trip_of_arbitrary_arrays_and_key_names(tmp_path_factory, arrays):
    path = tmp_path_factory.mktemp("h5") / "w.hdf5"
    state = {key: torch.from_numpy(array) for key, array in arrays.items()}
    save_hdf5(state, path)
    loaded = load_hdf5(path)
    assert list(loaded) == list(state)
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype
        np.testing.assert_array_equal(loaded[key].numpy(), value.numpy())


def test_file_is_in_the_original_flat_format(tmp_path):
    state = {"stage1/block.conv.weight": torch.ones(2, 2), "fc.bias": torch.arange(3.0)}
    save_hdf5(state, tmp_path / "w.hdf5")
    with h5py.File(tmp_path / "w.hdf5", "r") as f:  # what the original read_hdf5 sees
        assert set(f.keys()) == {"stage1+block.conv.weight", "fc.bias"}
        assert all(isinstance(f[k], h5py.Dataset) for k in f.keys())
        np.testing.assert_array_equal(np.asarray(f["fc.bias"]), np.arange(3.0, dtype=np.float32))


def test_file_written_by_the_original_code_loads(tmp_path):
    rng = np.random.default_rng(0)
    original = {
        "stem+conv.square_conv.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "stem+conv.square_bn.running_var": rng.random(8).astype(np.float32),
        "stem+conv.square_bn.num_batches_tracked": np.int64(5),
    }
    with h5py.File(tmp_path / "finish.hdf5", "w") as f:  # exactly the original save_hdf5
        for key, value in original.items():
            f.create_dataset(key, data=value)
    loaded = load_hdf5(tmp_path / "finish.hdf5")
    assert set(loaded) == {key.replace("+", "/") for key in original}
    for key, value in original.items():
        np.testing.assert_array_equal(loaded[key.replace("+", "/")].numpy(), value)
    assert loaded["stem/conv.square_bn.num_batches_tracked"].dtype == torch.int64
    assert loaded["stem/conv.square_bn.num_batches_tracked"].shape == ()


def test_datasets_inside_groups_load_under_their_full_path(tmp_path):
    with h5py.File(tmp_path / "grouped.hdf5", "w") as f:
        f.create_dataset("block/conv.weight", data=np.ones((2, 2), dtype=np.float32))
    assert set(load_hdf5(tmp_path / "grouped.hdf5")) == {"block/conv.weight"}


def test_missing_file_is_a_clear_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="not found.*nope.hdf5"):
        load_hdf5(tmp_path / "nope.hdf5")


def test_directory_is_a_clear_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="is a directory"):
        load_hdf5(tmp_path)


def test_non_hdf5_file_is_a_clear_weights_error(tmp_path):
    (tmp_path / "notes.hdf5").write_text("epoch 1 top1=10.0\n")
    with pytest.raises(WeightsError, match="not a readable hdf5 weights file"):
        load_hdf5(tmp_path / "notes.hdf5")


def test_truncated_hdf5_is_a_clear_weights_error(tmp_path):
    path = tmp_path / "w.hdf5"
    save_hdf5({f"layer{i}.weight": torch.randn(64, 64) for i in range(4)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(WeightsError, match="corrupt, truncated"):
        load_hdf5(path)


def test_non_numeric_dataset_is_rejected(tmp_path):
    with h5py.File(tmp_path / "strings.hdf5", "w") as f:
        f.create_dataset("name", data="resnet18")
    with pytest.raises(WeightsError, match="non-numeric"):
        load_hdf5(tmp_path / "strings.hdf5")


def test_unsupported_value_raises_before_touching_the_existing_file(tmp_path):
    path = tmp_path / "w.hdf5"
    save_hdf5({"a": torch.ones(2)}, path)
    before = path.read_bytes()
    with pytest.raises(TypeError, match="'optimizer' is a str"):
        save_hdf5({"a": torch.zeros(2), "optimizer": "sgd"}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["w.hdf5"]


def test_failure_while_writing_leaves_previous_file_and_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "finish.hdf5"
    save_hdf5({"a": torch.ones(2)}, path)
    before = path.read_bytes()
    real_create = h5py.Group.create_dataset
    calls = []

    def create_then_fail(self, name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_create(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", create_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_hdf5({"a": torch.zeros(2), "b": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["finish.hdf5"]
    monkeypatch.undo()
    assert torch.equal(load_hdf5(path)["a"], torch.ones(2))
