"""DiverseBranchBlock: exact fusion, original names, padded BN, training semantics, errors."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from acnet.block import ReparamBlock
from acnet.dbb import BNAndPadLayer, DiverseBranchBlock, IdentityBasedConv1x1
from helpers import gradcheck_equivalent_kernel, randomize_


def reference_forward(block: DiverseBranchBlock, x: torch.Tensor) -> torch.Tensor:
    """The four branches written out with plain ops (the original DBB's forward)."""
    def padded_bn(layer: BNAndPadLayer, y):
        y = layer.bn(y)
        p = layer.pad_pixels
        if p == 0:
            return y
        bn = layer.bn
        value = (bn.bias - bn.running_mean * bn.weight / (bn.running_var + bn.eps).sqrt()).detach()
        out = value.view(1, -1, 1, 1).expand(y.shape[0], -1, y.shape[2] + 2 * p, y.shape[3] + 2 * p).clone()
        out[:, :, p:-p, p:-p] = y
        return out

    k, s, p, d, g = block.kernel_size, block.stride, block.padding, block.dilation, block.groups
    out = block.dbb_origin.bn(block.dbb_origin.conv(x))
    if hasattr(block, "dbb_1x1"):
        out = out + block.dbb_1x1.bn(block.dbb_1x1.conv(x))
    avg = block.dbb_avg
    avg_in = padded_bn(avg.bn, avg.conv(x)) if hasattr(avg, "conv") else F.pad(x, [p] * 4)
    c = avg_in.shape[1]
    avg_kernel = torch.full((c, 1, k, k), 1.0 / (k * k), dtype=x.dtype)
    out = out + avg.avgbn(F.conv2d(avg_in, avg_kernel, None, s, 0, d, c))
    branch = block.dbb_1x1_kxk
    first = branch.idconv1.get_actual_kernel() if hasattr(branch, "idconv1") else branch.conv1.weight
    mid = padded_bn(branch.bn1, F.conv2d(x, first, None, 1, 0, 1, g))
    out = out + branch.bn2(F.conv2d(mid, branch.conv2.weight, None, s, 0, d, g))
    return block.nonlinear(out)


@st.composite
def dbb_cases(draw):
    k = draw(st.sampled_from([1, 3, 5]))
    dilation = draw(st.integers(1, 2))
    stride = draw(st.integers(1, 3))
    groups, cin, cout = draw(st.sampled_from([(1, 2, 3), (1, 3, 3), (2, 4, 2), (2, 2, 4), (3, 3, 3), (4, 4, 4),
                                              (4, 8, 4)]))
    internal = draw(st.sampled_from([None, cin, 2 * groups, 3 * groups]))
    reach = dilation * (k - 1) + 1 - 2 * dilation * (k // 2)
    h = draw(st.integers(max(reach, 2), 8))
    w = draw(st.integers(max(reach, 2), 8))
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    seed = draw(st.integers(0, 2**16))
    return dict(k=k, stride=stride, dilation=dilation, groups=groups, cin=cin, cout=cout, internal=internal,
                h=h, w=w, eps=eps, seed=seed)


def build(case, dtype=torch.float64, nonlinear=None):
    block = DiverseBranchBlock(case["cin"], case["cout"], case["k"], case["stride"], dilation=case["dilation"],
                               groups=case["groups"], internal_channels_1x1_3x3=case["internal"],
                               nonlinear=nonlinear, bn_eps=case["eps"])
    randomize_(block, case["seed"]).to(dtype).eval()
    x = torch.randn(2, case["cin"], case["h"], case["w"], generator=torch.Generator().manual_seed(case["seed"] + 1),
                    dtype=torch.float64).to(dtype)
    return block, x


@settings(max_examples=30)
@given(dbb_cases())
def test_eval_forward_equals_the_reference_four_branch_forward(case):
    # deploy == training form for every block type: tests/test_block_contract.py
    block, x = build(case)
    torch.testing.assert_close(block(x), reference_forward(block, x), rtol=1e-12, atol=1e-12)


def test_structure_and_state_dict_names_match_the_original():
    dense = DiverseBranchBlock(8, 16, 3, padding=1)
    keys = set(dense.state_dict())
    for key in ("dbb_origin.conv.weight", "dbb_origin.bn.running_var", "dbb_1x1.conv.weight", "dbb_1x1.bn.weight",
                "dbb_avg.conv.weight", "dbb_avg.bn.bn.running_mean", "dbb_avg.avgbn.weight",
                "dbb_1x1_kxk.idconv1.weight", "dbb_1x1_kxk.bn1.bn.weight", "dbb_1x1_kxk.conv2.weight",
                "dbb_1x1_kxk.bn2.running_mean"):
        assert key in keys, key
    assert not any("id_tensor" in k for k in keys)
    assert isinstance(dense.dbb_1x1_kxk.idconv1, IdentityBasedConv1x1)
    assert isinstance(dense, ReparamBlock) and dense.padding_mode == "zeros"

    depthwise = DiverseBranchBlock(8, 8, 3, padding=1, groups=8)
    assert not hasattr(depthwise, "dbb_1x1") and not hasattr(depthwise.dbb_avg, "conv")
    assert depthwise.dbb_1x1_kxk.conv1.out_channels == 16  # 2x internal channels by default
    assert [n for n, _ in depthwise.dbb_avg.named_children()] == ["avg", "avgbn"]
    wide = DiverseBranchBlock(8, 16, 3, padding=1, internal_channels_1x1_3x3=12)
    assert wide.dbb_1x1_kxk.conv1.out_channels == 12 and not hasattr(wide.dbb_1x1_kxk, "idconv1")


def test_identity_based_1x1_starts_as_identity():
    conv = IdentityBasedConv1x1(6, groups=3)
    assert torch.all(conv.weight == 0)
    x = torch.randn(2, 6, 4, 4)
    torch.testing.assert_close(conv(x), x)
    conv.to(torch.float64)
    torch.testing.assert_close(conv(x.double()), x.double())


def test_padded_bn_pads_with_its_output_for_zero_input():
    layer = randomize_(BNAndPadLayer(2, 3), 4).eval()
    y = torch.randn(1, 3, 4, 5)
    out = layer(y)
    assert out.shape == (1, 3, 8, 9)
    zero_out = layer.bn(torch.zeros(1, 3, 1, 1)).view(3)
    torch.testing.assert_close(out[0, :, 0, 0], zero_out)
    torch.testing.assert_close(out[0, :, -1, 3], zero_out)
    torch.testing.assert_close(out[0, :, 3, -2], zero_out)
    torch.testing.assert_close(out[:, :, 2:-2, 2:-2], layer.bn(y))


def test_nonlinear_is_applied_after_the_sum_and_kept_by_the_deploy_form():
    case = dict(k=3, stride=2, dilation=1, groups=1, cin=3, cout=4, internal=None, h=7, w=6, eps=1e-5, seed=2)
    block, x = build(case, nonlinear=nn.ReLU())
    expected = reference_forward(block, x)
    assert torch.all(expected >= 0) and torch.any(expected == 0)
    block.switch_to_deploy()
    assert isinstance(block.nonlinear, nn.ReLU)
    torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(F.relu(block.make_deploy_conv()(x)), expected, rtol=0, atol=1e-10)


def test_switch_to_deploy_is_in_place_and_idempotent():
    case = dict(k=3, stride=1, dilation=1, groups=2, cin=4, cout=4, internal=None, h=6, w=6, eps=1e-5, seed=9)
    block, x = build(case)
    expected = block(x)
    block.make_deploy_conv()
    assert not block.deployed
    block.switch_to_deploy()
    block.switch_to_deploy()
    assert block.deployed and set(dict(block.named_children())) == {"nonlinear", "dbb_reparam"}
    assert set(block.state_dict()) == {"dbb_reparam.weight", "dbb_reparam.bias"}
    torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-10)
    deployed = DiverseBranchBlock(4, 4, 3, padding=1, groups=2, deploy=True).double()
    deployed.load_state_dict(block.state_dict(), strict=True)
    torch.testing.assert_close(deployed(x), expected, rtol=0, atol=1e-10)


def test_gamma_options():
    block = DiverseBranchBlock(4, 4, 3, padding=1, single_init=True)
    assert torch.all(block.dbb_origin.bn.weight == 1)
    for bn in (block.dbb_1x1.bn, block.dbb_avg.avgbn, block.dbb_1x1_kxk.bn2):
        assert torch.all(bn.weight == 0)
    block.init_gamma(1 / 3)
    for bn in (block.dbb_origin.bn, block.dbb_1x1.bn, block.dbb_avg.avgbn, block.dbb_1x1_kxk.bn2):
        assert torch.allclose(bn.weight, torch.full((4,), 1 / 3))
    assert torch.all(block.dbb_1x1_kxk.bn1.bn.weight == 1)  # inner BNs are not branch outputs


def test_single_init_block_equals_its_kxk_branch_in_eval_mode():
    block = randomize_(DiverseBranchBlock(3, 4, 3, padding=1), 6).double()
    block.single_init()
    block.eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    shift = sum(bn.bias.view(1, -1, 1, 1) for bn in (block.dbb_1x1.bn, block.dbb_avg.avgbn, block.dbb_1x1_kxk.bn2))
    torch.testing.assert_close(block(x), block.dbb_origin(x) + shift)


def test_equivalent_kernel_passes_gradcheck():
    block = randomize_(DiverseBranchBlock(2, 2, 3, padding=1, internal_channels_1x1_3x3=2), 12).double().eval()
    names = gradcheck_equivalent_kernel(block)
    assert any("idconv1" in n for n in names) and any("dbb_avg.conv" in n for n in names)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kernel_size=0), "kernel_size must be an int >= 1"),
        (dict(kernel_size=3, padding=-1), "padding must be >= 0"),
        (dict(kernel_size=3, bias=False, norm="frozen"), "bias=False needs norm='none'"),
        (dict(kernel_size=3, groups=4), "divisible by groups"),
        (dict(kernel_size=3, groups=2, internal_channels_1x1_3x3=5), "internal_channels_1x1_3x3"),
        (dict(kernel_size=3, stride=0), "stride must be >= 1"),
    ],
)
def test_bad_arguments_name_the_argument_and_the_rule(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiverseBranchBlock(6, 6, **kwargs)


@pytest.mark.parametrize("case", [
    dict(k=3, stride=1, dilation=1, groups=1, cin=3, cout=4, internal=None, h=7, w=6, eps=1e-5, seed=1),
    dict(k=3, stride=2, dilation=1, groups=4, cin=4, cout=4, internal=None, h=8, w=7, eps=1e-5, seed=2),
    dict(k=5, stride=2, dilation=2, groups=2, cin=4, cout=2, internal=6, h=9, w=8, eps=1e-3, seed=3),
])
def test_training_mode_forward_backward_match_reference(case):
    """Train mode: outputs, input/parameter gradients and BN running statistics equal the plain branch form."""
    block, _ = build(case)
    block.train()
    reference = copy.deepcopy(block)
    x = torch.randn(3, case["cin"], case["h"], case["w"], dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    for _ in range(2):
        out = block(x)
        expected = reference_forward(reference, x_ref)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
        expected.backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-9)
    for (name, p), p_ref in zip(block.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-9, msg=name)
    for (name, b), b_ref in zip(block.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b, b_ref, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("k,stride,padding,dilation", [(3, 1, 1, 1), (3, 2, 0, 1), (5, 2, 2, 1), (3, 1, 2, 2)])
def test_avg_pool_module_equals_average_pooling(k, stride, padding, dilation):
    from acnet.dbb import AvgPoolKxK

    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    out = AvgPoolKxK(k, stride, padding, dilation)(x)
    if dilation == 1:
        expected = F.avg_pool2d(x, k, stride, padding, count_include_pad=True)
    else:  # mean over the dilated window of the zero-padded input
        windows = F.unfold(x, k, dilation=dilation, padding=padding, stride=stride)
        expected = windows.view(2, 3, k * k, -1).mean(2).view_as(out)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_channels_last_training_matches_reference():
    """The padded-BN buffer follows the input's layout; values and gradients do not depend on it."""
    block = randomize_(DiverseBranchBlock(4, 6, 3, padding=1), 8).double().train()
    reference = copy.deepcopy(block)
    block = block.to(memory_format=torch.channels_last)
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    x_ref = x.detach().clone().requires_grad_(True)
    out, expected = block(x), reference_forward(reference, x_ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
