"""Weights files of the original ACNet / DBB repositories: recognised, loaded, converted, exported, fine-tuned.

The fixtures are built from ``tests/data/original_formats/*.keys.txt`` (the exact entry names, shapes
and dtypes of the files the original code writes; that folder's README says where each list comes from), filled with random values and written the way
the original code writes them (ACNet: hdf5 via its ``save_hdf5``; DBB: ``torch.save`` of a
``{"state_dict": ...}`` checkpoint of a DDP model, or an hdf5 without the stem's ``stage0.``).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, Tuple

import h5py
import numpy as np
import pytest
import torch

from acnet import WeightsError, load_hdf5
from constructor.original_formats import export_original, original_schemes, own_schemes, recognise_weights
from utils.engine.evaluation import load_model_for_eval
from utils.engine.init_weights import load_init_weights

ROOT = Path(__file__).resolve().parents[1]
DBB_ARCHS = {"ResNet-18": "sres18", "ResNet-50": "sres50", "MobileNet": "smi1"}
OUR_BLOCK = {"acb": "acb", "base": "base", "DBB": "dbb"}
LOADED = {"acnet_cfqkbnc_acb_train", "acnet_vc_base_train", "acnet_wrnc16plain_acb_deploy", "dbb_ResNet-18_DBB_train",
          "dbb_MobileNet_DBB_deploy"}


FORMATS = Path(__file__).resolve().parent / "data" / "original_formats"
KEY_FILES = sorted(FORMATS.glob("*.keys.txt"))


def test_the_committed_key_lists_are_all_there():
    """Every file kind the original repositories write is listed (a lost data file fails, never skips)."""
    assert len(KEY_FILES) == 23
    assert {describe(p)[0] for p in KEY_FILES} == {"acnet", "dbb"}


def read_keys(path: Path) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    entries = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape, dtype = line.split("\t")
        entries[name] = (() if shape == "scalar" else tuple(int(n) for n in shape.split("x")), dtype)
    return entries


def describe(path: Path) -> Tuple[str, str, str, str]:
    """``(family, our arch, their block type, form)`` of a keys file."""
    family, arch, block, form = path.name[: -len(".keys.txt")].split("_")
    return family, DBB_ARCHS.get(arch, arch), block, form


def fill(entries, seed: int = 0, classes: int | None = None) -> Dict[str, torch.Tensor]:
    """Random values of the listed shapes (BN variances positive); ``classes`` resizes the classifier."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, (shape, dtype) in entries.items():
        if classes is not None and re.fullmatch(r"(linear|fc)2?\.(weight|bias)", name) and shape[0] == 10:
            shape = (classes, *shape[1:])
        if dtype == "int64":
            state[name] = torch.tensor(7, dtype=torch.int64).reshape(shape)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=g) + 0.5
        elif name.endswith(("bn.weight", "bn1.bn.weight", "avgbn.weight", "bn2.weight")) or "_bn.weight" in name:
            state[name] = torch.rand(shape, generator=g) + 0.5
        else:
            state[name] = torch.randn(shape, generator=g) * (0.2 if len(shape) > 1 else 0.1)
    return state


def write_like_the_original(state, family: str, path: Path, strip_stem: bool = False) -> Path:
    if family == "acnet" or path.suffix == ".hdf5":  # save_hdf5 of ACNet / what DBB's model_load_hdf5 reads
        with h5py.File(path, "w") as f:
            for name, value in state.items():
                name = name.replace("stage0.", "") if strip_stem else name
                f.create_dataset(name.replace("/", "+"), data=value.numpy())
    else:  # DBB's train.py checkpoint of a DistributedDataParallel model
        torch.save({"epoch": 120, "arch": "x", "state_dict": {f"module.{k}": v for k, v in state.items()},
                    "best_acc1": torch.tensor(71.0)}, path)
    return path


def fixture(key_file: Path, tmp_path: Path, seed: int = 0, classes: int | None = None, suffix: str | None = None):
    family, arch, block, form = describe(key_file)
    state = fill(read_keys(key_file), seed, classes)
    suffix = suffix or (".hdf5" if family == "acnet" else ".pth")
    path = write_like_the_original(state, family, tmp_path / f"{key_file.name[:-9]}{suffix}",
                                   strip_stem=suffix == ".hdf5" and family == "dbb")
    return path, state, family, arch, block, form


def logits(model, arch: str, seed: int = 1) -> torch.Tensor:
    size = 32 if arch in ("cfqkbnc", "vc", "src56", "src110", "wrnc16plain") else 64
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------------ recognition
def unwrap(path: Path) -> Dict[str, torch.Tensor]:
    """The file's entries as the original code reads them (independently of our loader)."""
    if path.suffix == ".hdf5":
        return load_hdf5(path)
    return {k[len("module."):]: v for k, v in torch.load(path)["state_dict"].items()}


@pytest.mark.parametrize("key_file", KEY_FILES, ids=lambda p: p.name[: -len(".keys.txt")])
def test_every_listed_original_file_is_recognised_and_loads(key_file, tmp_path):
    path, state, family, arch, block, form = fixture(key_file, tmp_path)
    found = recognise_weights(arch, unwrap(path))
    assert found.scheme.name == f"{family}/{block}/{form}"
    assert found.block_type == (None if form == "deploy" else OUR_BLOCK[block])
    # every value of the file lands in our state dict (copied, or folded for ACNet's unfused deploy units)
    copies = [r for r in found.scheme.rules if r.kind == "copy"]
    assert copies and all(torch.equal(found.state[r.ours[0]], state[r.theirs[0]]) for r in copies)
    own = next(s for s in own_schemes(arch, found.num_classes) if s.info["block_type"] == found.block_type)
    assert {k: tuple(v.shape) for k, v in found.state.items()} == dict(own.our_shapes)  # loads strictly
    if key_file.name[: -len(".keys.txt")] in LOADED:  # the whole path, file to logits, for one file of each kind
        model = load_model_for_eval(arch, OUR_BLOCK[block], path)
        assert torch.isfinite(logits(model, arch)).all()


@pytest.mark.parametrize("name", ["acnet_sres18_acb_train", "dbb_ResNet-50_DBB_train", "dbb_MobileNet_DBB_deploy"])
@pytest.mark.parametrize("classes", [7, 100])
def test_any_classifier_size_is_recognised(name, classes, tmp_path):
    path, _, _, arch, block, _ = fixture(FORMATS / f"{name}.keys.txt", tmp_path, classes=classes)
    found = recognise_weights(arch, unwrap(path))
    assert found.num_classes == classes and found.state["fc.weight"].shape[0] == classes


def test_a_fine_tuning_class_count_loads_for_evaluation(tmp_path):
    path = fixture(FORMATS / "acnet_vc_base_train.keys.txt", tmp_path, classes=37)[0]
    model = load_model_for_eval("vc", "base", path)
    assert logits(model, "vc").shape == (2, 37)


def test_dbb_hdf5_without_the_stem_prefix_equals_the_pth(tmp_path):
    key_file = FORMATS / "dbb_ResNet-18_base_train.keys.txt"
    pth = fixture(key_file, tmp_path)[0]
    hdf5 = fixture(key_file, tmp_path, suffix=".hdf5")[0]
    assert any(k.startswith("conv1.") for k in load_hdf5(hdf5))  # stage0. dropped, as model_load_hdf5 reads it
    a, b = load_model_for_eval("sres18", "base", pth), load_model_for_eval("sres18", "base", hdf5)
    assert torch.equal(logits(a, "sres18"), logits(b, "sres18"))


def test_acnet_deploy_file_computes_what_its_training_file_computes(tmp_path):
    """ACNet's converter (re-implemented here from its documented maths) fuses only the ACBs; the
    plain conv-BN units stay. Loading both files must give the same network."""
    train_path, train_state, *_ = fixture(FORMATS / "acnet_src56_acb_train.keys.txt", tmp_path)
    deploy = {}
    for name, value in train_state.items():
        if "square_conv.weight" in name:
            unit = name[: -len("square_conv.weight")]
            kernel = torch.zeros_like(value, dtype=torch.float64)
            bias = 0
            for branch, rows, cols in (("square", slice(None), slice(None)), ("ver", slice(None), slice(1, 2)),
                                       ("hor", slice(1, 2), slice(None))):
                bn = {k: train_state[f"{unit}{branch}_bn.{k}"].double() for k in ("weight", "bias", "running_mean",
                                                                                 "running_var")}
                scale = bn["weight"] / (bn["running_var"] + 1e-5).sqrt()
                kernel[:, :, rows, cols] += train_state[f"{unit}{branch}_conv.weight"].double() * scale.view(-1, 1, 1, 1)
                bias = bias + bn["bias"] - bn["running_mean"] * scale
            deploy[f"{unit}fused_conv.weight"], deploy[f"{unit}fused_conv.bias"] = kernel.float(), bias.float()
        elif not re.search(r"(square|ver|hor)_", name):
            deploy[name] = value
    assert set(deploy) == set(read_keys(FORMATS / "acnet_src56_acb_deploy.keys.txt"))
    assert any(".projection.bn." in k for k in deploy)  # a plain conv-BN unit, folded when loading
    deploy_path = write_like_the_original(deploy, "acnet", tmp_path / "finish_deploy.hdf5")
    trained = load_model_for_eval("src56", "acb", train_path)
    deployed = load_model_for_eval("src56", "acb", deploy_path)
    assert relative(logits(deployed, "src56"), logits(trained, "src56")) < 1e-5


# ------------------------------------------------------------------------------------ errors
def test_a_near_miss_names_the_closest_scheme_and_the_difference(tmp_path):
    state = fill(read_keys(FORMATS / "acnet_src56_acb_train.keys.txt"))
    state["stage2.projection.conv.kernel"] = state.pop("stage2.projection.conv.weight")
    path = write_like_the_original(state, "acnet", tmp_path / "finish.hdf5")
    with pytest.raises(WeightsError) as info:
        load_model_for_eval("src56", "acb", path)
    message = str(info.value)
    assert "\n" not in message and "matches neither" in message
    assert "closest is the original ACNet code's src56 -b acb training-time weights" in message
    assert "missing 1 entry: stage2.projection.conv.weight" in message
    assert "unexpected 1 entry: stage2.projection.conv.kernel" in message


def test_a_wrong_shape_is_named(tmp_path):
    state = fill(read_keys(FORMATS / "dbb_ResNet-18_DBB_train.keys.txt"))
    state["stage3.1.conv2.dbb_origin.conv.weight"] = torch.zeros(256, 256, 5, 5)
    path = write_like_the_original(state, "dbb", tmp_path / "model_best.pth.tar")
    with pytest.raises(WeightsError, match=r"names of the DBB repository's ResNet-18 -t DBB training-time weights, "
                                           r"but not its shapes: 1 shape mismatch: stage3\.1\.conv2\.dbb_origin"):
        load_model_for_eval("sres18", "dbb", path)


def test_a_file_of_another_block_type_says_which_to_pass(tmp_path):
    path = fixture(FORMATS / "dbb_ResNet-18_DBB_train.keys.txt", tmp_path)[0]
    with pytest.raises(WeightsError, match="pass -b/--block-type dbb"):
        load_model_for_eval("sres18", "acb", path)


def test_the_tables_cover_every_arch_and_form():
    """Each scheme covers every entry of its model exactly once (checked when it is built)."""
    import constructor

    counts = {arch: len(original_schemes(arch)) for arch in constructor.list_archs()}
    assert counts == {"cfqkbnc": 3, "vc": 3, "src56": 3, "src110": 3, "wrnc16plain": 3, "sres18": 11,
                      "sres34": 3, "sres50": 11, "smi1": 7}


def test_the_schemes_follow_the_registries_at_once():
    """own_schemes / original_schemes are cached, but on the registries' state: a block type registered
    (or removed) after a first call is seen by the next one."""
    from acnet.registry import BlockType, register_block_type, unregister_block_type

    first = own_schemes("cfqkbnc")
    assert own_schemes("cfqkbnc") is first  # cached while nothing is registered
    assert original_schemes("cfqkbnc") is original_schemes("cfqkbnc")
    register_block_type(BlockType("acb2", "acnet.acb:ACBlock"))
    try:
        names = [s.name for s in own_schemes("cfqkbnc")]
        assert names == [s.name for s in first][:-1] + ["ours/acb2", "ours/deploy"]
        acb = next(s for s in first if s.name == "ours/acb")
        assert next(s for s in own_schemes("cfqkbnc") if s.name == "ours/acb2").our_shapes == acb.our_shapes
    finally:
        unregister_block_type("acb2")
    assert [s.name for s in own_schemes("cfqkbnc")] == [s.name for s in first]


# ------------------------------------------------------------------------------------ export back
@pytest.mark.parametrize("fmt, source, deploy_list", [
    ("acnet", "acnet_wrnc16plain_acb_train", "acnet_wrnc16plain_acb_deploy"),
    ("dbb", "dbb_MobileNet_DBB_train", "dbb_MobileNet_DBB_deploy"),
    ("dbb", "dbb_ResNet-18_base_train", "dbb_ResNet-18_base_deploy"),
])
def test_convert_exports_the_original_deploy_names_and_round_trips(fmt, source, deploy_list, tmp_path, capsys):
    import do_acnet

    src, _, _, arch, block, _ = fixture(FORMATS / f"{source}.keys.txt", tmp_path)
    dst = tmp_path / ("finish_deploy.hdf5" if fmt == "acnet" else "deploy.pth")
    do_acnet.main(["-a", arch, "-b", OUR_BLOCK[block], "--convert", str(src), str(dst), "--format", fmt])
    usage = {"acnet": "acnet_test.py's general_test(network_type='wrnc16plain'",
             "dbb": f"test.py IMGNET_PATH deploy FILE -a {source.split('_')[1]} -t {block}"}
    assert usage[fmt] in capsys.readouterr().out
    written = load_hdf5(dst) if fmt == "acnet" else torch.load(dst)
    expected = read_keys(FORMATS / f"{deploy_list}.keys.txt")
    assert {k: tuple(v.shape) for k, v in written.items()} == {k: shape for k, (shape, _) in expected.items()}
    trained = load_model_for_eval(arch, OUR_BLOCK[block], src)
    exported = load_model_for_eval(arch, "base", dst)  # recognised as the original's deploy form
    assert relative(logits(exported, arch), logits(trained, arch)) < 1e-5


def test_export_to_a_repository_without_the_arch_is_refused(tmp_path):
    import constructor

    with pytest.raises(ValueError, match="DBB repository has no src56"):
        export_original("src56", "dbb", "acb", constructor.build_model("src56", "base", deploy=True).state_dict())


@pytest.mark.slow
def test_convert_format_from_the_command_line(tmp_path):
    src = fixture(FORMATS / "acnet_cfqkbnc_acb_train.keys.txt", tmp_path)[0]
    dst = tmp_path / "deploy.hdf5"
    command = [sys.executable, "do_acnet.py", "-a", "cfqkbnc", "-b", "acb", "--convert", str(src), str(dst)]
    done = subprocess.run(command + ["--format", "acnet"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert set(load_hdf5(dst)) == set(read_keys(FORMATS / "acnet_cfqkbnc_acb_deploy.keys.txt"))
    refused = subprocess.run(command[:-1] + [str(tmp_path / "x.pth"), "--format", "dbb"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "DBB repository has no cfqkbnc" in refused.stderr, refused.stderr
    assert not (tmp_path / "x.pth").exists()


# ------------------------------------------------------------------------------------ fine-tuning
def test_init_from_original_base_weights_starts_every_block_as_its_conv_bn(tmp_path):
    import constructor

    path = fixture(FORMATS / "acnet_vc_base_train.keys.txt", tmp_path)[0]
    plain = load_model_for_eval("vc", "base", path)
    for block_type in ("acb", "dbb"):
        model = constructor.build_model("vc", block_type)
        record = load_init_weights(model, path, block_type=block_type)
        assert record["scheme"] == "acnet/base/train" and record["classifier"] == "loaded"
        assert relative(logits(model, "vc"), logits(plain, "vc")) < 1e-5


def test_init_from_same_type_and_deploy_weights_and_a_new_classifier(tmp_path):
    import constructor

    path = fixture(FORMATS / "dbb_ResNet-18_DBB_train.keys.txt", tmp_path)[0]
    reference = load_model_for_eval("sres18", "dbb", path)
    model = constructor.build_model("sres18", "dbb", num_classes=10)
    load_init_weights(model, path, block_type="dbb")
    assert torch.equal(logits(model, "sres18"), logits(reference, "sres18"))

    deploy_path = fixture(FORMATS / "dbb_ResNet-18_DBB_deploy.keys.txt", tmp_path)[0]
    deployed = load_model_for_eval("sres18", "acb", deploy_path)
    model = constructor.build_model("sres18", "acb", num_classes=10)
    load_init_weights(model, deploy_path, block_type="acb")
    assert relative(logits(model, "sres18"), logits(deployed, "sres18")) < 1e-5

    fresh = constructor.build_model("sres18", "dbb", num_classes=3)
    with pytest.raises(WeightsError, match="--init-weights-skip-classifier"):
        load_init_weights(fresh, path, block_type="dbb")
    before = fresh.fc.weight.detach().clone()
    record = load_init_weights(fresh, path, block_type="dbb", skip_classifier=True)
    assert torch.equal(fresh.fc.weight, before) and record["classifier"].startswith("replaced")
    assert torch.equal(fresh.layer1[0].conv1.conv.dbb_origin.conv.weight,
                       reference.layer1[0].conv1.conv.dbb_origin.conv.weight)


def test_init_refuses_training_weights_of_another_block_type(tmp_path):
    import constructor

    path = fixture(FORMATS / "acnet_cfqkbnc_acb_train.keys.txt", tmp_path)[0]
    with pytest.raises(WeightsError, match="convert the file to deploy weights first"):
        load_init_weights(constructor.build_model("cfqkbnc", "dbb"), path, block_type="dbb")


@pytest.mark.slow
def test_do_acnet_trains_from_an_original_file_and_records_it(tmp_path):
    path = fixture(FORMATS / "acnet_cfqkbnc_base_train.keys.txt", tmp_path)[0]
    result = subprocess.run(
        [sys.executable, "do_acnet.py", "-a", "cfqkbnc", "-b", "acb", "--dataset", "synthetic", "--epochs", "1",
         "--synthetic-num-train", "128", "--synthetic-num-val", "128", "--workers", "0", "--no-progress",
         "--output-dir", str(tmp_path / "exps"), "--init-weights", str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "exps" / "cfqkbnc_acb_synthetic_train"
    record = json.loads((run / "recipe.json").read_text())["init_weights"]
    assert record["path"] == str(path.resolve()) and record["scheme"] == "acnet/base/train"
    assert "every block starts as its conv-BN" in (run / "log.txt").read_text().splitlines()[0]


# ------------------------------------------------------------------------------------ tools
@pytest.mark.parametrize("name", ["acnet_sres18_acb_deploy", "dbb_ResNet-50_DBB_deploy"])
def test_kernel_skeleton_reads_original_deploy_files(name, tmp_path):
    from kernel_skeleton import skeleton_of_file

    path = fixture(FORMATS / f"{name}.keys.txt", tmp_path)[0]
    skeleton = skeleton_of_file(path)
    assert skeleton.kernel_size == 3 and np.isfinite(skeleton.matrix).all()


@pytest.mark.parametrize("name, block", [("acnet_src56_acb_train", "acb"), ("dbb_MobileNet_DBB_train", "dbb")])
def test_fuse_and_load_folds_an_original_training_file_into_our_base_model(name, block, tmp_path):
    import constructor
    from acnet import acnet_fuse_and_load

    path = fixture(FORMATS / f"{name}.keys.txt", tmp_path)[0]
    arch = describe(FORMATS / f"{name}.keys.txt")[1]
    trained = load_model_for_eval(arch, block, path)
    plain = acnet_fuse_and_load(constructor.build_model(arch, "base", num_classes=10), path,
                                naming_schemes=constructor.naming_schemes(arch, num_classes=10))
    assert relative(logits(plain, arch), logits(trained, arch)) < 1e-5
    with pytest.raises(WeightsError):  # the model carries no hidden naming schemes: foreign names need them
        acnet_fuse_and_load(constructor.build_model(arch, "base", num_classes=10), path)
