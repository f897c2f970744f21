"""The Diverse Branch Block (DBB, CVPR 2021): four branches fused into one KxK conv.

Branches (each ends in a BN; their sum, then ``nonlinear``, is the output):

* ``dbb_origin``: KxK conv-BN.
* ``dbb_1x1``: 1x1 conv-BN with the block's stride (the centre tap of the KxK window).
* ``dbb_avg``: 1x1 conv -> BN padded with its own zero-input value -> KxK average pool -> BN
  (depthwise blocks: average pool of the zero-padded input -> BN).
* ``dbb_1x1_kxk``: 1x1 conv (identity-initialised ``idconv1`` when it keeps the channel count) ->
  BN padded with its own zero-input value -> KxK conv -> BN.

The padded BNs make the 1x1-then-KxK merges exact at the borders: the intermediate map's padding
holds ``bn(0) = beta - mu * gamma / sqrt(var + eps)`` (from the running statistics, as in the
original), which is what the fused 1x1 conv produces on the zero-padded input.
Geometry: odd ``kernel_size``, ``padding = dilation * (kernel_size // 2)``, any stride, any groups
up to depthwise, any dilation (the KxK parts of every branch are dilated alike).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import transforms
from .base import (
    IntOrPair, ReparamBlock, _batch_stats, _bns_fusable, branch_bn_sum, branch_input, bn_train_backward, layout_of,
    run_conv,
)

__all__ = ["DiverseBranchBlock", "IdentityBasedConv1x1", "BNAndPadLayer", "AvgPoolKxK"]


class IdentityBasedConv1x1(nn.Conv2d):
    """A 1x1 conv whose effective kernel is ``identity + weight`` (``weight`` starts at 0).

    Same parameter name (``weight``) as the original; the identity is a non-persistent buffer.
    """

    def __init__(self, channels: int, groups: int = 1) -> None:
        super().__init__(channels, channels, kernel_size=1, stride=1, padding=0, groups=groups, bias=False)
        self.register_buffer("id_tensor", transforms.identity_kernel(channels, groups), persistent=False)
        nn.init.zeros_(self.weight)

    def get_actual_kernel(self) -> Tensor:
        """``identity + weight``."""
        return self.weight + self.id_tensor.to(dtype=self.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.get_actual_kernel(), None, 1, 0, 1, self.groups)


class _BNTrainPad(torch.autograd.Function):
    """Training-mode BN written straight into the interior of a buffer whose border holds ``pad_value``.

    ``out[:, :, p:-p, p:-p] = (y - mu) * w * r + b`` (batch statistics), border = ``pad_value`` (a constant
    for autograd, as in the original); backward is the BN backward of the interior gradient.
    """

    @staticmethod
    def forward(ctx, y: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor, pad_value: Tensor,
                pad: int) -> Tensor:
        n, c, h, w = y.shape
        out = torch.empty(n, c, h + 2 * pad, w + 2 * pad, dtype=y.dtype, device=y.device, memory_format=layout_of(y))
        value = pad_value.view(1, -1, 1, 1)
        out[:, :, :pad, :] = value
        out[:, :, -pad:, :] = value
        out[:, :, pad:-pad, :pad] = value
        out[:, :, pad:-pad, -pad:] = value
        scale = weight * invstd
        shift = bias - mean * scale
        torch.addcmul(shift.view(1, -1, 1, 1), y, scale.view(1, -1, 1, 1), out=out[:, :, pad:-pad, pad:-pad])
        ctx.save_for_backward(y, weight, mean, invstd)
        ctx.pad = pad
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        y, weight, mean, invstd = ctx.saved_tensors
        p = ctx.pad
        need_y, need_w, need_b = ctx.needs_input_grad[:3]
        grad_y, grad_w, grad_b = bn_train_backward(grad[:, :, p:-p, p:-p], y, weight, mean, invstd,
                                                   [need_y, need_w, need_b])
        return grad_y, grad_w, grad_b, None, None, None, None


class BNAndPadLayer(nn.Module):
    """BatchNorm, then pad ``pad_pixels`` on every side with the BN's output for a zero input.

    The pad value per channel is ``beta - running_mean * gamma / sqrt(running_var + eps)`` (detached,
    as in the original). The BN is the child ``bn`` (state-dict keys ``<name>.bn.*``).
    """

    def __init__(self, pad_pixels: int, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=affine)
        self.pad_pixels = pad_pixels

    def pad_values(self) -> Tensor:
        """Per-channel value of ``bn(0)`` in eval mode (detached)."""
        _, shift = transforms.bn_scale_shift(self.bn)
        return shift.detach()

    def forward(self, x: Tensor) -> Tensor:
        p = self.pad_pixels
        if p > 0 and _bns_fusable([x], [self.bn]) and self.bn.affine:
            with torch.no_grad():
                mean, var = _batch_stats(x, self.bn)
                pad_value = self.pad_values().to(x.dtype)  # running stats after this batch's update, as the original
                invstd = (var + self.bn.eps).rsqrt().to(x.dtype)
            return _BNTrainPad.apply(x, self.bn.weight, self.bn.bias, mean.to(x.dtype), invstd, pad_value, p)
        out = self.bn(x)
        if p > 0:
            value = self.pad_values().to(out.dtype).view(1, -1, 1, 1)
            out = F.pad(out, [p, p, p, p])
            out[:, :, :p, :] = value
            out[:, :, -p:, :] = value
            out[:, :, p:-p, :p] = value
            out[:, :, p:-p, -p:] = value
        return out

    # The original exposes the BN's tensors on the layer itself.
    @property
    def weight(self) -> Optional[Tensor]:
        return self.bn.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.bn.bias

    @property
    def running_mean(self) -> Optional[Tensor]:
        return self.bn.running_mean

    @property
    def running_var(self) -> Optional[Tensor]:
        return self.bn.running_var

    @property
    def eps(self) -> float:
        return self.bn.eps


class AvgPoolKxK(nn.Module):
    """KxK average pooling (padded pixels counted) that also supports dilation; no parameters.

    Computed as a depthwise conv with the constant kernel ``1/K^2`` (``transforms.avg_pool_kernel``):
    the same values as ``F.avg_pool2d(count_include_pad=True)`` and several times faster forward and
    backward on CPU.
    """

    def __init__(self, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation

    def forward(self, x: Tensor) -> Tensor:
        channels, k = x.shape[1], self.kernel_size
        kernel = x.new_full((channels, 1, k, k), 1.0 / (k * k))  # avg_pool_kernel(channels, k, groups=channels)
        return F.conv2d(x, kernel, None, self.stride, self.padding, self.dilation, channels)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, dilation={self.dilation}"


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int, dilation: int,
             groups: int, bn_eps: float, bn_momentum: float) -> nn.Sequential:
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                     dilation=dilation, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum))
    return seq


class DiverseBranchBlock(ReparamBlock):
    """Diverse Branch Block, state-dict compatible with the original; deploy form ``dbb_reparam``.

    ``internal_channels_1x1_3x3``: width of the 1x1-KxK branch (default: ``in_channels``, or
    ``2 * in_channels`` for depthwise blocks); when it equals ``in_channels`` the first conv is the
    identity-based ``idconv1``. ``nonlinear`` (default identity) is applied after the branch sum and
    kept by the deploy form. ``single_init``: only the KxK branch starts with BN weight 1.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: Optional[IntOrPair] = None,
        dilation: IntOrPair = 1,
        groups: int = 1,
        internal_channels_1x1_3x3: Optional[int] = None,
        deploy: bool = False,
        nonlinear: Optional[nn.Module] = None,
        single_init: bool = False,
        *,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        k_int = kernel_size if isinstance(kernel_size, int) else kernel_size[0]
        d_int = dilation if isinstance(dilation, int) else dilation[0]
        if padding is None and isinstance(k_int, int) and isinstance(d_int, int):
            padding = d_int * (k_int // 2)
        self._init_geometry(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, "zeros",
            min_kernel=1, odd_kernel=True,
        )
        k, s, p, d = self.kernel_size, self.stride, self.padding, self.dilation
        if p != d * (k // 2):
            raise ValueError(
                f"DiverseBranchBlock: padding must be dilation * (kernel_size // 2) = {d * (k // 2)} so that "
                f"the 1x1 and average branches align with the KxK window, got {p}"
            )
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
        if deploy:
            self.dbb_reparam = self._empty_deploy_conv(torch.get_default_dtype(), torch.device("cpu"))
            return
        # Depthwise (one input channel per output): no 1x1 branch, the avg branch pools the input itself.
        pointwise = groups < out_channels or in_channels != out_channels
        if internal_channels_1x1_3x3 is None:
            internal_channels_1x1_3x3 = in_channels if pointwise else 2 * in_channels
        internal = internal_channels_1x1_3x3
        if isinstance(internal, bool) or not isinstance(internal, int) or internal < 1 or internal % groups:
            raise ValueError(
                f"DiverseBranchBlock: internal_channels_1x1_3x3 must be a positive multiple of groups ({groups}), "
                f"got {internal!r}"
            )
        bn_kw = dict(eps=bn_eps, momentum=bn_momentum)

        self.dbb_origin = _conv_bn(in_channels, out_channels, k, s, p, d, groups, bn_eps, bn_momentum)

        self.dbb_avg = nn.Sequential()
        if pointwise:
            self.dbb_avg.add_module("conv", nn.Conv2d(in_channels, out_channels, 1, groups=groups, bias=False))
            self.dbb_avg.add_module("bn", BNAndPadLayer(p, out_channels, **bn_kw))
            self.dbb_avg.add_module("avg", AvgPoolKxK(k, s, 0, d))
            self.dbb_1x1 = _conv_bn(in_channels, out_channels, 1, s, 0, 1, groups, bn_eps, bn_momentum)
        else:
            self.dbb_avg.add_module("avg", AvgPoolKxK(k, s, p, d))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(out_channels, **bn_kw))

        self.dbb_1x1_kxk = nn.Sequential()
        if internal == in_channels:
            self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConv1x1(in_channels, groups))
        else:
            self.dbb_1x1_kxk.add_module("conv1", nn.Conv2d(in_channels, internal, 1, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn1", BNAndPadLayer(p, internal, **bn_kw))
        self.dbb_1x1_kxk.add_module("conv2", nn.Conv2d(internal, out_channels, k, stride=s, padding=0, dilation=d,
                                                       groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(out_channels, **bn_kw))

        if single_init:
            self.single_init()

    # --- state ------------------------------------------------------------------------------
    deploy_conv_name = "dbb_reparam"

    def _branch_output_bns(self) -> Tuple[nn.BatchNorm2d, ...]:
        if self.deployed:
            raise RuntimeError("DiverseBranchBlock: the block is deployed; its branches and BNs are gone")
        bns = [self.dbb_origin.bn, self.dbb_avg.avgbn, self.dbb_1x1_kxk.bn2]
        if hasattr(self, "dbb_1x1"):
            bns.insert(1, self.dbb_1x1.bn)
        return tuple(bns)

    def init_gamma(self, gamma_value: float) -> None:
        """Set the weight of every branch's final BN to ``gamma_value``."""
        with torch.no_grad():
            for bn in self._branch_output_bns():
                bn.weight.fill_(gamma_value)

    def single_init(self) -> None:
        """Final BN weights 0 except the KxK branch's (1): the block starts as a plain conv-BN."""
        self.init_gamma(0.0)
        with torch.no_grad():
            self.dbb_origin.bn.weight.fill_(1.0)

    # --- forward ----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.deployed:
            return self.nonlinear(run_conv(self.dbb_reparam, x))
        x = branch_input(x, self.branches_nhwc())
        # branch outputs before their final BN, in the order of _branch_output_bns(); run_conv for the
        # convs that may be 1x1 with a stride (the others have stride 1)
        outputs = [run_conv(self.dbb_origin.conv, x)]
        if hasattr(self, "dbb_1x1"):
            outputs.append(run_conv(self.dbb_1x1.conv, x))
        avg = self.dbb_avg
        outputs.append(avg.avg(avg.bn(avg.conv(x))) if hasattr(avg, "conv") else avg.avg(x))
        kxk = self.dbb_1x1_kxk
        first = kxk.idconv1(x) if hasattr(kxk, "idconv1") else kxk.conv1(x)
        outputs.append(run_conv(kxk.conv2, kxk.bn1(first)))
        # the branch BNs and the sum in one pass (batch statistics in training, else BN by BN)
        return self.nonlinear(branch_bn_sum(outputs, self._branch_output_bns()))

    # --- fusion -----------------------------------------------------------------------------
    def get_equivalent_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        """Sum of the four branches' kernels/biases, each fused with its BNs (see module docstring)."""
        if self.deployed:
            return self.dbb_reparam.weight, self.dbb_reparam.bias
        k, g = self.kernel_size, self.groups
        kernels, biases = [], []

        k_origin, b_origin = transforms.fuse_bn(self.dbb_origin.conv.weight, self.dbb_origin.bn)
        kernels.append(k_origin)
        biases.append(b_origin)

        if hasattr(self, "dbb_1x1"):
            k_1x1, b_1x1 = transforms.fuse_bn(self.dbb_1x1.conv.weight, self.dbb_1x1.bn)
            kernels.append(transforms.pad_kernel_to(k_1x1, k))
            biases.append(b_1x1)

        branch = self.dbb_1x1_kxk
        first = branch.idconv1.get_actual_kernel() if hasattr(branch, "idconv1") else branch.conv1.weight
        k_first, b_first = transforms.fuse_bn(first, branch.bn1.bn)
        k_second, b_second = transforms.fuse_bn(branch.conv2.weight, branch.bn2)
        k_merged, b_merged = transforms.fuse_1x1_kxk(k_first, b_first, k_second, b_second, groups=g)
        kernels.append(k_merged)
        biases.append(b_merged)

        avg = self.dbb_avg
        ref = avg.avgbn.running_mean
        k_avg = transforms.avg_pool_kernel(self.out_channels, k, g, dtype=k_origin.dtype, device=ref.device)
        k_avg, b_avg = transforms.fuse_bn(k_avg, avg.avgbn)
        if hasattr(avg, "conv"):
            k_first, b_first = transforms.fuse_bn(avg.conv.weight, avg.bn.bn)
            k_avg, b_avg = transforms.fuse_1x1_kxk(k_first, b_first, k_avg, b_avg, groups=g)
        kernels.append(k_avg)
        biases.append(b_avg)
        return transforms.add_branches(kernels, biases)

    def switch_to_deploy(self) -> None:
        """Fuse into ``dbb_reparam`` and drop the branches (idempotent); ``nonlinear`` stays."""
        if self.deployed:
            return
        fused = self.make_deploy_conv()
        for name in ("dbb_origin", "dbb_1x1", "dbb_avg", "dbb_1x1_kxk"):
            if hasattr(self, name):
                delattr(self, name)
        self.dbb_reparam = fused
