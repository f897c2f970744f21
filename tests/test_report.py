"""acnet.conversion_report: one row per conv with its fate, totals that match the real conversion, and
the model left exactly as it was."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from acnet import ConvReportRow, conversion_report, convert_to_acnet, format_report


def state_snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()],
            [m.training for m in model.modules()])


def assert_unchanged(model: nn.Module, snapshot) -> None:
    state, types, modes = snapshot
    now = model.state_dict()
    assert list(now) == list(state) and all(torch.equal(now[k], v) for k, v in state.items())
    assert [type(m) for m in model.modules()] == types and [m.training for m in model.modules()] == modes


@pytest.mark.parametrize("block_type", ["acb", "dbb", "orepa", "repvgg", "mobileone"])
def test_totals_match_the_real_conversion_and_the_model_is_not_touched(block_type):
    model = torchvision.models.resnet18(num_classes=10)
    snapshot = state_snapshot(model)
    report = conversion_report(model, block_type)
    assert_unchanged(model, snapshot)
    # ACB and RepVGG have no 1x1 form (their 1-D / 1x1 branch would duplicate the kernel)
    assert len(report.rows) == 20 and report.converted == (17 if block_type in ("acb", "repvgg") else 20)
    assert report.params_deploy == sum(p.numel() for p in model.parameters())
    converted = convert_to_acnet(copy.deepcopy(model), block_type)
    assert report.params_train == sum(p.numel() for p in converted.parameters())
    assert report.params_train - report.params_deploy == sum(r.extra_params for r in report.rows)
    assert report.converted_params == sum(p.numel() for r in report.rows if r.converted
                                          for p in model.get_submodule(r.name).parameters())
    papers = conversion_report(model, block_type, kernel_sizes=range(2, 7))  # the papers' rule
    assert papers.converted == 16
    assert papers.rows[0] == ConvReportRow(
        "conv1", "Conv2d", (7, 7), (2, 2), 1, "BatchNorm2d", False, "kernel size 7 not in kernel_sizes [2, 3, 4, 5, 6]",
        "-", 0, "converts with kernel_sizes including 7 (or the default None)")
    assert [r.name for r in report.rows if r.converted] == [
        name for name, m in converted.named_modules() if type(m).__name__ in ("ACBlock", "DiverseBranchBlock",
                                                                              "OREPABlock", "RepVGGBlock",
                                                                              "MobileOneBlock")]


def test_rows_name_norm_kind_form_and_reason():
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), FrozenBatchNorm2d(8), nn.ReLU(),
        nn.Conv1d(8, 8, 3, padding=1), nn.BatchNorm1d(8),  # ACB refuses 1-D convs
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),  # no norm: the BN-free form
    )
    rows = {r.name: r for r in conversion_report(model, "acb").rows}
    assert (rows["0"].norm, rows["0"].converted, rows["0"].form_name) == ("FrozenBatchNorm2d", True, "frozen")
    assert rows["0"].extra_params > 0
    assert not rows["3"].converted and rows["3"].reason.startswith("ACB on a 1-D conv")
    assert rows["3"].hint == "block type 'dbb' converts it (BN form)"
    assert (rows["5"].converted, rows["5"].form, rows["5"].form_name) == (True, "none", "BN-free")
    only_pairs = {r.name: r for r in conversion_report(model, "acb", bn_free=False).rows}
    assert not only_pairs["5"].converted and only_pairs["5"].norm == "-"
    assert "bn_free=False converts only convs whose output goes only into one norm" in only_pairs["5"].reason
    assert only_pairs["5"].hint == "converts with bn_free=None (the default: BN-free form)"


def test_every_kept_conv_has_a_refusal_kind_and_the_report_prints_its_text():
    """Callers compare refusal kinds (acnet.pairs.RefusalKind), never prefixes of the printed reasons."""
    from acnet.acb import ACBlock
    from acnet.convert import Refusal, RefusalKind, plan_conversion

    class OwnForward(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    class ScaledBN(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(
        OwnForward(3, 8, 3, padding=1), nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 4, padding="same"), nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 7, padding=3), nn.BatchNorm2d(8),
        nn.Conv1d(8, 8, 3), nn.BatchNorm1d(8),
        nn.Conv2d(8, 8, 3, padding=1), ScaledBN(8),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
    kinds = {"0": RefusalKind.NOT_A_PLAIN_CONV, "2": RefusalKind.ASYMMETRIC_PADDING, "4": RefusalKind.KERNEL_SIZE,
             "6": RefusalKind.NO_FORM}
    plans = {p.conv_name: p for p in plan_conversion(model, ACBlock, frozenset({3, 4}))}
    assert {name: plans[name].reason.kind for name in kinds} == kinds
    assert plans["8"].reason is None and plans["8"].form == "none"  # its BN is refused: the BN-free form
    assert plans["10"].reason is None
    pairs_only = {p.conv_name: p for p in plan_conversion(model, ACBlock, None, bn_free=False)}
    assert pairs_only["8"].reason.kind is RefusalKind.UNVERIFIED_NORM
    assert pairs_only["10"].reason.kind is RefusalKind.NOT_PAIRED
    rows = {r.name: r for r in conversion_report(model, "acb", kernel_sizes=(3, 4), bn_free=False).rows}
    for name, plan in pairs_only.items():
        if plan.reason is not None and name != "4":  # (4: kept for its kernel size only with kernel_sizes)
            assert isinstance(plan.reason, Refusal) and rows[name].reason == str(plan.reason) == plan.reason.text


def test_training_flops_multiplier_of_one_acb_is_its_kernel_area_ratio():
    """One 3x3 conv + BN as an ACB: branches 3x3 + 1x3 + 3x1 = 15 taps vs 9, forward and backward."""
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
    snapshot = state_snapshot(model)
    report = conversion_report(model, "acb", example_input=torch.randn(2, 4, 8, 8))
    assert_unchanged(model, snapshot)
    assert report.train_flops_multiplier == pytest.approx(15 / 9, rel=1e-6)
    assert report.input_shape == (2, 4, 8, 8)
    assert report.converted_flops == report.model_flops == 2 * 2 * 8 * 8 * 8 * 4 * 9  # 2 per multiply-add
    plain = conversion_report(model, "acb", kernel_sizes=[5], example_input=torch.randn(2, 4, 8, 8))
    assert plain.converted == 0 and plain.train_flops_multiplier == 1.0 and plain.converted_flops == 0
    assert "expected training cost (forward + backward): 1.67x the model as it is" in str(report)


def test_format_report_prints_every_row_and_the_totals():
    model = torchvision.models.resnet18(num_classes=10)
    report = conversion_report(model, "dbb")
    text = format_report(report)
    assert str(report) == text
    lines = text.splitlines()
    assert lines[0] == "conversion report: ResNet, block type dbb"
    assert sum(line.startswith("layer") or line.startswith("conv1 ") for line in lines) == 20
    assert f"20 of 20 conv(s) converted (20 BN), holding {report.converted_params:,} of the model's " \
           f"{report.params_deploy:,} parameters" in text
    assert f"parameters while training: {report.params_train:,}" in text
    assert "FLOPs and the expected training cost: pass example_input= to count them" in text


def test_bad_arguments_are_value_errors():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="unknown block_type 'vgg'"):
        conversion_report(model, "vgg")
    with pytest.raises(ValueError, match="has no option 'gamma'"):
        conversion_report(model, "acb", gamma=1.0)


def test_the_zero_conversion_warning_points_to_the_report():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    with pytest.warns(UserWarning, match=r"1 conv\(s\): ACB on a 1x1 kernel.*acnet.conversion_report\(model, 'acb'\) "
                                         r"lists every conv with its reason and the option that would convert it"):
        convert_to_acnet(model, "acb")
