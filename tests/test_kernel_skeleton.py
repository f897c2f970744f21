"""kernel_skeleton.py: the magnitude maths, deploy files of real ACBs, the PNG, and clear errors."""
from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kernel_skeleton as ks
from acnet.acb import ACBlock
from acnet.hdf5 import save_hdf5

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_arrays(path: Path, arrays: dict) -> Path:
    with h5py.File(path, "w") as handle:
        for key, value in arrays.items():
            handle.create_dataset(key.replace("/", "+"), data=value)
    return path


def random_deploy_arrays(seed: int, layers: int = 3, k: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {}
    for i in range(layers):
        arrays[f"stage{i}.weight"] = rng.normal(size=(4, 2, k, k)).astype(np.float32)
        arrays[f"stage{i}.bias"] = rng.normal(size=4).astype(np.float32)
    arrays["fc.weight"] = rng.normal(size=(10, 4)).astype(np.float32)
    arrays["shortcut.weight"] = rng.normal(size=(4, 2, 1, 1)).astype(np.float32)
    return arrays


def test_layer_magnitude_by_hand():
    kernel = np.zeros((2, 1, 3, 3))
    kernel[0, 0, 1, 1] = -4.0
    kernel[1, 0, 1, 1] = 4.0
    kernel[0, 0, 0, 2] = 2.0
    expected = np.zeros((3, 3))
    expected[1, 1], expected[0, 2] = 1.0, 0.25
    np.testing.assert_allclose(ks.layer_magnitude(kernel), expected)
    np.testing.assert_array_equal(ks.layer_magnitude(np.zeros((1, 1, 3, 3))), np.zeros((3, 3)))


@given(hnp.arrays(np.float64, (3, 2, 3, 3), elements=st.floats(-10, 10)),
       st.floats(1e-3, 1e3), st.sampled_from([-1.0, 1.0]))
def test_layer_magnitude_ignores_scale_and_sign(kernel, scale, sign):
    np.testing.assert_allclose(ks.layer_magnitude(kernel * scale * sign), ks.layer_magnitude(kernel), atol=1e-12)
    magnitude = ks.layer_magnitude(kernel)
    assert magnitude.min() >= 0 and magnitude.max() in (0.0, pytest.approx(1.0))


def test_skeleton_averages_layers_of_the_most_common_size():
    a = np.zeros((1, 1, 3, 3))
    a[0, 0, 1, :] = 1.0  # centre row only
    b = np.zeros((1, 1, 3, 3))
    b[0, 0, :, 1] = 2.0  # centre column only
    odd = np.ones((1, 1, 5, 5))
    sk = ks.compute_skeleton({"a.weight": a, "b.weight": b, "c.weight": odd})
    assert sk.layers == ("a.weight", "b.weight")
    expected = np.array([[0, 0.5, 0], [0.5, 1, 0.5], [0, 0.5, 0]])
    np.testing.assert_allclose(sk.matrix, expected)
    assert sk.skeleton_ratio() == float("inf")
    five = ks.compute_skeleton({"a.weight": a, "b.weight": b, "c.weight": odd}, kernel_size=5)
    np.testing.assert_allclose(five.matrix, np.ones((5, 5)))
    assert five.skeleton_ratio() == pytest.approx(1.0)


def test_deployed_acb_with_zero_square_kernel_puts_everything_on_the_cross(tmp_path):
    """The fused kernel of a real ACB (acnet) whose KxK branch is zero lives on the centre cross."""
    torch.manual_seed(0)
    block = ACBlock(4, 6, 3, padding=1)
    with torch.no_grad():
        block.square_conv.weight.zero_()
        for bn in (block.square_bn, block.ver_bn, block.hor_bn):
            bn.running_var.uniform_(0.5, 2.0)
    block.eval()
    path = tmp_path / "finish_deploy.hdf5"
    save_hdf5({"layer.weight": block.make_deploy_conv().weight.detach(), "layer.bias": torch.zeros(6)}, path)
    sk = ks.skeleton_of_file(tmp_path)
    assert sk.label == tmp_path.name
    corners = sk.matrix[~ks.skeleton_mask(3)]
    np.testing.assert_array_equal(corners, np.zeros(4))
    assert sk.matrix[1, 1] > 0 and sk.skeleton_ratio() == float("inf")


def test_training_time_files_are_refused(tmp_path):
    block = ACBlock(2, 2, 3, padding=1)
    acb = tmp_path / "acb_finish.hdf5"
    save_hdf5({f"layer.{k}": v for k, v in block.state_dict().items()}, acb)
    with pytest.raises(ks.SkeletonError, match="training-time .*finish_deploy.hdf5"):
        ks.skeleton_of_file(acb)
    conv_bn = write_arrays(tmp_path / "base_finish.hdf5", {
        "unit/conv.weight": np.ones((2, 2, 3, 3), np.float32),
        "unit/bn.weight": np.ones(2, np.float32), "unit/bn.running_var": np.ones(2, np.float32)})
    with pytest.raises(ks.SkeletonError, match="training-time"):
        ks.skeleton_of_file(conv_bn)
    from acnet import OREPABlock

    orepa = tmp_path / "orepa_finish.hdf5"
    save_hdf5({f"layer.{k}": v for k, v in OREPABlock(2, 2, 3, padding=1).state_dict().items()}, orepa)
    with pytest.raises(ks.SkeletonError, match="training-time"):
        ks.skeleton_of_file(orepa)


def test_pre_activation_bn_of_a_deploy_file_is_accepted(tmp_path):
    """WRN's deploy form keeps each unit's BN before its (biased) conv: that is not a training-time file."""
    path = write_arrays(tmp_path / "wrn_deploy.hdf5", {
        "stage1/0/conv1/bn.running_var": np.ones(2, np.float32),
        "stage1/0/conv1/bn.weight": np.ones(2, np.float32),
        "stage1/0/conv1/conv.weight": np.ones((2, 2, 3, 3), np.float32),
        "stage1/0/conv1/conv.bias": np.zeros(2, np.float32)})
    np.testing.assert_array_equal(ks.skeleton_of_file(path).matrix, np.ones((3, 3)))


def test_cli_side_by_side_png(tmp_path, capsys):
    base = write_arrays(tmp_path / "base.hdf5", random_deploy_arrays(0))
    acb_arrays = random_deploy_arrays(1)
    for name, value in acb_arrays.items():
        if value.ndim == 4 and value.shape[-1] == 3:
            value[:, :, 1, :] *= 3
            value[:, :, :, 1] *= 3
    acb = write_arrays(tmp_path / "acb.hdf5", acb_arrays)
    out = tmp_path / "figures" / "skeleton.png"
    assert ks.main([str(base), str(acb), "--labels", "base", "acb", "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert [p.name for p in out.parent.iterdir()] == ["skeleton.png"]
    text = capsys.readouterr().out
    assert text.startswith("base: mean normalised |W| over 3 3x3 layers")
    ratios = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if "skeleton ratio" in line]
    assert ratios[1] > 2 * ratios[0]


@pytest.mark.parametrize("argv, message", [
    (["{missing}"], "weights file not found"),
    (["{dir}"], "has no finish_deploy.hdf5"),
    (["{notes}"], "is not a weights file: neither hdf5 nor a torch checkpoint, it is a text file"),
    (["{good}", "-o", "{blocked}"], "is a file, not a directory"),
    (["{good}", "--labels", "a", "b"], "--labels got 2 names for 1"),
    (["{good}", "-k", "5"], "has no 5x5 kernels; it has 3x3 (3 layers)"),
    (["{good}", "{five}"], "choose one with -k"),
    (["{flat}"], "no square conv kernels"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    paths = {
        "missing": tmp_path / "nope.hdf5",
        "dir": tmp_path,
        "good": write_arrays(tmp_path / "good.hdf5", random_deploy_arrays(0)),
        "five": write_arrays(tmp_path / "five.hdf5", random_deploy_arrays(0, k=5)),
        "flat": write_arrays(tmp_path / "flat.hdf5", {"fc.weight": np.ones((2, 2), np.float32)}),
        "notes": tmp_path / "notes.hdf5",
        "blocked": tmp_path / "notes.hdf5" / "sub" / "s.png",  # under a regular file: unwritable, even for root
    }
    paths["notes"].write_text("see notes\n")
    assert ks.main([a.format(**paths) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob(".*.tmp"))


def test_a_torch_checkpoint_of_deploy_weights_gives_the_hdf5_files_skeleton(tmp_path):
    arrays = random_deploy_arrays(0)
    torch.save({name: torch.from_numpy(a) for name, a in arrays.items()}, tmp_path / "deploy.pth")
    from_pth = ks.skeleton_of_file(tmp_path / "deploy.pth")
    from_hdf5 = ks.skeleton_of_file(write_arrays(tmp_path / "deploy.hdf5", arrays))
    np.testing.assert_array_equal(from_pth.matrix, from_hdf5.matrix)
    assert from_pth.layers == from_hdf5.layers


def test_drawing_without_matplotlib_is_a_clear_error(tmp_path, capsys, monkeypatch):
    good = write_arrays(tmp_path / "good.hdf5", random_deploy_arrays(0))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert ks.main([str(good), "-o", str(tmp_path / "s.png")]) == 2
    assert "needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "s.png").exists()


# ------------------------------------------------------------------------------------- a real run


def test_tiny_real_run(quickstart_run):
    """cfqkbnc's three 5x5 convs: the run directory stands for its finish_deploy.hdf5; finish.hdf5 is refused."""
    sk = ks.skeleton_of_file(quickstart_run)
    assert sk.kernel_size == 5 and len(sk.layers) == 3
    assert sk.matrix.max() <= 1.0 and sk.matrix.min() >= 0.0
    with pytest.raises(ks.SkeletonError, match="training-time"):
        ks.skeleton_of_file(quickstart_run / "finish.hdf5")
