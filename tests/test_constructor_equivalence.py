"""Every architecture x block type: the converted training model is exactly the shared deploy model.

Eval mode with randomised BN statistics (so BN folding is not the identity); float32 outputs agree
to a relative 1e-5; the builder's units are checked in float64 with hypothesis.
"""
from __future__ import annotations

import copy
import zlib
from functools import lru_cache

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from acnet import ReparamBlock, acnet_switch_to_deploy
from constructor import BLOCK_TYPES, build_model, get_arch_spec, list_archs, make_builder
from constructor.builder import BlockTypeNotApplicableError
from helpers import on_meta, relative_difference

ARCHS = list_archs()
#: Input size of the equivalence checks: the CIFAR archs' own 32x32; the ImageNet archs pool
#: adaptively, so they are checked on 32x32 too (their last stage then sees a 1x1 map, every other
#: stage a larger one) and run at their real 224x224 in a separate test.
CHECK_SIZE = 32


def randomize_statistics(model: nn.Module, generator: torch.Generator) -> None:
    """Random running statistics and affine parameters for every BN, random values for every
    parameter that starts at zero (e.g. DBB's identity-based 1x1), so that fusion is fully exercised."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(_uniform(module.running_mean, -0.2, 0.2, generator))
                module.running_var.copy_(_uniform(module.running_var, 0.5, 2.0, generator))
                if module.affine:
                    module.weight.copy_(_uniform(module.weight, 0.5, 1.5, generator))
                    module.bias.copy_(_uniform(module.bias, -0.2, 0.2, generator))
        for parameter in model.parameters():
            if not parameter.any():
                parameter.copy_(_uniform(parameter, -0.05, 0.05, generator))


def _uniform(like: torch.Tensor, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    values = torch.rand(like.shape, generator=generator, dtype=torch.float64) * (high - low) + low
    return values.to(like.dtype)


def state_shapes(model: nn.Module) -> dict:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


@lru_cache(maxsize=None)
def base_deploy_shapes(arch: str) -> tuple:
    return tuple(state_shapes(on_meta(arch, deploy=True)).items())


@lru_cache(maxsize=None)
def base_deploy_model(arch: str) -> nn.Module:
    """One base deploy model per arch, reused: each test loads all of its tensors strictly."""
    return build_model(arch, "base", deploy=True).eval()


#: The newer families (issue 28) run on a few archs only (their blocks are checked form by form elsewhere):
#: cfqkbnc (5x5), sres18 (3x3 + the 7x7 stem), vc (dilated refused: 3x3 only).
NEWER_FAMILY_ARCHS = ("cfqkbnc", "sres18", "vc")
EQUIVALENCE_CASES = [(arch, block_type) for block_type in BLOCK_TYPES for arch in ARCHS
                     if block_type in ("base", "acb", "dbb", "orepa") or arch in NEWER_FAMILY_ARCHS]


@pytest.mark.parametrize("arch, block_type", EQUIVALENCE_CASES)
def test_train_form_converts_exactly_to_shared_deploy_model(arch: str, block_type: str) -> None:
    spec = get_arch_spec(arch)
    generator = torch.Generator().manual_seed(zlib.crc32(f"{arch}/{block_type}".encode()))
    torch.manual_seed(0)
    try:
        model = build_model(arch, block_type)
    except BlockTypeNotApplicableError as exc:  # dilated: only archs with an odd K >= 5 conv (cfqkbnc, the ResNets)
        assert block_type == "dilated" and f"no conv of {arch}" in str(exc) and "cfqkbnc" in str(exc)
        return
    randomize_statistics(model, generator)
    model.eval()
    images = torch.randn(1, 3, CHECK_SIZE, CHECK_SIZE, generator=generator)
    with torch.no_grad():
        train_logits = model(images)
    assert train_logits.shape == (images.shape[0], spec.num_classes)
    assert torch.isfinite(train_logits).all()

    deployed = acnet_switch_to_deploy(model)
    assert not any(isinstance(m, ReparamBlock) for m in deployed.modules())
    assert not deployed.training
    assert tuple(state_shapes(deployed).items()) == base_deploy_shapes(arch)

    reference = base_deploy_model(arch)
    reference.load_state_dict(deployed.state_dict(), strict=True)
    with torch.no_grad():
        deploy_logits = reference(images)
    assert relative_difference(deploy_logits, train_logits) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_runs_at_its_real_input_size(arch: str) -> None:
    spec = get_arch_spec(arch)
    torch.manual_seed(0)
    model = base_deploy_model(arch)
    with torch.no_grad():
        logits = model(torch.randn(1, 3, spec.input_size, spec.input_size))
    assert logits.shape == (1, spec.num_classes) and torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_deploy_model_is_the_same_for_every_block_type(arch: str) -> None:
    shapes = {block_type: state_shapes(on_meta(arch, block_type, deploy=True)) for block_type in BLOCK_TYPES}
    assert shapes["acb"] == shapes["base"] and shapes["dbb"] == shapes["base"]
    deploy = on_meta(arch, "dbb", deploy=True)
    assert not any(isinstance(m, ReparamBlock) for m in deploy.modules())
    assert all(m.bias is not None for m in deploy.modules() if isinstance(m, nn.Conv2d))
    # The only BNs left are those no conv can absorb (WRN's pre-activation and last BNs).
    base = on_meta(arch, "base")
    inside_units = {f"{name}.{sub}" for name, m in base.named_modules() if isinstance(m, ReparamBlock)
                    for sub, _ in m.named_modules() if sub}
    standalone = sorted(name for name, m in base.named_modules() if isinstance(m, nn.BatchNorm2d) and name not in inside_units)
    assert sorted(name for name, m in deploy.named_modules() if isinstance(m, nn.BatchNorm2d)) == standalone


# --- the builder's units, float64, random geometry ------------------------------------------
UNIT_KINDS = ("conv_bn", "conv_bn_relu", "conv", "bn_relu_conv")


@given(
    block_type=st.sampled_from(BLOCK_TYPES),
    unit=st.sampled_from(UNIT_KINDS),
    kernel_size=st.sampled_from((1, 3, 5, 7)),
    channels=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    depthwise=st.booleans(),
    stride=st.sampled_from((1, 2)),
    dilation=st.sampled_from((1, 2)),
    seed=st.integers(0, 2**16),
)
def test_every_unit_converts_exactly_float64(block_type, unit, kernel_size, channels, depthwise, stride, dilation, seed):
    in_channels, out_channels = channels
    groups = 1
    if depthwise:
        out_channels = groups = in_channels
    padding = dilation * (kernel_size // 2)
    geometry = (in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    train = nn.Sequential(getattr(make_builder(block_type), unit)(*geometry)).double()
    randomize_statistics(train, generator)
    train.eval()
    images = torch.randn(2, in_channels, 9, 9, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        expected = train(images)

    deployed = acnet_switch_to_deploy(copy.deepcopy(train))
    reference = nn.Sequential(getattr(make_builder(block_type, deploy=True), unit)(*geometry)).double().eval()
    assert state_shapes(deployed) == state_shapes(reference)
    reference.load_state_dict(deployed.state_dict(), strict=True)
    with torch.no_grad():
        assert relative_difference(reference(images), expected) < 1e-10
