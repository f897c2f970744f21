"""Pure fusion transforms of structural re-parameterization.

Every function takes tensors (or a BatchNorm module, read only) and returns new tensors; nothing is
modified in place and everything is differentiable, so an equivalent kernel built from these can be
used for quantization-aware training or pruning.

Notation: a conv kernel ``k`` has shape ``(O, C/g, *K)`` (``g`` groups; ``K`` the kernel size on each of
the 1, 2 or 3 spatial axes, e.g. ``(Kh, Kw)``) and a bias ``b`` has shape ``(O,)``; ``conv(x; k, b)`` is
``F.conv1d`` / ``conv2d`` / ``conv3d``. Every function works in any of these dimensions (the kernel's
own). A BatchNorm in eval mode computes ``bn(y) = gamma * (y - mu) / sqrt(var + eps) + beta`` per channel.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "bn_scale_shift",
    "fuse_bn",
    "fuse_scale_shift",
    "add_branches",
    "fuse_1x1_kxk",
    "concat_depth",
    "avg_pool_kernel",
    "identity_kernel",
    "pad_kernel_to",
    "place_kernel",
    "add_to_centre",
    "swap_in_out",
    "fuse_kxk_1x1",
    "merge_1x1_kxk_kernel",
    "merge_depthwise_pointwise",
    "frequency_prior",
    "sobel_kernel",
    "laplacian_kernel",
    "fuse_1x1_depthwise",
    "dilate_kernel",
]

KernelBias = Tuple[Tensor, Tensor]
Size = Union[int, Sequence[int]]
_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _sizes_per_axis(size: Size, dim: int) -> Tuple[int, ...]:
    """``3`` -> ``(3,) * dim``; a sequence as a tuple (its length must be ``dim``)."""
    if isinstance(size, int):
        return (size,) * dim
    size = tuple(int(v) for v in size)
    if len(size) != dim:
        raise ValueError(f"expected {dim} kernel sizes, got {size}")
    return size


def _per_channel(t: Tensor, ndim: int) -> Tensor:
    """``(O,)`` -> ``(O, 1, ..., 1)`` broadcasting over a kernel of ``ndim`` dimensions."""
    return t.reshape(-1, *([1] * (ndim - 1)))


def bn_scale_shift(bn: nn.BatchNorm2d) -> KernelBias:
    """Per-channel ``(scale, shift)`` with ``bn(y) = scale * y + shift`` in eval mode.

    ``scale = gamma / sqrt(running_var + eps)``, ``shift = beta - running_mean * scale``, using the
    BN's own ``eps``; ``gamma = 1, beta = 0`` when the BN has no affine parameters. Any module with
    ``running_mean`` / ``running_var`` / ``eps`` (and ``weight`` / ``bias`` or None) qualifies: BatchNorm
    of any dimension, ``SyncBatchNorm``, a frozen BN.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            "bn_scale_shift: the BatchNorm has no running statistics (track_running_stats=False); "
            "it cannot be folded into a conv"
        )
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std if bn.weight is not None else 1.0 / std
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def fuse_bn(kernel: Tensor, bn: nn.BatchNorm2d, conv_bias: Optional[Tensor] = None) -> KernelBias:
    """Fold an eval-mode BN that follows ``conv(.; kernel, conv_bias)`` into the conv.

    ``bn(conv(x; k, b)) = conv(x; k * s, s * b + t)`` with ``(s, t) = bn_scale_shift(bn)``
    (``s`` broadcast over each output channel's kernel slice).
    """
    scale, shift = bn_scale_shift(bn)
    return fuse_scale_shift(kernel, scale, shift, conv_bias)


def fuse_scale_shift(kernel: Tensor, scale: Tensor, shift: Tensor, conv_bias: Optional[Tensor] = None) -> KernelBias:
    """A per-channel ``y -> scale * y + shift`` after ``conv(.; kernel, conv_bias)``, as one conv:
    ``(kernel * scale, scale * conv_bias + shift)`` (``scale`` broadcast over each output channel's slice)."""
    scale = scale.to(kernel.dtype)
    fused_kernel = kernel * _per_channel(scale, kernel.dim())
    fused_bias = shift.to(kernel.dtype)
    if conv_bias is not None:
        fused_bias = fused_bias + conv_bias * scale
    return fused_kernel, fused_bias


def add_branches(kernels: Sequence[Tensor], biases: Sequence[Tensor]) -> KernelBias:
    """Parallel branches of the same geometry add up: ``sum_i conv(x; k_i, b_i) = conv(x; sum k_i, sum b_i)``."""
    if len(kernels) == 0 or len(kernels) != len(biases):
        raise ValueError("add_branches: needs as many biases as kernels, and at least one of each")
    return torch.stack(list(kernels)).sum(0), torch.stack(list(biases)).sum(0)


def fuse_1x1_kxk(k1: Tensor, b1: Tensor, k2: Tensor, b2: Tensor, groups: int = 1) -> KernelBias:
    """A 1x1 conv ``(k1, b1)`` followed by a KxK conv ``(k2, b2)``, both with ``groups``, as one KxK conv.

    Within group ``g`` (``k1``: ``(D, C/g, 1, ...)``, ``k2``: ``(O, D/g, *K)``):
    ``k[o, c] = sum_d k2[o, d] * k1[d, c]`` and ``b[o] = b2[o] + sum_{d, taps} k2[o, d, taps] * b1[d]``.
    Exact where the KxK conv sees the 1x1 output of the (zero-)padded input, i.e. where the padding
    of the intermediate map holds ``b1`` (the 1x1 conv's value on a zero input; see
    ``DiverseBranchBlock``'s padded norm): then every tap of the KxK window, inside or on the border,
    reads ``k1 * x + b1`` with ``x`` the zero-padded input, which is the fused conv's input.
    """
    kernel = merge_1x1_kxk_kernel(k1, k2, groups)
    O, d_g = k2.shape[0], k2.shape[1]
    k2g = k2.reshape(groups, O // groups, d_g, -1)
    bias = b2 + torch.einsum("godt,gd->go", k2g, b1.reshape(groups, d_g)).reshape(O)
    return kernel, bias


#: Size (multiply-adds) from which :func:`merge_1x1_kxk_kernel` computes an ungrouped product as a conv.
CONV_MERGE_MIN_MACS = 1 << 24


def merge_by_conv(k1: Tensor, k2: Tensor, groups: int) -> bool:
    """Whether :func:`merge_1x1_kxk_kernel` runs the product as a 1x1 conv (ungrouped and large)."""
    return groups == 1 and k2.numel() * k1.shape[1] >= CONV_MERGE_MIN_MACS


def merge_1x1_kxk_kernel(k1: Tensor, k2: Tensor, groups: int = 1) -> Tensor:
    """The kernel of a bias-free 1x1 conv ``k1`` followed by a KxK conv ``k2`` (both with ``groups``).

    Within group ``g``: ``k[o, c] = sum_d k2[o, d] * k1[d, c]`` (``k1``: ``(D, C/g, 1, ...)``,
    ``k2``: ``(O, D/g, *K)``). Exact with zero padding: the 1x1 conv maps the zero border to zero.
    Computed as one batched matrix product over the groups; ungrouped and from
    :data:`CONV_MERGE_MIN_MACS` multiply-adds, as a 1x1 conv of ``k2`` (a batch of ``O`` maps of ``D``
    channels) with the weight ``k1^T``, which oneDNN runs (and differentiates) 20-35% faster than a
    matrix product on CPU -- below about 128 channels a conv call costs more than the product.
    """
    D, cin_g = k1.shape[0], k1.shape[1]
    O, d_g = k2.shape[0], k2.shape[1]
    if (k1.dim() != k2.dim() or k1.dim() not in (3, 4, 5) or any(v != 1 for v in k1.shape[2:]) or D % groups
            or O % groups or D // groups != d_g):
        raise ValueError(
            f"fuse_1x1_kxk: incompatible shapes k1={tuple(k1.shape)}, k2={tuple(k2.shape)} for groups={groups}"
        )
    if merge_by_conv(k1, k2, groups):
        return _CONV_FUNCTIONS[k2.dim() - 2](k2, k1.transpose(0, 1))
    spatial = tuple(k2.shape[2:])
    o_g, taps = O // groups, math.prod(spatial)
    k2_t = k2.reshape(groups, o_g, d_g, taps).transpose(1, 2).reshape(groups, d_g, o_g * taps)
    merged = torch.bmm(k1.reshape(groups, d_g, cin_g).transpose(1, 2), k2_t)
    return merged.view(groups, cin_g, o_g, taps).transpose(1, 2).reshape(O, cin_g, *spatial)


def merge_depthwise_pointwise(depthwise: Tensor, pointwise: Tensor, in_channels: int, groups: int = 1) -> Tensor:
    """A depthwise KxK conv (``m`` output channels per input channel) then a 1x1 conv with ``groups``, as one kernel.

    ``depthwise``: ``(C*m, 1, *K)``, its channel ``c*m + t`` reads input channel ``c``;
    ``pointwise``: ``(O, C*m/g, 1, ...)``. For output ``o`` in group ``j`` and input channel
    ``c = j*C/g + i``: ``k[o, i] = sum_t pointwise[o, i*m + t] * depthwise[c*m + t]``, a
    ``(O, C/g, *K)`` kernel (one batched matrix product over the input channels). Exact with zero
    padding (the depthwise conv keeps a zero border zero).
    """
    cm, spatial = depthwise.shape[0], tuple(depthwise.shape[2:])
    taps = math.prod(spatial)
    O = pointwise.shape[0]
    if (depthwise.shape[1] != 1 or cm % in_channels or in_channels % groups or O % groups
            or pointwise.shape[1] * groups != cm):
        raise ValueError(f"merge_depthwise_pointwise: incompatible shapes depthwise={tuple(depthwise.shape)}, "
                         f"pointwise={tuple(pointwise.shape)} for in_channels={in_channels}, groups={groups}")
    m, c_g, o_g = cm // in_channels, in_channels // groups, O // groups
    pw = pointwise.reshape(groups, o_g, c_g, m).transpose(1, 2).reshape(groups * c_g, o_g, m)
    merged = torch.bmm(pw, depthwise.reshape(groups * c_g, m, taps))
    return merged.view(groups, c_g, o_g, taps).transpose(1, 2).reshape(O, c_g, *spatial)


def frequency_prior(channels: int, kernel_size: Size, *, dim: int = 2, dtype=None, device=None) -> Tensor:
    """OREPA's fixed "frequency prior" patterns, one ``K`` map (``dim`` axes) per output channel.

    Cosine (DCT-II) bases, the channels split evenly over the axes: with ``n = channels / dim``, output
    ``o`` varies along axis ``a = min(floor(o / n), dim - 1)`` only, with frequency ``f = o + 1 - a * n``:
    ``prior[o, ..., x_a, ...] = cos(pi * (x_a + 1/2) * f / K_a)``. In 2-d: ``o < channels / 2`` varies along
    rows with ``f = o + 1``, the others along columns with ``f = o + 1 - channels / 2``; for ``K = 3``
    exactly the original's values (its loops cover only 3x3).
    """
    ks = _sizes_per_axis(kernel_size, dim)
    share = channels / dim
    o = torch.arange(channels, dtype=torch.float64)
    axis = torch.clamp(torch.floor(o / share), max=dim - 1)
    freq = o + 1 - axis * share
    prior = torch.ones(channels, *ks, dtype=torch.float64)
    for a, k in enumerate(ks):
        pos = torch.arange(k, dtype=torch.float64).add(0.5)
        wave = torch.cos(math.pi * pos.view(1, -1) * freq.view(-1, 1) / k)  # (O, K_a)
        wave = torch.where((axis == a).view(-1, 1), wave, torch.ones_like(wave))
        shape = [channels] + [1] * dim
        shape[1 + a] = k
        prior = prior * wave.view(shape)
    return prior.to(dtype=dtype or torch.get_default_dtype(), device=device)


def concat_depth(kernels: Sequence[Tensor], biases: Sequence[Tensor]) -> KernelBias:
    """Convs on the same input whose outputs are concatenated along channels: concatenate kernels and biases."""
    return torch.cat(list(kernels), dim=0), torch.cat(list(biases), dim=0)


def identity_kernel(channels: int, groups: int = 1, kernel_size: Size = 1, *, out_channels: Optional[int] = None,
                    dim: int = 2, dtype=None, device=None) -> Tensor:
    """The kernel ``(O, C/g, *K)`` of the identity map: 1 at the centre tap of ``k[o, o mod (C/g)]``.

    ``out_channels`` (default ``C``): more outputs than inputs repeat the identity (OREPA's and DBB's
    identity-based 1x1 with ``2C`` internal channels). ``kernel_size``: odd, one int or ``dim`` ints.
    """
    if channels % groups:
        raise ValueError(f"identity_kernel: channels={channels} is not divisible by groups={groups}")
    ks = _sizes_per_axis(kernel_size, dim)
    per_group = channels // groups
    rows = channels if out_channels is None else out_channels
    kernel = torch.zeros(rows, per_group, *ks, dtype=dtype, device=device)
    idx = torch.arange(rows, device=device)
    kernel[(idx, idx % per_group) + tuple(k // 2 for k in ks)] = 1
    return kernel


def avg_pool_kernel(channels: int, kernel_size: Size, groups: int = 1, *, dim: int = 2, dtype=None,
                    device=None) -> Tensor:
    """K average pooling (zero padding, padded pixels counted) as a grouped conv kernel.

    ``k[o, o mod (C/g), ...] = 1 / prod(K)`` and 0 elsewhere, so ``conv(x; k) = avg_pool(x)`` with the
    same stride and padding (``count_include_pad=True``). ``kernel_size``: one int or ``dim`` ints.
    """
    if channels % groups:
        raise ValueError(f"avg_pool_kernel: channels={channels} is not divisible by groups={groups}")
    ks = _sizes_per_axis(kernel_size, dim)
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, *ks, dtype=dtype, device=device)
    idx = torch.arange(channels, device=device)
    kernel[idx, idx % per_group] = 1.0 / math.prod(ks)
    return kernel


def pad_kernel_to(kernel: Tensor, size: Size) -> Tensor:
    """Zero-pad a ``k`` kernel symmetrically to ``K`` on every spatial axis (centres aligned; odd differences).

    ``conv(x; pad_kernel_to(k, K), padding=p)`` equals ``conv(x; k, padding=p - d*(K - k)/2)`` per axis
    (dilation ``d``): the small kernel becomes the centre of the large one. ``size``: one int (every
    axis) or one per spatial axis.
    """
    dim = kernel.dim() - 2
    target = _sizes_per_axis(size, dim)
    small = tuple(kernel.shape[2:])
    diffs = [t - k for t, k in zip(target, small)]
    if any(d < 0 or d % 2 for d in diffs):
        raise ValueError(
            f"pad_kernel_to: cannot centre a {'x'.join(map(str, small))} kernel in {'x'.join(map(str, target))} "
            "(needs a larger size with an even difference)"
        )
    pads = []
    for d in reversed(diffs):
        pads += [d // 2, d // 2]
    return F.pad(kernel, pads)


def add_to_centre(square: Tensor, small: Tensor) -> Tensor:
    """Add a smaller (e.g. asymmetric 1xK or Kx1) kernel onto the centre lines of a larger kernel.

    ``square + pad_kernel_to(small, K)``: a 1xK kernel lands on the centre row, a Kx1 on the centre
    column, a Kx1x1 on the centre line along the first axis (ACNet's kernel skeleton).
    """
    return square + pad_kernel_to(small, tuple(square.shape[2:]))


def centre_offsets(size: Sequence[int]) -> Tuple[int, ...]:
    """Index of the centre tap on each axis of a kernel of ``size``: ``(K - 1) // 2`` (``K // 2`` for odd
    ``K``; for even ``K`` the tap PyTorch's ``padding="same"`` puts over the output pixel)."""
    return tuple((k - 1) // 2 for k in size)


def place_kernel(kernel: Tensor, size: Size, offsets: Sequence[int]) -> Tensor:
    """Zero-pad a ``k`` kernel to ``K`` with its first tap at ``offsets`` on each spatial axis.

    ``conv(x; place_kernel(k, K, o), padding=p)`` reads, on each axis, what ``conv(x; k)`` reads on the
    input padded by ``p - d*o`` before and ``p - d*(K - k - o)`` after (dilation ``d``; a negative
    amount crops): see :func:`acnet.block.branch_window`.
    """
    dim = kernel.dim() - 2
    target = _sizes_per_axis(size, dim)
    small = tuple(kernel.shape[2:])
    if len(offsets) != dim or any(o < 0 or o + k > t for o, k, t in zip(offsets, small, target)):
        raise ValueError(f"place_kernel: a {'x'.join(map(str, small))} kernel at {tuple(offsets)} does not fit in "
                         f"{'x'.join(map(str, target))}")
    pads = []
    for o, k, t in reversed(list(zip(offsets, small, target))):
        pads += [o, t - k - o]
    return F.pad(kernel, pads)


def swap_in_out(kernel: Tensor, groups: int = 1) -> Tensor:
    """Swap the two channel axes of a kernel within each group: ``(A, B, *K)`` -> ``(g*B, A/g, *K)`` (an involution).

    Within group ``j``: ``out[j*B + b, a] = kernel[j*A/g + a, b]`` (no spatial flip). A transposed conv's
    kernel ``(C, O/g, *K)`` becomes output-channel major, ``(O, C/g, *K)`` (row ``o``: every tap that
    writes output channel ``o``), where the per-output-channel algebra (:func:`fuse_scale_shift`,
    :func:`add_branches`, :func:`fuse_kxk_1x1`) applies; swapping again gives ConvTranspose's layout.
    (This is a relabelling, not the adjoint: ``conv_transpose(y; W)`` with a conv's own ``W`` is that.)
    """
    rows, cols = kernel.shape[:2]
    if rows % groups:
        raise ValueError(f"swap_in_out: {rows} rows are not divisible by groups={groups}")
    spatial = tuple(kernel.shape[2:])
    grouped = kernel.reshape(groups, rows // groups, cols, *spatial).transpose(1, 2)
    return grouped.reshape(groups * cols, rows // groups, *spatial)


def fuse_kxk_1x1(k1: Tensor, b1: Tensor, k2: Tensor, b2: Tensor, groups: int = 1) -> KernelBias:
    """A K kernel ``(k1, b1)`` (``(D, C/g, *K)``, output-channel major) followed by a 1x1 conv ``(k2, b2)``
    (``(O, D/g, 1, ...)``), both with ``groups``, as one kernel ``(O, C/g, *K)``.

    ``k[o, c] = sum_d k2[o, d] * k1[d, c]``, ``b[o] = b2[o] + sum_d k2[o, d] * b1[d]`` (within a group):
    exact everywhere, borders included, since the 1x1 conv is pointwise (the transposed DBB's
    KxK-then-1x1 and average-then-1x1 branches, whose middle norm acts on the transposed conv's output).
    """
    D, c_g = k1.shape[:2]
    O, d_g = k2.shape[:2]
    if any(v != 1 for v in k2.shape[2:]) or D % groups or O % groups or D // groups != d_g:
        raise ValueError(f"fuse_kxk_1x1: incompatible shapes k1={tuple(k1.shape)}, k2={tuple(k2.shape)} "
                         f"for groups={groups}")
    spatial = tuple(k1.shape[2:])
    k2g = k2.reshape(groups, O // groups, d_g)
    kernel = torch.bmm(k2g, k1.reshape(groups, d_g, -1)).reshape(O, c_g, *spatial)
    bias = b2 + torch.bmm(k2g, b1.reshape(groups, d_g, 1)).reshape(O)
    return kernel, bias


# --------------------------------------------------------------------------------------------
# ECB (ECBSR) edge masks and dilated re-parameterization (RepLKNet / UniRepLKNet)
# --------------------------------------------------------------------------------------------
def sobel_kernel(dim: int, axis: int, *, dtype=None, device=None) -> Tensor:
    """The 3-tap Sobel mask of a ``dim``-d map differentiating along ``axis``: shape ``(3,) * dim``.

    The outer product of the derivative ``[1, 0, -1]`` on ``axis`` and the smoothing ``[1, 2, 1]`` on every
    other axis: in 2-d, ``axis=1`` (along the width) is ECBSR's Sobel-x mask (columns ``[1, 2, 1]`` and
    ``-[1, 2, 1]``), ``axis=0`` its Sobel-y mask; in 1-d ``[1, 0, -1]``. Its taps sum to zero.
    """
    if not 0 <= axis < dim:
        raise ValueError(f"sobel_kernel: axis must be in [0, {dim}), got {axis}")
    kernel = torch.ones((1,) * dim, dtype=torch.float64)
    for a in range(dim):
        line = torch.tensor([1.0, 0.0, -1.0] if a == axis else [1.0, 2.0, 1.0], dtype=torch.float64)
        shape = [1] * dim
        shape[a] = 3
        kernel = kernel * line.view(shape)
    return kernel.to(dtype=dtype or torch.get_default_dtype(), device=device)


def laplacian_kernel(dim: int, *, dtype=None, device=None) -> Tensor:
    """The 3-tap Laplacian mask of a ``dim``-d map, shape ``(3,) * dim``: ``-2 * dim`` at the centre and 1 on
    each of the ``2 * dim`` direct neighbours (2-d: ECBSR's ``[[0, 1, 0], [1, -4, 1], [0, 1, 0]]``). Sums to zero."""
    kernel = torch.zeros((3,) * dim, dtype=torch.float64)
    centre = (1,) * dim
    kernel[centre] = -2.0 * dim
    for a in range(dim):
        for side in (0, 2):
            index = list(centre)
            index[a] = side
            kernel[tuple(index)] = 1.0
    return kernel.to(dtype=dtype or torch.get_default_dtype(), device=device)


def fuse_1x1_depthwise(k1: Tensor, b1: Tensor, taps: Tensor, bias: Tensor) -> KernelBias:
    """A 1x1 conv ``(k1, b1)`` (``(O, C/g, 1, ...)``, any groups) followed by a depthwise conv ``(taps, bias)``
    (``(O, 1, *K)``: one kernel per output channel), as one conv ``(O, C/g, *K)``.

    ``k[o, c] = taps[o] * k1[o, c]`` and ``b[o] = bias[o] + b1[o] * sum(taps[o])``: exact where the depthwise
    conv reads the 1x1 output of the zero-padded input, i.e. where the intermediate map is padded with
    ``b1`` (ECBSR's "explicitly padding with bias"), as for :func:`fuse_1x1_kxk`. ECB's Sobel / Laplacian
    branches: ``taps = scale * mask``.
    """
    if taps.shape[1] != 1 or taps.shape[0] != k1.shape[0] or any(v != 1 for v in k1.shape[2:]) \
            or k1.dim() != taps.dim():
        raise ValueError(f"fuse_1x1_depthwise: incompatible shapes k1={tuple(k1.shape)}, taps={tuple(taps.shape)}")
    kernel = taps * k1.reshape(k1.shape[0], k1.shape[1], *([1] * (taps.dim() - 2)))
    return kernel, bias + b1 * taps.flatten(1).sum(1)


def dilate_kernel(kernel: Tensor, rate: Union[int, Sequence[int]]) -> Tensor:
    """A kernel ``k`` used with dilation ``r`` as the dense kernel of size ``r * (k - 1) + 1`` used without.

    ``out[..., r*i] = kernel[..., i]`` on every spatial axis and zero between the taps, so
    ``conv(x; k, dilation=r*d, padding=p) = conv(x; dilate_kernel(k, r), dilation=d, padding=p)`` (UniRepLKNet's
    ``convert_dilated_to_nondilated``, for any dimension, groups and per-axis rates).
    """
    dim = kernel.dim() - 2
    rates = _sizes_per_axis(rate, dim)
    if any(r < 1 for r in rates):
        raise ValueError(f"dilate_kernel: rates must be >= 1, got {rates}")
    small = tuple(kernel.shape[2:])
    out = kernel.new_zeros(*kernel.shape[:2], *(r * (k - 1) + 1 for r, k in zip(rates, small)))
    out[(slice(None), slice(None)) + tuple(slice(None, None, r) for r in rates)] = kernel
    return out
