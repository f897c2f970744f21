"""The architecture registry, the conv-builder switch and the architectures' sizes."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from acnet import ACBlock, ConvBN, DiverseBranchBlock, ReparamBlock, acnet_switch_to_deploy
from constructor import BLOCK_TYPES, BiasFreeConv, ConvBuilder, build_model, get_arch_spec, list_archs, make_builder
from helpers import on_meta

ALL_ARCHS = ("cfqkbnc", "vc", "src56", "src110", "wrnc16plain", "sres18", "sres34", "sres50", "smi1")


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- registry ---------------------------------------------------------------------------------
def test_registry_lists_every_arch_with_its_dataset_and_input_size():
    assert list_archs() == list(ALL_ARCHS)
    assert BLOCK_TYPES == ("base", "acb", "dbb", "orepa", "repvgg", "mobileone", "ecb", "dilated")
    for arch in ALL_ARCHS:
        spec = get_arch_spec(arch)
        imagenet = arch.startswith("sres") or arch == "smi1"
        assert spec.name == arch
        assert (spec.dataset, spec.input_size, spec.num_classes) == (
            ("imagenet", 224, 1000) if imagenet else ("cifar10", 32, 10)
        )


@pytest.mark.parametrize("bad", ["resnet18", "", "SRC56", None])
def test_unknown_arch_is_one_clear_error_listing_the_valid_names(bad):
    for call in (lambda: get_arch_spec(bad), lambda: build_model(bad)):
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert repr(bad) in message and all(name in message for name in ALL_ARCHS)


@pytest.mark.parametrize("bad", ["ACB", "vgg", "", None])
def test_unknown_block_type_is_one_clear_error_listing_the_valid_names(bad):
    for call in (lambda: build_model("cfqkbnc", bad), lambda: make_builder(bad)):
        with pytest.raises(ValueError) as info:
            call()
        assert repr(bad) in str(info.value) and all(name in str(info.value) for name in BLOCK_TYPES)


def test_bad_block_options_are_one_clear_error():
    with pytest.raises(ValueError, match=r"'base' takes no block options.*gamma_init"):
        build_model("cfqkbnc", "base", gamma_init=1 / 3)
    with pytest.raises(ValueError, match=r"'acb' \(ACBlock\) does not take option\(s\) \['internal_channels_1x1_3x3'\].*gamma_init"):
        build_model("cfqkbnc", "acb", internal_channels_1x1_3x3=8)
    with pytest.raises(ValueError, match=r"'dbb' \(DiverseBranchBlock\) does not take option\(s\) \['use_affine'\]"):
        build_model("cfqkbnc", "dbb", use_affine=False)
    with pytest.raises(ValueError, match="'nonlinear' is not accepted"):
        build_model("cfqkbnc", "dbb", nonlinear=nn.ReLU())
    with pytest.raises(ValueError, match="bn_eps must be a positive number"):
        build_model("cfqkbnc", "base", bn_eps=0)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_classes must be a positive int"):
            build_model("cfqkbnc", num_classes=bad)


# --- parameter counts -------------------------------------------------------------------------
@pytest.mark.parametrize("arch,torchvision_name", [("sres18", "resnet18"), ("sres34", "resnet34"), ("sres50", "resnet50")])
def test_imagenet_resnets_have_torchvision_parameter_count(arch, torchvision_name):
    with torch.device("meta"):
        reference = getattr(torchvision.models, torchvision_name)()
    assert num_params(on_meta(arch)) == num_params(reference)
    assert sorted(tuple(p.shape) for p in on_meta(arch).parameters()) == sorted(tuple(p.shape) for p in reference.parameters())


def conv_bn(cin: int, cout: int, k: int, groups: int = 1) -> int:
    return cin // groups * cout * k * k + 2 * cout


def linear(cin: int, cout: int) -> int:
    return cin * cout + cout


def cifar_resnet_count(n: int, classes: int = 10) -> int:
    total, cin = conv_bn(3, 16, 3), 16
    for width in (16, 32, 64):
        for index in range(n):
            total += conv_bn(cin, width, 3) + conv_bn(width, width, 3)
            total += conv_bn(cin, width, 1) if cin != width else 0
            cin = width
    return total + linear(64, classes)


def wrn_count(n: int, k: int, classes: int = 10) -> int:
    total, cin = 3 * 16 * 9, 16
    for width in (16 * k, 32 * k, 64 * k):
        for index in range(n):
            total += 2 * cin + cin * width * 9 + 2 * width + width * width * 9
            total += 2 * cin + cin * width if cin != width else 0
            cin = width
    return total + 2 * cin + linear(cin, classes)


EXPECTED_COUNTS = {
    "cfqkbnc": conv_bn(3, 32, 5) + conv_bn(32, 32, 5) + conv_bn(32, 64, 5) + linear(576, 64) + linear(64, 10),
    "vc": sum(conv_bn(a, b, 3) for a, b in zip((3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512),
                                                 (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)))
    + linear(512, 512) + linear(512, 10),
    "src56": cifar_resnet_count(9),
    "src110": cifar_resnet_count(18),
    "wrnc16plain": wrn_count(2, 8),
}
#: Published sizes (millions): He et al. 2016 (ResNet-56/110), Zagoruyko & Komodakis 2016 (WRN-16-8),
#: Howard et al. 2017 (MobileNetV1 1.0-224).
PUBLISHED_MILLIONS = {"src56": 0.85, "src110": 1.7, "wrnc16plain": 11.0, "smi1": 4.2}


@pytest.mark.parametrize("arch", ["cfqkbnc", "vc", "src56", "src110", "wrnc16plain", "smi1"])
def test_cifar_and_mobilenet_parameter_counts(arch):
    count = num_params(on_meta(arch))
    if arch in EXPECTED_COUNTS:
        assert count == EXPECTED_COUNTS[arch]
    if arch in PUBLISHED_MILLIONS:
        assert count / 1e6 == pytest.approx(PUBLISHED_MILLIONS[arch], rel=0.02)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_deploy_parameter_count_is_the_bn_folded_baseline(arch):
    """Deploy = base minus each folded BN (2 per channel) plus one bias per channel of every unit conv."""
    base = on_meta(arch)
    folded = sum(m.out_channels for m in base.modules() if isinstance(m, ConvBN))
    bias_only = sum(m.out_channels for m in base.modules() if isinstance(m, BiasFreeConv))
    expected = num_params(base) - folded + bias_only
    for block_type in BLOCK_TYPES:
        assert num_params(on_meta(arch, block_type, deploy=True)) == expected


# --- the switch ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_only_kxk_convs_with_1_lt_k_lt_7_become_blocks(arch):
    base = on_meta(arch)
    base_units = [(type(m), m.kernel_size, m.groups) for m in base.modules() if isinstance(m, ReparamBlock)]
    assert base_units and all(t in (ConvBN, BiasFreeConv) for t, _, _ in base_units)
    in_units = {id(sub) for m in base.modules() if isinstance(m, ReparamBlock) for sub in m.modules()}
    assert all(id(m) in in_units for m in base.modules() if isinstance(m, nn.Conv2d))
    for block_type, block_class in (("acb", ACBlock), ("dbb", DiverseBranchBlock)):
        model = on_meta(arch, block_type)
        units = [(m, type(m)) for m in model.modules() if isinstance(m, ReparamBlock)]
        assert [(m.kernel_size, m.groups) for m, _ in units] == [(k, g) for _, k, g in base_units]
        for (module, kind), (base_kind, k, _) in zip(units, base_units):
            assert kind is (block_class if 1 < k < 7 else base_kind), (arch, block_type, k)
    if arch.startswith("sres"):
        assert base.conv1.conv.kernel_size == 7 and isinstance(on_meta(arch, "acb").conv1.conv, ConvBN)


def test_block_options_pass_through_to_every_block():
    acb = build_model("src56", "acb", gamma_init=1 / 3, bn_eps=1e-3, bn_momentum=0.01)
    blocks = [m for m in acb.modules() if isinstance(m, ACBlock)]
    assert len(blocks) == 55
    for block in blocks:
        for bn in (block.square_bn, block.ver_bn, block.hor_bn):
            assert torch.all(bn.weight == 1 / 3)
    assert all(m.eps == 1e-3 and m.momentum == 0.01 for m in acb.modules() if isinstance(m, nn.BatchNorm2d))

    dbb = build_model("cfqkbnc", "dbb", gamma_init=0.25, internal_channels_1x1_3x3=8)
    for block in (m for m in dbb.modules() if isinstance(m, DiverseBranchBlock)):
        assert torch.all(block.dbb_origin.bn.weight == 0.25) and torch.all(block.dbb_1x1_kxk.bn2.weight == 0.25)
        assert block.dbb_1x1_kxk.conv1.out_channels == 8

    wrn = on_meta("wrnc16plain", "base", bn_eps=1e-4)
    assert all(m.eps == 1e-4 for m in wrn.modules() if isinstance(m, nn.BatchNorm2d))


def test_depthwise_dbb_uses_twice_the_input_channels_internally():
    """DBB paper: the 1x1-KxK branch of a depthwise conv is 2x wide (MobileNet)."""
    model = on_meta("smi1", "dbb")
    depthwise = model.blocks[0].depthwise.conv
    assert isinstance(depthwise, DiverseBranchBlock) and depthwise.groups == depthwise.in_channels == 32
    assert depthwise.dbb_1x1_kxk.conv1.out_channels == 64


@pytest.mark.parametrize("arch", ["cfqkbnc", "vc", "wrnc16plain", "smi1"])
def test_num_classes_gives_cifar100_and_other_heads(arch):
    for deploy in (False, True):
        model = on_meta(arch, "acb", deploy=deploy, num_classes=100)
        assert list(model.modules())[-1].out_features == 100


def test_architectures_take_any_builder():
    """A builder is passed in: an arch built with a user's block class gets that block everywhere."""
    builder = ConvBuilder(ACBlock, gamma_init=0.5)
    assert builder.block_type == "ACBlock" and "gamma_init=0.5" in repr(builder)
    with torch.device("meta"):
        model = get_arch_spec("vc").build(builder, num_classes=7)
    blocks = [m for m in model.modules() if isinstance(m, ACBlock)]
    assert len(blocks) == 13 and model.linear2.out_features == 7
    # A block class without BN arguments is called without them; asking for a BN eps is an error.
    with torch.device("meta"):
        plain = get_arch_spec("src56").build(ConvBuilder(BiasFreeConv))
    assert sum(isinstance(m, BiasFreeConv) for m in plain.modules()) == 55
    with pytest.raises(ValueError, match="takes no bn_eps"):
        ConvBuilder(BiasFreeConv, bn_eps=1e-3)


def test_training_forward_and_backward_reach_every_parameter():
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3])
    for block_type in BLOCK_TYPES:
        model = build_model("cfqkbnc", block_type).train()
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        if block_type == "orepa":  # the prior branch's scale starts at 0 (the original's): its 1x1 waits a step
            assert all(name.endswith("weight_orepa_pfir_conv") for name in missing), missing
            assert all(m.vector.grad[2].abs().sum() > 0 for m in model.modules() if hasattr(m, "vector"))
            continue
        assert not missing, (block_type, missing)


def test_wrn_units_map_onto_the_shared_deploy_tree():
    base, acb, deploy = on_meta("wrnc16plain"), on_meta("wrnc16plain", "acb"), on_meta("wrnc16plain", deploy=True)
    unit = base.stage2[0]
    assert isinstance(base.stem, BiasFreeConv) and isinstance(acb.stem, ACBlock) and type(deploy.stem) is nn.Conv2d
    assert [name for name, _ in unit.conv1.named_children()] == ["bn", "relu", "conv"]
    assert isinstance(unit.conv1.conv, BiasFreeConv) and isinstance(acb.stage2[0].conv1.conv, ACBlock)
    assert isinstance(unit.shortcut.conv, BiasFreeConv) and unit.shortcut.conv.kernel_size == 1
    assert isinstance(acb.stage2[0].shortcut.conv, BiasFreeConv)
    deploy_unit = deploy.stage2[0].conv1
    assert type(deploy_unit.bn) is nn.BatchNorm2d and deploy_unit.conv.bias is not None
    assert isinstance(base.stage1[1].shortcut, nn.Identity)


def test_bias_free_conv_converts_exactly_and_in_place():
    torch.manual_seed(0)
    unit = BiasFreeConv(4, 6, 3, stride=2, padding=1).double()
    images = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    expected = unit(images)
    conv = unit.make_deploy_conv()
    assert type(conv) is nn.Conv2d and conv.stride == (2, 2) and torch.all(conv.bias == 0)
    assert torch.equal(conv(images), expected) and not unit.deployed
    unit.switch_to_deploy()
    unit.switch_to_deploy()
    assert unit.deployed and [n for n, _ in unit.named_children()] == ["fused_conv"]
    assert torch.equal(unit(images), expected)
    model = nn.Sequential(BiasFreeConv(4, 6, 1))
    acnet_switch_to_deploy(model)
    assert type(model[0]) is nn.Conv2d and model[0].bias is not None


def test_deploy_builder_makes_plain_convs_with_bias():
    builder = make_builder("dbb", deploy=True)
    for unit in (builder.conv_bn(8, 8, 3, padding=1), builder.conv(8, 8, 3, padding=1), builder.conv_bn(8, 16, 1)):
        assert type(unit) is nn.Conv2d and unit.bias is not None
    relu_unit = builder.conv_bn_relu(8, 8, 3, padding=1)
    assert [n for n, _ in relu_unit.named_children()] == ["conv", "relu"]
