"""The ECB and dilated large-kernel blocks: their transforms (float64, hypothesis) and their own rules.

The block contract (every form, float64 exactness, stored options, keep_weights) runs for them in
``test_block_contract.py``; the originals' state dicts in ``test_originals.py``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from acnet import acnet_fuse_and_load, transforms
from acnet.dilated import UNIREPLKNET_BRANCHES, DilatedReparamBlock, default_branches
from acnet.ecb import ECBlock
from helpers import randomize_all_, relative_difference

DT = torch.float64
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


# --- transforms ---------------------------------------------------------------------------------
def test_masks_are_the_ecbsr_masks_in_2d_and_generalise():
    sobel_x = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], dtype=DT)  # models/ecb.py
    sobel_y = torch.tensor([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]], dtype=DT)
    laplacian = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=DT)
    assert torch.equal(transforms.sobel_kernel(2, 1, dtype=DT), sobel_x)
    assert torch.equal(transforms.sobel_kernel(2, 0, dtype=DT), sobel_y)
    assert torch.equal(transforms.laplacian_kernel(2, dtype=DT), laplacian)
    assert torch.equal(transforms.sobel_kernel(1, 0, dtype=DT), torch.tensor([1.0, 0.0, -1.0], dtype=DT))
    assert torch.equal(transforms.laplacian_kernel(1, dtype=DT), torch.tensor([1.0, -2.0, 1.0], dtype=DT))
    for axis in range(3):
        kernel = transforms.sobel_kernel(3, axis, dtype=DT)
        assert kernel.shape == (3, 3, 3) and kernel.sum() == 0 and kernel.abs().sum() == 32
        assert torch.equal(kernel, -kernel.flip(axis))  # odd along its axis
    lap3 = transforms.laplacian_kernel(3, dtype=DT)
    assert lap3.sum() == 0 and lap3[1, 1, 1] == -6 and (lap3 != 0).sum() == 7
    with pytest.raises(ValueError, match="axis"):
        transforms.sobel_kernel(2, 2)


@settings(max_examples=25, deadline=None)
@given(dim=st.sampled_from([1, 2, 3]), groups=st.sampled_from([1, 2]), per_group=st.integers(1, 3),
       out_per_group=st.integers(1, 3), stride=st.integers(1, 2), dilation=st.integers(1, 2),
       seed=st.integers(0, 1000))
def test_fuse_1x1_depthwise_equals_the_bias_padded_branch(dim, groups, per_group, out_per_group, stride, dilation,
                                                          seed):
    """1x1 conv, its output padded with its bias, depthwise conv == one conv on the zero-padded input."""
    cin, cout = groups * per_group, groups * out_per_group
    k1, b1 = rand(cout, per_group, *(1,) * dim, seed=seed), rand(cout, seed=seed + 1)
    taps, bias = rand(cout, 1, *(3,) * dim, seed=seed + 2), rand(cout, seed=seed + 3)
    x = rand(2, cin, *(5,) * dim, seed=seed + 4)
    p = dilation
    mid = CONV[dim](x, k1, b1, groups=groups)
    padded = F.pad(mid - b1.view(1, -1, *(1,) * dim), [p] * (2 * dim)) + b1.view(1, -1, *(1,) * dim)
    expected = CONV[dim](padded, taps, bias, stride=stride, dilation=dilation, groups=cout)
    kernel, fused_bias = transforms.fuse_1x1_depthwise(k1, b1, taps, bias)
    got = CONV[dim](x, kernel, fused_bias, stride=stride, padding=p, dilation=dilation, groups=groups)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(dim=st.sampled_from([1, 2, 3]), k=st.sampled_from([1, 2, 3]), rate=st.integers(1, 3),
       dilation=st.integers(1, 2), groups=st.sampled_from([1, 2]), padding=st.integers(0, 3), seed=st.integers(0, 99))
def test_dilate_kernel_equals_the_dilated_conv(dim, k, rate, dilation, groups, padding, seed):
    kernel = rand(4, 4 // groups, *(k,) * dim, seed=seed)
    dense = transforms.dilate_kernel(kernel, rate)
    assert dense.shape[2:] == (rate * (k - 1) + 1,) * dim
    x = rand(1, 4, *(9,) * dim, seed=seed + 1)
    expected = CONV[dim](x, kernel, None, padding=padding, dilation=rate * dilation, groups=groups)
    got = CONV[dim](x, dense, None, padding=padding, dilation=dilation, groups=groups)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_dilate_kernel_is_differentiable():
    kernel = rand(2, 1, 3, 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda k: transforms.dilate_kernel(k, (2, 3)), (kernel,))


# --- ECB ------------------------------------------------------------------------------------------
def test_ecb_branch_names_are_ecbsrs_and_grow_with_the_dimension():
    names = {dim: sorted(n for n, _ in ECBlock(3, 4, dim=dim, norm="none").named_children()) for dim in (1, 2, 3)}
    assert names[2] == ["bn", "conv1x1_3x3", "conv1x1_lpl", "conv1x1_sbx", "conv1x1_sby", "conv3x3", "nonlinear"]
    assert "conv1x1_sbz" in names[3] and "conv1x1_sby" not in names[1]
    assert ECBlock(4, 8, 3).conv1x1_3x3.k0.shape == (16, 4, 1, 1)  # depth_multiplier 2.0, as ECBSR
    assert ECBlock(4, 8, 3, mid_channels=5).conv1x1_3x3.k0.shape == (5, 4, 1, 1)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(in_channels=4, out_channels=4), True),
    (dict(in_channels=4, out_channels=6), False),  # as the original: off when in != out
    (dict(in_channels=4, out_channels=4, stride=2), False),
    (dict(in_channels=4, out_channels=4, padding=0), False),
    (dict(in_channels=4, out_channels=4, kernel_size=5, padding=2, groups=2), True),
])
def test_ecb_identity_only_where_the_block_keeps_the_map(kwargs, expected):
    block = ECBlock(with_idt=True, **{"kernel_size": 3, **kwargs})
    assert block.with_idt is expected


def test_ecb_with_identity_stores_it_and_folds_through_acnet_fuse_and_load():
    torch.manual_seed(0)
    block = randomize_all_(ECBlock(4, 4, 3, with_idt=True, norm="none").double(), 3).eval()
    state = block.state_dict()
    assert bool(state["with_idt"]) and ECBlock.stored_options(state, 4)["with_idt"] is True
    base = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1)).double()
    loaded = acnet_fuse_and_load(base, {f"0.{k}": v for k, v in state.items()})
    x = rand(2, 4, 6, 5)
    with torch.no_grad():
        assert relative_difference(loaded(x), block(x)) <= 1e-10
    with pytest.raises(RuntimeError, match="with_idt"):
        ECBlock(4, 4, 3, norm="none").double().load_state_dict(state)


def test_ecb_keep_weights_with_identity_starts_as_the_pretrained_conv():
    conv = nn.Conv2d(4, 4, 3, padding=1).double()
    block = ECBlock(4, 4, 3, with_idt=True, norm="none").double().eval()
    block.load_main_branch(conv.weight, conv.bias, None)
    x = rand(2, 4, 7, 7)
    with torch.no_grad():
        assert relative_difference(block(x), conv(x)) <= 1e-12


def test_ecb_refuses_small_kernels_and_the_transposed_form_with_a_reason():
    kw = dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, padding_mode="zeros", norm="none")
    assert "at least 3" in ECBlock.unsupported(dim=2, kernel_size=(1, 3), **kw)
    assert "transposed" in ECBlock.unsupported(dim=2, kernel_size=(3, 3), transposed=True, **kw)
    with pytest.raises(ValueError, match="at least 3"):
        ECBlock(4, 4, 2)


@pytest.mark.parametrize("cls, kwargs", [(ECBlock, dict(kernel_size=3, norm="none")),
                                         (ECBlock, dict(kernel_size=(3, 4), norm="batch", with_idt=True)),
                                         (DilatedReparamBlock, dict(kernel_size=5, norm="frozen", groups=3)),
                                         (DilatedReparamBlock, dict(kernel_size=7, dim=1, norm="none"))])
def test_equivalent_kernel_passes_gradcheck(cls, kwargs):
    block = randomize_all_(cls(3, 3, **kwargs).double(), 5).eval()
    params = [p for p in block.parameters() if p.requires_grad]

    def kernel_of(*values):
        with torch.nn.utils.stateless._reparametrize_module(block, dict(zip(
                [n for n, p in block.named_parameters() if p.requires_grad], values))):
            kernel, bias = block.get_equivalent_kernel_bias()
        return kernel.sum() + (kernel * kernel).sum() + bias.pow(2).sum()

    assert torch.autograd.gradcheck(kernel_of, tuple(p.detach().clone().requires_grad_() for p in params))


# --- dilated ----------------------------------------------------------------------------------------
def test_dilated_default_table_is_unireplknets():
    assert default_branches(7) == ((5, 1), (3, 2), (3, 3))
    assert default_branches(13) == ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5))
    assert default_branches(31) == UNIREPLKNET_BRANCHES[17]  # beyond the original's table: the largest one
    block = DilatedReparamBlock(4, 4, 9, groups=4)
    assert [n for n, _ in block.named_children()][:4] == ["lk_origin", "origin_bn", "dil_conv_k5_1", "dil_bn_k5_1"]
    assert block.dil_conv_k3_4.dilation == (4, 4) and block.lk_origin.padding == (4, 4)
    replk = DilatedReparamBlock(4, 4, 7, small_kernel=3)
    assert replk.branches == ((3, 1),)


@pytest.mark.parametrize("kernel, reason", [((3, 3), ">= 5"), ((6, 6), "odd"), ((7, 5), "cubic")])
def test_dilated_gives_a_reason_where_it_does_not_apply(kernel, reason):
    text = DilatedReparamBlock.unsupported(dim=2, kernel_size=kernel, stride=(1, 1), padding=(1, 1),
                                           dilation=(1, 1), groups=1, padding_mode="zeros", norm="batch")
    assert reason in text
    with pytest.raises(ValueError, match=reason):
        DilatedReparamBlock(4, 4, kernel)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kernel_sizes=[5, 3], dilates=[1]), "same length"),
    (dict(kernel_sizes=[3], dilates=[4]), "spans 9"),
    (dict(kernel_sizes=[4], dilates=[1]), "odd"),
    (dict(kernel_sizes=[3, 3], dilates=[2, 2]), "twice"),
    (dict(small_kernel=3, kernel_sizes=[3], dilates=[1]), "not both"),
])
def test_dilated_refuses_a_bad_branch_table(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DilatedReparamBlock(4, 4, 7, **kwargs)


@pytest.mark.parametrize("dim, norm, kwargs", [
    (3, "batch", dict(kernel_size=5, groups=4)),
    (3, "none", dict(kernel_size=5, padding=1, stride=2, bias=False)),
    (2, "frozen", dict(kernel_size=13, groups=4, padding_mode="reflect")),
    (2, "batch", dict(kernel_size=7, dilation=2, padding=3, kernel_sizes=[3, 5], dilates=[3, 1])),
    (1, "batch", dict(kernel_size=9, transposed=True, stride=2, padding=4, output_padding=1)),
])
def test_dilated_forms_the_contract_grid_does_not_reach_are_exact(dim, norm, kwargs):
    block = randomize_all_(DilatedReparamBlock(4, 4, dim=dim, norm=norm, **kwargs).double(), 2)
    x = rand(2, 4, *(15,) * dim)
    block.train()(x).sum().backward()
    block.eval()
    with torch.no_grad():
        expected = block(x)
        block.switch_to_deploy()
        assert relative_difference(block(x), expected) <= 1e-10


# --- the builder's rules (-b ecb / -b dilated) --------------------------------------------------
def test_builder_puts_ecb_bn_free_where_no_bn_follows_and_dilated_on_odd_kernels_from_5():
    from acnet.block import ConvBN
    from constructor import make_builder
    from constructor.builder import BiasFreeConv

    ecb = make_builder("ecb")
    assert ecb.conv_bn(4, 4, 3, padding=1).norm == "batch"  # ECB, then the unit's BN
    assert ecb.conv(4, 4, 3, padding=1).norm == "none"  # no BN after the conv: the paper's BN-free ECB
    assert isinstance(ecb.conv_bn(4, 4, 1), ConvBN) and isinstance(ecb.conv_bn(4, 4, 7, padding=3), ConvBN)
    dilated = make_builder("dilated")
    assert isinstance(dilated.conv_bn(4, 4, 3, padding=1), ConvBN) and isinstance(dilated.conv(4, 4, 3), BiasFreeConv)
    assert isinstance(dilated.conv_bn(4, 4, 5, padding=2), DilatedReparamBlock)
    assert isinstance(dilated.conv_bn(4, 4, 7, padding=3), DilatedReparamBlock)  # 7x7 stems too


def test_dilated_on_an_arch_without_large_kernels_is_one_line_naming_the_archs_it_fits():
    from constructor import build_model
    from constructor.builder import BlockTypeNotApplicableError

    with pytest.raises(BlockTypeNotApplicableError) as info:
        build_model("vc", "dilated")
    message = str(info.value)
    assert "\n" not in message and "no conv of vc" in message and "odd K >= 5" in message
    assert "it applies to cfqkbnc, sres18, sres34, sres50" in message
    assert sum(isinstance(m, DilatedReparamBlock) for m in build_model("cfqkbnc", "dilated").modules()) == 3
    build_model("vc", "dilated", deploy=True)  # the deploy form is the same for every block type
