"""Blocks of the original ECBSR / UniRepLKNet / RepLKNet code load into our ECB and dilated blocks exactly, and export back.

(a) the committed files under ``tests/data/originals`` (written by the original code, see its README): their
state dicts load through the naming schemes into ``ECBlock`` / ``DilatedReparamBlock`` and give the stored
outputs in training mode, eval mode and after ``switch_to_deploy``; the originals' deploy state dicts load
into our deployed blocks; ours export to theirs. (b) the same on blocks built live by the original code
(``tests/originals.py``), skipped only where that code is not on this machine.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from acnet.dilated import DilatedReparamBlock, replknet_scheme, unireplknet_scheme
from acnet.ecb import ECBlock, ecbsr_scheme, ecbsr_state_from_ours, ecbsr_state_to_ours
from helpers import relative_difference
from originals import original_module, original_record

DATA = Path(__file__).resolve().parent / "data" / "originals"
CASES = sorted(p.stem for p in DATA.glob("*.pt") if not p.stem.endswith("_blocks"))  # *_blocks.pt: RepVGG / MobileOne (tests/test_repvgg_mobileone.py)
TOL = 1e-5  # the originals computed in float32


def test_the_committed_files_are_all_there():
    assert CASES == ["dilated_k7_c4", "dilated_k9_c3", "ecb_3to8_linear", "ecb_4to4_prelu_idt", "replk_k7_s3_c4"]
    for case in CASES:
        assert (DATA / f"{case}_keys.json").is_file()


def our_block(record: dict, deploy: bool = False) -> nn.Module:
    """Our block of the original's geometry (``deploy=True``: built deployed)."""
    family, o = record["family"], record["options"]
    if family == "ecbsr":
        act = nn.PReLU(o["out_planes"]) if o.get("act_type", "prelu") == "prelu" else None
        return ECBlock(o["inp_planes"], o["out_planes"], 3, depth_multiplier=o["depth_multiplier"],
                       with_idt=o.get("with_idt", False), nonlinear=act, norm="none", deploy=deploy)
    if family == "unireplknet":
        c = o["channels"]
        return DilatedReparamBlock(c, c, o["kernel_size"], groups=c, deploy=deploy)
    return DilatedReparamBlock(o["in_channels"], o["out_channels"], o["kernel_size"], stride=o["stride"],
                               groups=o["groups"], small_kernel=o["small_kernel"], deploy=deploy)


def scheme_of(record: dict, block: nn.Module):
    return {"ecbsr": ecbsr_scheme, "unireplknet": unireplknet_scheme, "replknet": replknet_scheme}[
        record["family"]](block)


def to_ours(record: dict, block: nn.Module, state) -> dict:
    if record["family"] == "ecbsr":
        return ecbsr_state_to_ours(block, state)
    return scheme_of(record, block).to_ours(state)


def from_ours(record: dict, block: nn.Module) -> dict:
    if record["family"] == "ecbsr":
        return ecbsr_state_from_ours(block)
    return scheme_of(record, block).from_ours(block.state_dict())


def check_record(record: dict) -> None:
    """Every claim of the module docstring for one original block's record."""
    x = record["input"]
    ours = our_block(record)
    ours.load_state_dict(to_ours(record, ours, record["train_state"]))  # strict: every entry has its place
    with torch.no_grad():
        assert relative_difference(ours.train()(x), record["train_output"]) <= TOL
        ours.load_state_dict(to_ours(record, ours, record["train_state"]))  # the step's statistics undone
        assert relative_difference(ours.eval()(x), record["eval_output"]) <= TOL
        exported = from_ours(record, ours)
        assert list(exported) == list(record["train_state"])  # their names, in their order
        for key, value in record["train_state"].items():
            torch.testing.assert_close(exported[key].to(value.dtype), value, rtol=1e-6, atol=1e-6)
        ours.switch_to_deploy()
        assert relative_difference(ours(x), record["deploy_output"]) <= TOL
        deployed_export = from_ours(record, ours)
        assert set(deployed_export) == set(record["deploy_state"])
        for key, value in record["deploy_state"].items():
            torch.testing.assert_close(deployed_export[key], value, rtol=1e-5, atol=1e-5)
        # their deploy file into our deploy form
        theirs_deployed = our_block(record, deploy=True)
        theirs_deployed.load_state_dict(to_ours(record, theirs_deployed, record["deploy_state"]))
        assert relative_difference(theirs_deployed.eval()(x), record["deploy_output"]) <= TOL


@pytest.mark.parametrize("case", CASES)
def test_committed_original_blocks_load_into_ours_and_give_their_outputs(case):
    record = torch.load(DATA / f"{case}.pt", weights_only=True)
    keys = json.loads((DATA / f"{case}_keys.json").read_text())
    assert keys == {"train": list(record["train_state"]), "deploy": list(record["deploy_state"])}
    ours = our_block(record)
    assert scheme_of(record, ours).their_names == frozenset(keys["train"])  # the scheme's names are theirs
    check_record(record)


@pytest.mark.parametrize("case", CASES)
def test_committed_original_blocks_load_through_acnet_fuse_and_load(case):
    """An original block stored under a conv's name, translated to ours, folds into that stock conv."""
    from acnet import acnet_fuse_and_load

    record = torch.load(DATA / f"{case}.pt", weights_only=True)
    if record["family"] == "ecbsr" and record["options"].get("act_type") != "linear":
        pytest.skip("the PReLU after an ECB is a module of the model, not of the conv")
    ours = our_block(record)
    state = to_ours(record, ours, record["train_state"])
    conv = ours.make_deploy_conv()
    base = nn.Sequential(type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding,
                                    groups=conv.groups, stride=conv.stride, bias=True))
    loaded = acnet_fuse_and_load(base, {f"0.{k}": v for k, v in state.items()})
    with torch.no_grad():
        assert relative_difference(loaded(record["input"]), record["eval_output"]) <= TOL


#: blocks built live by the original code: other sizes than the committed ones (grouped / larger kernels)
LIVE = [
    ("ecbsr", dict(inp_planes=5, out_planes=5, depth_multiplier=1.5, act_type="linear", with_idt=True), (2, 5, 8, 5)),
    ("ecbsr", dict(inp_planes=8, out_planes=3, depth_multiplier=2.0, act_type="prelu"), (1, 8, 5, 9)),
    ("unireplknet", dict(channels=6, kernel_size=13, deploy=False, attempt_use_lk_impl=False), (2, 6, 15, 14)),
    ("unireplknet", dict(channels=2, kernel_size=5, deploy=False, attempt_use_lk_impl=False), (2, 2, 6, 7)),
    ("replknet", dict(in_channels=4, out_channels=8, kernel_size=9, stride=2, groups=2, small_kernel=5),
     (2, 4, 11, 10)),
]


@pytest.mark.parametrize("family, options, shape", LIVE, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(LIVE)])
def test_blocks_built_live_by_the_original_code_load_into_ours(family, options, shape):
    if original_module(family) is None:
        pytest.skip(f"the original {family} code is not on this machine (set ACNET_ORIGINALS_DIR)")
    check_record(original_record(family, options, shape, seed=7))
