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
