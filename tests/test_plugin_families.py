"""The plug-in with the ECB and dilated large-kernel block types on models we did not write.

``convert_to_acnet(model, "ecb" | "dilated")`` with no option: each conv gets the form of what it feeds (ECB
where it applies: K >= 3 on every axis; dilated: odd cubic K >= 5, other convs reported with the reason),
two training steps, then the model folds back into the stock classes exactly (``acnet_switch_to_deploy``)
and into a freshly built model (``acnet_fuse_and_load``). timm's ConvNeXt (dilated) and the BN-free SR
net (ECB) run in ``test_zoo.py``'s subset.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from acnet import ReparamBlock, acnet_fuse_and_load, acnet_switch_to_deploy, conversion_report, convert_to_acnet
from helpers import randomize_norm_state_, relative_difference
from test_plugin_defaults import EXPECTED_FORMS, mixed_model, module_types, train_steps

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.mark.parametrize("block_type, expected", [
    ("ecb", EXPECTED_FORMS),
    ("dilated", {"conv_in": "none", "conv_out": "none"}),  # the 5x5 and 7x7 convs only
])
def test_mixed_consumers_get_their_forms_and_fold_back_into_the_stock_class(block_type, expected):
    stock = mixed_model()
    rows = {r.name: r for r in conversion_report(stock, block_type).rows}
    assert {name: r.form for name, r in rows.items() if r.converted} == expected
    if block_type == "dilated":
        assert ">= 5" in rows["conv_bn"].reason
    model = convert_to_acnet(copy.deepcopy(stock), block_type)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    train_steps(model, x)
    with torch.no_grad():
        trained = model(x)
        assert relative_difference(trained, stock(x)) > 1e-3
        assert relative_difference(acnet_fuse_and_load(mixed_model(), model.state_dict())(x), trained) <= 1e-12
        deployed = acnet_switch_to_deploy(copy.deepcopy(model))
        assert module_types(deployed) == module_types(stock)
        assert relative_difference(deployed(x), trained) <= 1e-12


def tv_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize_norm_state_(getattr(torchvision.models, name)(num_classes=10), 1).eval()


@pytest.mark.parametrize("name, block_type, blocks", [
    ("resnet18", "ecb", 17),  # every 3x3 conv and the 7x7 stem (ECB then the pair's BN)
    ("resnet18", "dilated", 1),  # the 7x7 stem only
    ("mobilenet_v2", "ecb", 18),  # the 3x3 stem and the 17 depthwise 3x3 convs
])
def test_torchvision_models_train_two_steps_and_fold_into_the_stock_class(name, block_type, blocks):
    stock = tv_model(name)
    model = convert_to_acnet(copy.deepcopy(stock), block_type)
    assert sum(isinstance(m, ReparamBlock) for m in model.modules()) == blocks
    x = torch.randn(2, 3, 32, 32)
    train_steps(model, x)
    with torch.no_grad():
        trained = model(x)
        deployed = acnet_switch_to_deploy(copy.deepcopy(model))
        assert module_types(deployed) == module_types(stock)
        assert relative_difference(deployed(x), trained) <= 1e-5
        assert relative_difference(acnet_fuse_and_load(tv_model(name), model.state_dict())(x), trained) <= 1e-5


def test_a_model_without_large_kernels_converts_nothing_with_dilated_and_says_why():
    with pytest.warns(UserWarning, match="odd kernel >= 5"):
        convert_to_acnet(torchvision.models.mobilenet_v2(num_classes=10), "dilated")


def test_timm_model_with_ecb_trains_and_folds_through_timms_own_reparameterize():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    stock = randomize_norm_state_(timm.create_model("lcnet_050", pretrained=False, num_classes=10), 1).eval()
    model = convert_to_acnet(copy.deepcopy(stock), "ecb")
    assert sum(isinstance(m, ReparamBlock) for m in model.modules()) > 10
    x = torch.randn(2, 3, 32, 32)
    train_steps(model, x)
    with torch.no_grad():
        trained = model(x)
        deployed = timm.utils.reparameterize_model(acnet_switch_to_deploy(copy.deepcopy(model)))
        assert relative_difference(deployed(x), trained) <= 1e-5
        fresh = randomize_norm_state_(timm.create_model("lcnet_050", pretrained=False, num_classes=10), 2)
        assert relative_difference(acnet_fuse_and_load(fresh, model.state_dict())(x), trained) <= 1e-5


def small_net(dim: int, kind: str, kernel: int) -> nn.Module:
    """conv-norm-ReLU twice, then a strided conv-norm (``test_convert_forms.small_net`` with a kernel size)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    from acnet import FrozenBatchNorm

    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dim - 1]
    norm = {"batch": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dim - 1], "none": None,
            "frozen": FrozenBatchNorm2d if dim == 2 else FrozenBatchNorm}[kind]
    layers = []
    for cin, cout, stride in ((3, 8, 1), (8, 8, 1), (8, 8, 2)):
        layers.append(conv(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=kind == "none"))
        if norm is not None:
            layers.append(norm(cout))
        layers.append(nn.ReLU())
    torch.manual_seed(dim)
    return randomize_norm_state_(nn.Sequential(*layers[:-1]), dim)


@pytest.mark.parametrize("block_type, kernel", [("ecb", 3), ("dilated", 5)])
@pytest.mark.parametrize("dim, kind", [(1, "batch"), (2, "frozen"), (3, "none"), (2, "none"), (1, "frozen")])
def test_keep_weights_starts_as_the_pretrained_model_then_trains_and_folds_back(block_type, kernel, dim, kind):
    model = small_net(dim, kind, kernel).eval()
    x = torch.randn(2, 3, *([7] * dim), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pretrained = model(x)
    converted = convert_to_acnet(copy.deepcopy(model), block_type, keep_weights=True)
    blocks = [m for m in converted.modules() if isinstance(m, ReparamBlock)]
    assert len(blocks) == 3 and all(b.dim == dim and b.norm == kind for b in blocks)
    with torch.no_grad():
        assert relative_difference(converted.eval()(x), pretrained) <= 1e-5  # step 0: the pretrained function
    batch = 4 if kind == "batch" else 1
    train_steps(converted, torch.randn(batch, 3, *([7] * dim), generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        trained = converted(x)
        assert relative_difference(trained, pretrained) > 1e-3
        fresh = acnet_fuse_and_load(copy.deepcopy(model), converted.state_dict())
        assert not any(isinstance(m, ReparamBlock) for m in fresh.modules())
        assert relative_difference(fresh(x), trained) <= 1e-4
        assert relative_difference(acnet_switch_to_deploy(copy.deepcopy(converted))(x), trained) <= 1e-4


@pytest.mark.parametrize("block_type", ["ecb", "dilated"])
def test_do_acnet_trains_cfqkbnc_with_the_block_type_and_reports_deploy_equal_to_train(block_type, tmp_path):
    """``do_acnet.py -a cfqkbnc -b TYPE --dataset synthetic`` (a tiny run): trains, converts, deploy == train."""
    import json

    from runprocs import TINY, run

    args = [a if a != "acb" else block_type for a in TINY]
    result = run(tmp_path, *args, "--output-dir", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / f"cfqkbnc_{block_type}_synthetic_train" / "summary.json").read_text())
    assert summary["max_rel_logit_diff"] <= 1e-5 and summary["deploy_top1"] == summary["train_top1"]
