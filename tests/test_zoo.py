"""Model zoo (subset): acnet's blocks on torchvision and timm models, trained one step, then deployed and
fused into a fresh model, each (model, block) in a worker subprocess.

The whole zoo runs in ``benchmarks/zoo_check.py`` (too long for CI); this is its ``--ci`` subset:
one model per structural family (residual, inverted-residual with SE, channel shuffle, RegNet,
a segmentation head, timm's BatchNormAct2d models), and one block type each for a frozen-BN detector
(backbone features compared), a video net (Conv3d, (1,3,3)/(3,1,1) kernels), BN-free SR and audio nets
and a Conv1d + BatchNorm1d audio net.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from acnet import ReparamBlock, acnet_fuse_and_load, convert_to_acnet
from acnet.convert import Refusal, RefusalKind, bn_tail
from benchmarks.zoo_check import BLOCKS, CASE_TIMEOUT_S, CI_EXTRA_CASES, CI_FAMILY_CASES, CI_MODELS, verdict
from benchmarks.isolated import run_isolated

timm = pytest.importorskip("timm")
#: The rows of the newer block families in CI_EXTRA_CASES (keyed apart from the same model's older row).
BLOCK_OF_NEW_FAMILIES = {"own:edsr": "ecb", "timm:convnext_atto": "dilated"}


def test_zoo_subset_deploys_and_fuses_to_the_trained_model():
    cases = [{"model": spec, "block": block} for spec in CI_MODELS for block in BLOCKS]
    results = run_isolated("benchmarks.zoo_check:check_model", cases, CASE_TIMEOUT_S)
    rows = {(c["model"], c["block"]): (verdict(r), r) for c, r in zip(cases, results)}
    bad = [f"{model} {block}: {status} {detail}" for (model, block), ((status, detail), _) in rows.items()
           if not status.startswith("ok")]
    assert not bad, "\n".join(bad)
    # timm's efficientnet_b0 normalises with BatchNormAct2d: its 17 3x3 / 5x5 conv-BN pairs all convert with ACB;
    # DBB also takes the 1x1 convs (pointwise, squeeze-excite): all 81
    assert [rows[("timm:efficientnet_b0", block)][1]["blocks"] for block in BLOCKS] == [17, 81]


def test_detection_video_and_bn_free_models_deploy_and_fuse_to_the_trained_model():
    cases = [{"model": spec, "block": block} for spec, block in CI_EXTRA_CASES]
    results = run_isolated("benchmarks.zoo_check:check_model", cases, CASE_TIMEOUT_S)
    rows = {(c["model"], c["block"]): (verdict(r), r) for c, r in zip(cases, results)}
    bad = [f"{model} {block}: {status} {detail}" for (model, block), ((status, detail), _) in rows.items()
           if not status.startswith("ok")]
    assert not bad, "\n".join(bad)
    blocks = {model if block != BLOCK_OF_NEW_FAMILIES.get(model) else f"{model} {block}": result["blocks"]
              for (model, block), (_, result) in rows.items()}
    # mobilenet_v3's 16 3x3 / 5x5 depthwise convs with their FrozenBatchNorm2d, the FPN's two 3x3 convs and
    # the RPN head's 3x3 conv (BN-free); r2plus1d's (1,7,7) stem and (1,3,3) spatial convs (ACB refuses
    # the (3,1,1) temporal ones: a 1-D branch would duplicate them); every 3x3 conv of the BN-free nets;
    # the audio nets' 3-tap Conv1d and their 8-tap strided stem (padding 0, even: DBB / OREPA crop their
    # branches to the window)
    # ECB: every 3x3 conv of the BN-free SR net; dilated: convnext_atto's twelve 7x7 depthwise convs (LayerNorm
    # after them: the BN-free form)
    assert blocks == {"tvdet:fasterrcnn_mobilenet_v3_large_fpn": 19, "tvvideo:r2plus1d_18": 17, "own:edsr": 8,
                      "own:audio": 5, "own:audio_bn": 5, "own:edsr ecb": 8, "timm:convnext_atto dilated": 12}


def test_repvgg_and_mobileone_plug_into_torchvision_and_timm_models_and_fold_back_exactly():
    cases = [{"model": spec, "block": block} for spec, block in CI_FAMILY_CASES]
    results = run_isolated("benchmarks.zoo_check:check_model", cases, CASE_TIMEOUT_S)
    rows = {(c["model"], c["block"]): (verdict(r), r) for c, r in zip(cases, results)}
    bad = [f"{model} {block}: {status} {detail}" for (model, block), ((status, detail), _) in rows.items()
           if not status.startswith("ok")]
    assert not bad, "\n".join(bad)
    blocks = {key: result["blocks"] for key, (_, result) in rows.items()}
    # RepVGG takes every conv larger than 1x1 (resnet18: the 7x7 stem and 16 3x3; mobilenet_v2: the stem and
    # 17 depthwise 3x3; timm's mobilenetv3: 12 3x3 / 5x5), MobileOne every conv (the 1x1 shortcuts, expansions
    # and projections too, and timm's squeeze-excite 1x1 convs with their bias in the BN-free form)
    assert blocks == {("tv:resnet18", "repvgg"): 17, ("tv:resnet18", "mobileone"): 20,
                      ("tv:mobilenet_v2", "repvgg"): 18, ("tv:mobilenet_v2", "mobileone"): 52,
                      ("timm:mobilenetv3_small_050", "repvgg"): 12, ("timm:mobilenetv3_small_050", "mobileone"): 53}


def test_timm_batchnormact_keeps_its_activation_and_fuses_into_a_fresh_model():
    from timm.layers import BatchNormAct2d

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), BatchNormAct2d(8, act_layer=nn.Hardswish))
    fresh = copy.deepcopy(model)  # the unconverted model, to fuse into
    convert_to_acnet(model, "acb")
    assert isinstance(model[0], ReparamBlock) and isinstance(model[1].act, nn.Hardswish)
    x = torch.randn(2, 3, 9, 9)
    model.train()
    model(x).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.1 * p.grad)
    model.eval()
    expected = model(x)
    assert (expected >= -0.375 - 1e-6).all()  # the hardswish is applied (its minimum is -3/8)
    torch.testing.assert_close(acnet_fuse_and_load(fresh, model.state_dict())(x), expected, rtol=1e-5, atol=1e-5)


class _ScaledBN(nn.BatchNorm2d):
    """A BN subclass whose forward is not a BN's: acnet must not take it."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_an_unverified_bn_subclass_is_not_taken_its_conv_takes_the_bn_free_form():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _ScaledBN(8), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
    refusal = bn_tail(model[1])
    assert isinstance(refusal, Refusal) and refusal.kind is RefusalKind.UNVERIFIED_NORM
    assert str(refusal).startswith(f"its BN is a {__name__}._ScaledBN, a BatchNorm subclass")
    convert_to_acnet(model, "dbb")
    assert isinstance(model[0], ReparamBlock) and model[0].norm == "none"
    assert type(model[1]) is _ScaledBN  # left as it was, after the block
    assert isinstance(model[2], ReparamBlock) and model[2].norm == "batch"  # the plain pair takes its BN


def test_a_timm_batchnormact_with_extra_children_is_refused():
    from timm.layers import BatchNormAct2d

    bn = BatchNormAct2d(8)
    bn.extra = nn.Identity()  # no longer the verified structure (bn -> drop -> act)
    assert bn_tail(bn).kind is RefusalKind.UNVERIFIED_NORM


def audio_1d() -> nn.Module:
    """A 1-D audio stem: no form of ACB exists for any of its convs."""
    return nn.Sequential(nn.Conv1d(1, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ReLU(), nn.Conv1d(16, 16, 1))


def test_converting_nothing_warns_with_the_reasons():
    with pytest.warns(UserWarning, match=r"no conv of Sequential was replaced by ACBlock \(2 conv\(s\): ACB on a 1-D "
                                         r"conv") as caught:
        convert_to_acnet(audio_1d(), "acb")
    plugin_page = (Path(__file__).resolve().parents[1] / "docs" / "plugin.md").read_text()
    assert f"UserWarning: {caught[0].message}" in plugin_page.splitlines()  # docs/plugin.md shows it as printed
    with pytest.warns(UserWarning, match="the model has no nn.Conv1d/2d/3d"):
        convert_to_acnet(nn.Sequential(nn.Linear(3, 3)), "acb")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model that converts says nothing
        convert_to_acnet(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), "acb")
