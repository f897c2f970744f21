"""Each fusion transform against a direct computation (float64)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from acnet import transforms

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def random_bn(channels: int, seed: int, affine: bool = True, eps: float = 1e-5) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, eps=eps, affine=affine).to(DT).eval()
    with torch.no_grad():
        bn.running_mean.copy_(rand(channels, seed=seed))
        bn.running_var.copy_(rand(channels, seed=seed + 1).abs() + 0.1)
        if affine:
            bn.weight.copy_(rand(channels, seed=seed + 2))
            bn.bias.copy_(rand(channels, seed=seed + 3))
    return bn


geometry = st.fixed_dictionaries({
    "groups": st.sampled_from([1, 2, 3]),
    "per_group_in": st.integers(1, 3),
    "per_group_out": st.integers(1, 3),
    "stride": st.integers(1, 2),
    "dilation": st.integers(1, 2),
    "seed": st.integers(0, 1000),
})


@settings(max_examples=12)
@given(geometry, st.booleans(), st.booleans(), st.sampled_from([1e-5, 0.01, 0.5]))
def test_fuse_bn_equals_bn_after_conv(g, affine, with_bias, eps):
    cin, cout = g["groups"] * g["per_group_in"], g["groups"] * g["per_group_out"]
    kernel = rand(cout, g["per_group_in"], 3, 3, seed=g["seed"])
    conv_bias = rand(cout, seed=g["seed"] + 5) if with_bias else None
    bn = random_bn(cout, g["seed"], affine, eps)
    x = rand(2, cin, 7, 6, seed=g["seed"] + 9)
    conv = dict(stride=g["stride"], padding=1, dilation=g["dilation"], groups=g["groups"])
    expected = bn(F.conv2d(x, kernel, conv_bias, **conv))
    k, b = transforms.fuse_bn(kernel, bn, conv_bias)
    torch.testing.assert_close(F.conv2d(x, k, b, **conv), expected, **TOL)


def test_bn_scale_shift_uses_the_bns_own_eps_and_defaults_without_affine():
    bn = random_bn(4, 1, affine=False, eps=0.3)
    scale, shift = transforms.bn_scale_shift(bn)
    torch.testing.assert_close(scale, 1 / (bn.running_var + 0.3).sqrt(), **TOL)
    torch.testing.assert_close(shift, -bn.running_mean * scale, **TOL)
    with pytest.raises(ValueError, match="running statistics"):
        transforms.bn_scale_shift(nn.BatchNorm2d(3, track_running_stats=False))


def test_add_branches_equals_sum_of_convs():
    x = rand(2, 3, 6, 6, seed=1)
    ks = [rand(4, 3, 3, 3, seed=s) for s in range(3)]
    bs = [rand(4, seed=10 + s) for s in range(3)]
    k, b = transforms.add_branches(ks, bs)
    expected = sum(F.conv2d(x, ki, bi, padding=1) for ki, bi in zip(ks, bs))
    torch.testing.assert_close(F.conv2d(x, k, b, padding=1), expected, **TOL)
    with pytest.raises(ValueError, match="as many biases"):
        transforms.add_branches(ks, bs[:2])


@settings(max_examples=12)
@given(geometry, st.integers(1, 3), st.sampled_from([1, 3, 5]))
def test_fuse_1x1_kxk_equals_the_two_convs_on_the_padded_input(g, mid_per_group, k):
    """conv_kxk(conv_1x1(pad0(x))) == conv(x; k, b, padding=p): the 1x1 output carries b1 in the padding."""
    groups = g["groups"]
    cin, mid, cout = groups * g["per_group_in"], groups * mid_per_group, groups * g["per_group_out"]
    k1, b1 = rand(mid, g["per_group_in"], 1, 1, seed=g["seed"]), rand(mid, seed=g["seed"] + 1)
    k2, b2 = rand(cout, mid_per_group, k, k, seed=g["seed"] + 2), rand(cout, seed=g["seed"] + 3)
    x = rand(2, cin, 7, 8, seed=g["seed"] + 4)
    p, s, d = g["dilation"] * (k // 2), g["stride"], g["dilation"]
    expected = F.conv2d(F.conv2d(F.pad(x, [p] * 4), k1, b1, groups=groups), k2, b2, s, 0, d, groups)
    kernel, bias = transforms.fuse_1x1_kxk(k1, b1, k2, b2, groups)
    assert kernel.shape == (cout, g["per_group_in"], k, k)
    torch.testing.assert_close(F.conv2d(x, kernel, bias, s, p, d, groups), expected, **TOL)


def test_fuse_1x1_kxk_rejects_mismatched_groups():
    with pytest.raises(ValueError, match="incompatible shapes"):
        transforms.fuse_1x1_kxk(rand(4, 2, 1, 1), rand(4), rand(6, 3, 3, 3), rand(6), groups=2)


def test_concat_depth_equals_concatenated_outputs():
    x = rand(2, 4, 6, 6, seed=2)
    dense, dense_b = [rand(3, 4, 3, 3, seed=5), rand(2, 4, 3, 3, seed=6)], [rand(3, seed=7), rand(2, seed=8)]
    k, b = transforms.concat_depth(dense, dense_b)
    expected = torch.cat([F.conv2d(x, ki, bi, padding=1) for ki, bi in zip(dense, dense_b)], dim=1)
    torch.testing.assert_close(F.conv2d(x, k, b, padding=1), expected, **TOL)
    # per-group kernels concatenated in depth form the grouped conv (how grouped 1x1-KxK merges are built)
    per_group, per_group_b = [rand(3, 2, 3, 3, seed=1), rand(3, 2, 3, 3, seed=2)], [rand(3, seed=3), rand(3, seed=4)]
    k, b = transforms.concat_depth(per_group, per_group_b)
    expected = torch.cat([F.conv2d(x[:, 2 * i:2 * i + 2], ki, bi, padding=1)
                          for i, (ki, bi) in enumerate(zip(per_group, per_group_b))], dim=1)
    torch.testing.assert_close(F.conv2d(x, k, b, padding=1, groups=2), expected, **TOL)


@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (3, 2, 1), (5, 2, 2), (3, 1, 0), (2, 2, 0)])
@pytest.mark.parametrize("channels,groups", [(4, 4), (4, 1), (6, 2)])
def test_avg_pool_kernel_equals_avg_pool(k, stride, padding, channels, groups):
    x = rand(2, channels, 7, 8, seed=k + stride)
    kernel = transforms.avg_pool_kernel(channels, k, groups, dtype=DT)
    assert kernel.shape == (channels, channels // groups, k, k)
    expected = F.avg_pool2d(x, k, stride, padding, count_include_pad=True)
    torch.testing.assert_close(F.conv2d(x, kernel, None, stride, padding, groups=groups), expected, **TOL)


@pytest.mark.parametrize("channels,groups,k", [(4, 1, 1), (6, 3, 3), (5, 5, 3)])
def test_identity_kernel_is_the_identity(channels, groups, k):
    x = rand(2, channels, 5, 5)
    kernel = transforms.identity_kernel(channels, groups, k, dtype=DT)
    torch.testing.assert_close(F.conv2d(x, kernel, None, padding=k // 2, groups=groups), x, **TOL)


@given(st.sampled_from([(1, 1, 3), (1, 1, 5), (3, 3, 5), (1, 3, 3), (3, 1, 5)]), st.integers(1, 2),
       st.integers(0, 1000))
def test_pad_kernel_to_keeps_the_centre(shape, dilation, seed):
    kh, kw, big = shape
    small = rand(3, 2, kh, kw, seed=seed)
    x = rand(1, 2, 9, 9, seed=seed + 1)
    p = dilation * (big // 2) + 1
    padded = transforms.pad_kernel_to(small, big)
    small_padding = (p - dilation * (big - kh) // 2, p - dilation * (big - kw) // 2)
    torch.testing.assert_close(F.conv2d(x, padded, None, 1, p, dilation),
                               F.conv2d(x, small, None, 1, small_padding, dilation), **TOL)


def test_pad_kernel_to_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="cannot centre"):
        transforms.pad_kernel_to(rand(1, 1, 3, 3), 4)
    with pytest.raises(ValueError, match="cannot centre"):
        transforms.pad_kernel_to(rand(1, 1, 5, 5), 3)


@pytest.mark.parametrize("k,dilation", [(3, 1), (5, 1), (3, 2)])
def test_add_to_centre_puts_asymmetric_kernels_on_the_skeleton(k, dilation):
    """KxK + 1xK (centre row) + Kx1 (centre column) with aligned paddings is one KxK conv."""
    x = rand(2, 3, 8, 9, seed=k)
    square, hor, ver = rand(4, 3, k, k, seed=1), rand(4, 3, 1, k, seed=2), rand(4, 3, k, 1, seed=3)
    p = dilation * (k // 2)
    expected = (F.conv2d(x, square, None, 1, p, dilation) + F.conv2d(x, hor, None, 1, (0, p), dilation)
                + F.conv2d(x, ver, None, 1, (p, 0), dilation))
    fused = transforms.add_to_centre(transforms.add_to_centre(square, hor), ver)
    torch.testing.assert_close(F.conv2d(x, fused, None, 1, p, dilation), expected, **TOL)
    assert torch.equal(fused[:, :, 0, 0], square[:, :, 0, 0])  # corners untouched


# --- N-d (1-d and 3-d convs, non-cubic kernels) -------------------------------------------------
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
kernel_nd = st.sampled_from([(3,), (5,), (1, 3), (3, 3), (1, 3, 3), (3, 1, 1), (3, 3, 3), (3, 1, 5)])


def map_of(dim: int, channels: int, seed: int) -> torch.Tensor:
    return rand(2, channels, *((6, 5, 7)[:dim]), seed=seed)


@settings(max_examples=15, deadline=None)
@given(kernel_nd, st.sampled_from([1, 2]), st.integers(1, 2), st.integers(0, 1000))
def test_fuse_1x1_kxk_in_n_d_equals_the_two_convs_with_the_bias_padded_intermediate_map(kernel, groups, stride, seed):
    dim = len(kernel)
    cin, mid, cout = 2 * groups, 3 * groups, 2 * groups
    k1, b1 = rand(mid, cin // groups, *([1] * dim), seed=seed), rand(mid, seed=seed + 1)
    k2, b2 = rand(cout, mid // groups, *kernel, seed=seed + 2), rand(cout, seed=seed + 3)
    x = map_of(dim, cin, seed + 4)
    pad = [k // 2 for k in kernel]
    inner = CONV[dim](x, k1, b1, groups=groups)
    flat = []
    for q in reversed(pad):
        flat += [q, q]
    padded = F.pad(inner - b1.view(1, -1, *([1] * dim)), flat) + b1.view(1, -1, *([1] * dim))  # border = b1
    expected = CONV[dim](padded, k2, b2, stride=stride, groups=groups)
    kernel_f, bias_f = transforms.fuse_1x1_kxk(k1, b1, k2, b2, groups=groups)
    assert tuple(kernel_f.shape) == (cout, cin // groups, *kernel)
    torch.testing.assert_close(CONV[dim](x, kernel_f, bias_f, stride=stride, padding=pad, groups=groups), expected, **TOL)


@settings(max_examples=15, deadline=None)
@given(kernel_nd, st.sampled_from([1, 2, 4]), st.integers(1, 2), st.integers(0, 1000))
def test_avg_pool_kernel_in_n_d_equals_average_pooling(kernel, groups, stride, seed):
    dim, channels = len(kernel), 4
    x = map_of(dim, channels, seed)
    pad = [k // 2 for k in kernel]
    k = transforms.avg_pool_kernel(channels, kernel, groups, dim=dim, dtype=DT)
    expected = AVG[dim](x, kernel, stride, pad, count_include_pad=True)
    torch.testing.assert_close(CONV[dim](x, k, None, stride, pad, 1, groups), expected, **TOL)


@settings(max_examples=15, deadline=None)
@given(kernel_nd, st.integers(1, 2), st.integers(0, 1000))
def test_pad_kernel_to_in_n_d_keeps_the_centre(kernel, dilation, seed):
    dim = len(kernel)
    small = tuple(1 if i % 2 else k for i, k in enumerate(kernel))  # e.g. (3, 1, 3) inside (3, 3, 3)
    large = tuple(k + 2 for k in kernel)
    w = rand(3, 2, *small, seed=seed)
    x = map_of(dim, 2, seed + 1)
    padded = transforms.pad_kernel_to(w, large)
    pad_large = [dilation * (k // 2) for k in large]
    pad_small = [p - dilation * (k_l - k_s) // 2 for p, k_l, k_s in zip(pad_large, large, small)]
    expected = CONV[dim](x, w, None, 1, pad_small, dilation)
    torch.testing.assert_close(CONV[dim](x, padded, None, 1, pad_large, dilation), expected, **TOL)
    added = transforms.add_to_centre(rand(3, 2, *large, seed=seed + 2), w)
    torch.testing.assert_close(added - rand(3, 2, *large, seed=seed + 2), padded, **TOL)


@pytest.mark.parametrize("kernel", [(3,), (3, 3), (1, 3, 3), (3, 3, 3)])
def test_identity_kernel_in_n_d_is_the_identity(kernel):
    dim = len(kernel)
    x = map_of(dim, 4, 3)
    k = transforms.identity_kernel(4, 2, kernel, dim=dim, dtype=DT)
    torch.testing.assert_close(CONV[dim](x, k, None, 1, [v // 2 for v in kernel], 1, 2), x, **TOL)


@settings(max_examples=12, deadline=None)
@given(kernel_nd, st.sampled_from([1, 2]), st.integers(0, 1000))
def test_merge_depthwise_pointwise_in_n_d_equals_the_two_convs(kernel, groups, seed):
    dim, cin, m, cout = len(kernel), 4, 2, 6
    dw = rand(cin * m, 1, *kernel, seed=seed)
    pw = rand(cout, cin * m // groups, *([1] * dim), seed=seed + 1)
    x = map_of(dim, cin, seed + 2)
    pad = [k // 2 for k in kernel]
    expected = CONV[dim](CONV[dim](x, dw, None, 1, pad, 1, cin), pw, None, 1, 0, 1, groups)
    merged = transforms.merge_depthwise_pointwise(dw, pw, cin, groups)
    torch.testing.assert_close(CONV[dim](x, merged, None, 1, pad, 1, groups), expected, **TOL)


@pytest.mark.parametrize("channels,k", [(6, 5), (7, 3), (4, 1)])
def test_frequency_prior_in_2_d_is_the_row_then_column_cosine_basis(channels, k):
    import math

    prior = transforms.frequency_prior(channels, k, dtype=DT)
    half = channels / 2
    for o in range(channels):
        for h in range(k):
            for w in range(k):
                if o < half:
                    value = math.cos(math.pi * (h + 0.5) * (o + 1) / k)
                else:
                    value = math.cos(math.pi * (w + 0.5) * (o + 1 - half) / k)
                assert abs(prior[o, h, w].item() - value) < 1e-12


@pytest.mark.parametrize("channels,kernel", [(6, (3, 3, 3)), (5, (1, 3, 5)), (4, (5,))])
def test_frequency_prior_in_n_d_varies_each_channel_along_one_axis(channels, kernel):
    import math

    dim = len(kernel)
    prior = transforms.frequency_prior(channels, kernel, dim=dim, dtype=DT)
    assert tuple(prior.shape) == (channels, *kernel)
    share = channels / dim
    for o in range(channels):
        axis = min(int(o // share), dim - 1)
        freq = o + 1 - axis * share
        line = torch.tensor([math.cos(math.pi * (i + 0.5) * freq / kernel[axis]) for i in range(kernel[axis])], dtype=DT)
        shape = [1] * dim
        shape[axis] = kernel[axis]
        torch.testing.assert_close(prior[o], line.view(shape).expand(kernel), **TOL)


# --- issue 27: transposed layouts, placed kernels, K-then-1x1 merges, branch windows ----------------------
@settings(max_examples=25, deadline=None)
@given(st.sampled_from([1, 2, 3]), st.integers(1, 3), st.integers(1, 3), st.integers(1, 2), st.integers(1, 2),
       st.integers(0, 2), st.integers(0, 1000))
def test_swap_in_out_makes_a_transposed_kernel_output_channel_major(groups, c_g, o_g, stride, k, padding, seed):
    """A ConvTranspose kernel ``(C, O/g, *K)`` through swap_in_out is ``(O, C/g, *K)`` with row ``o`` holding all
    of output channel ``o``'s taps: scaling its rows scales the transposed conv's output channels, adding a
    per-row bias adds to them; applying it twice gives the kernel back."""
    weight = rand(groups * c_g, o_g, 2 * k - 1, k, seed=seed)  # ConvTranspose2d(C, O) layout
    x = rand(2, groups * c_g, 5, 4, seed=seed + 1)
    scale = rand(groups * o_g, seed=seed + 2)
    major = transforms.swap_in_out(weight, groups)
    assert major.shape == (groups * o_g, c_g, 2 * k - 1, k)
    scaled = transforms.swap_in_out(major * scale.view(-1, 1, 1, 1), groups)
    expected = F.conv_transpose2d(x, weight, None, stride, padding, 0, groups) * scale.view(1, -1, 1, 1)
    torch.testing.assert_close(F.conv_transpose2d(x, scaled, None, stride, padding, 0, groups), expected, **TOL)
    assert torch.equal(transforms.swap_in_out(major, groups), weight)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=2, max_size=2), st.data())
def test_place_kernel_puts_the_small_kernel_at_its_offsets(size, data):
    small = tuple(data.draw(st.integers(1, s)) for s in size)
    offsets = tuple(data.draw(st.integers(0, s - k)) for s, k in zip(size, small))
    kernel = rand(3, 2, *small, seed=1)
    placed = transforms.place_kernel(kernel, size, offsets)
    assert placed.shape == (3, 2, *size)
    window = placed[:, :, offsets[0]:offsets[0] + small[0], offsets[1]:offsets[1] + small[1]]
    rest = placed.clone()
    rest[:, :, offsets[0]:offsets[0] + small[0], offsets[1]:offsets[1] + small[1]] = 0
    assert torch.equal(window, kernel) and not rest.any()
    if all((s - k) % 2 == 0 for s, k in zip(size, small)):  # centred: pad_kernel_to's placement
        centred = tuple((s - k) // 2 for s, k in zip(size, small))
        assert torch.equal(transforms.place_kernel(kernel, size, centred), transforms.pad_kernel_to(kernel, size))
    with pytest.raises(ValueError, match="does not fit"):
        transforms.place_kernel(kernel, size, tuple(s for s in size))


@pytest.mark.parametrize("groups, mid_per_group", [(1, 3), (2, 2), (3, 1)])
@pytest.mark.parametrize("stride, output_padding", [(1, 0), (2, 1)])
def test_fuse_kxk_1x1_equals_a_transposed_conv_a_shift_and_a_1x1_everywhere(groups, mid_per_group, stride,
                                                                            output_padding):
    """The transposed DBB's branch: conv_transpose (K), + b1 on every output pixel, then a 1x1 conv: one
    transposed conv with the merged kernel and bias, borders included."""
    c, d, o = 2 * groups, mid_per_group * groups, 2 * groups
    first = rand(c, d // groups, 3, 3, seed=1)  # ConvTranspose layout (C, D/g, K, K)
    b1, k2, b2 = rand(d, seed=2), rand(o, d // groups, 1, 1, seed=3), rand(o, seed=4)
    x = rand(2, c, 5, 4, seed=5)
    mid = F.conv_transpose2d(x, first, None, stride, 1, output_padding, groups) + b1.view(1, -1, 1, 1)
    expected = F.conv2d(mid, k2, b2, groups=groups)
    kernel, bias = transforms.fuse_kxk_1x1(transforms.swap_in_out(first, groups), b1, k2, b2, groups)
    fused = F.conv_transpose2d(x, transforms.swap_in_out(kernel, groups), bias, stride, 1, output_padding, groups)
    torch.testing.assert_close(fused, expected, **TOL)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 3), st.integers(0, 3), st.integers(1, 2), st.integers(0, 1), st.data())
def test_branch_window_makes_a_placed_sub_kernel_branch_equal_its_placed_kernel(K, stride, padding, dilation,
                                                                               transposed, data):
    """A branch with a 1-D / 1x1 sub-kernel at any offset, run with the padding, output_padding and window the
    block helpers choose, equals the block-sized conv (or transposed conv) with the kernel placed there."""
    from acnet.block import (apply_input_window, apply_output_window, branch_window, conv_window_padding,
                             transposed_window_padding)

    sub = (data.draw(st.sampled_from([1, K])), 1)
    offsets = (data.draw(st.integers(0, K - sub[0])), data.draw(st.integers(0, K - 1)))
    op = data.draw(st.integers(0, max(stride, dilation) - 1)) if transposed else 0
    kernel = rand(3, 2, *sub, seed=7)
    placed = transforms.place_kernel(kernel, (K, K), offsets)
    p, d, s = (padding,) * 2, (dilation,) * 2, (stride,) * 2
    x = rand(2, 3 if transposed else 2, 9, 8, seed=8)
    if transposed:
        weight, placed_t = transforms.swap_in_out(kernel), transforms.swap_in_out(placed)
        try:
            expected = F.conv_transpose2d(x, placed_t, None, s, p, (op, op), 1, d)
        except RuntimeError:
            return  # a geometry the stock transposed conv refuses
        window = branch_window((K, K), sub, offsets, p, d, (op, op))
        pad, extra, rest = transposed_window_padding(window, s, d)
        out = F.conv_transpose2d(x, weight, None, s, pad, extra, 1, d)
        out = out if rest is None else apply_output_window(out, rest)
    else:
        if any(9 + 2 * padding - dilation * (K - 1) < 1 for _ in (0,)) or 8 + 2 * padding - dilation * (K - 1) < 1:
            return
        expected = F.conv2d(x, placed, None, s, p, d)
        pad, rest = conv_window_padding(branch_window((K, K), sub, offsets, p, d))
        out = F.conv2d(x if rest is None else apply_input_window(x, rest), kernel, None, s, pad, d)
    torch.testing.assert_close(out, expected, **TOL)
