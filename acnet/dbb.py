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
Geometry: any ``kernel_size`` (per axis; even sizes and non-cubic kernels such as (1,3,3) too), any
padding (0 included: the 1x1 branch reads the centre tap ``(K - 1) // 2`` of the block's window,
cropping or padding its input as :func:`acnet.block.branch_window` says; the average and 1x1-KxK branches
pad their intermediate map by the block's padding), any stride, any groups up to depthwise, any dilation
(the KxK parts of every branch are dilated alike); ``dim`` 1, 2 or 3 (every branch in N-d).

Transposed form (``transposed=True``, ``output_padding``): each branch is the adjoint of its conv-form
branch -- ``dbb_origin``: KxKᵀ-BN; ``dbb_1x1``: 1x1ᵀ-BN (its output cropped / zero-padded to the centre
tap's place in the block's output window); ``dbb_avg``: averageᵀ -> ``bn`` -> 1x1ᵀ ``conv`` -> ``avgbn``;
``dbb_1x1_kxk``: KxKᵀ ``conv2`` -> ``bn1`` -> 1x1ᵀ ``conv1`` / ``idconv1`` (identity-based when it keeps
the output channel count) -> ``bn2``. Every middle norm acts on a transposed conv's output and only a
pointwise conv follows it, so each branch is ``conv_transpose(x; K, b)`` exactly, borders included
(:func:`acnet.transforms.fuse_kxk_1x1`); the conv form's order (a shift, then a strided transposed conv)
would not be: a constant map through a strided transposed conv is not constant. ``bias=False`` (with
``norm="none"``): no norm has a shift, the padded maps pad with zero, the equivalent bias is zero.

Norm kinds (``norm``): ``"batch"`` as above. ``"frozen"``: ``dbb_origin`` ends in a frozen BN (the
pretrained pair); every other norm -- the final norm of each new branch and the padded intermediate
ones -- is a learnable per-channel scale and shift (:class:`~acnet.norms.ChannelAffine`), no batch
statistics anywhere. ``"none"`` (BN-free): every norm is such a scale and shift.

Exactness at the borders without statistics (``"frozen"`` / ``"none"``). The 1x1 conv ``k1`` followed by
the affine ``(w, b)`` computes ``u = w * (k1 * x) + b``: on a zero input exactly ``b``. The padded layer
pads ``u`` with ``b`` (the preceding bias, as ECBSR does), so every tap of the following KxK window --
inside the map or on its border -- reads ``w * (k1 * x_0) + b`` where ``x_0`` is the zero-padded input.
That is the 1x1 conv (kernel ``w * k1``, bias ``b``) applied to ``x_0``, so the branch equals
``conv(x_0; merge(w * k1, k2), b2 + sum_taps k2 * b)`` (:func:`acnet.transforms.fuse_1x1_kxk`), the fused
conv on the zero-padded input, at every output pixel; the average branch is the same with ``k2`` the
constant ``1 / prod(K)`` kernel. (With a BN instead of the affine the padding holds ``bn(0)`` from the
running statistics: exact in eval mode, where the BN is that affine.)
"""
from __future__ import annotations

import math

from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import norms, transforms
from .block import (IntOrPair, ReparamBlock, stored_dim_option, stored_norm_option, apply_input_window, apply_output_window,
                    branch_window, conv_window_padding, transposed_window_padding)
from .fastpath import (batch_stats, bns_fusable, branch_bn_sum, branch_input, bn_train_backward,
                       conv_transpose_nd, layout_of, match_layout, run_conv)

__all__ = ["DiverseBranchBlock", "IdentityBasedConv1x1", "IdentityBasedConv1x1_1d", "IdentityBasedConv1x1_3d",
           "identity_based_conv1x1", "BNAndPadLayer", "AvgPoolKxK"]

Sizes = Union[int, Sequence[int]]


class _IdentityBased:
    """A 1x1 conv whose effective kernel is ``identity + weight`` (``weight`` starts at 0).

    Same parameter name (``weight``) as the original; the identity is a non-persistent buffer.
    """

    def _init_identity(self, channels: int, groups: int, dim: int) -> None:
        self.register_buffer("id_tensor", transforms.identity_kernel(channels, groups, dim=dim), persistent=False)
        nn.init.zeros_(self.weight)

    def get_actual_kernel(self) -> Tensor:
        """``identity + weight``."""
        return self.weight + self.id_tensor.to(dtype=self.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.get_actual_kernel(), None)


class IdentityBasedConv1x1(_IdentityBased, nn.Conv2d):
    """The 2-d identity-based 1x1 conv (:class:`_IdentityBased`), the original's ``IdentityBasedConv1x1``."""

    def __init__(self, channels: int, groups: int = 1) -> None:
        nn.Conv2d.__init__(self, channels, channels, kernel_size=1, stride=1, padding=0, groups=groups, bias=False)
        self._init_identity(channels, groups, 2)


class IdentityBasedConv1x1_1d(_IdentityBased, nn.Conv1d):
    """The 1-d identity-based 1x1 conv (:class:`_IdentityBased`)."""

    def __init__(self, channels: int, groups: int = 1) -> None:
        nn.Conv1d.__init__(self, channels, channels, kernel_size=1, stride=1, padding=0, groups=groups, bias=False)
        self._init_identity(channels, groups, 1)


class IdentityBasedConv1x1_3d(_IdentityBased, nn.Conv3d):
    """The 3-d identity-based 1x1 conv (:class:`_IdentityBased`)."""

    def __init__(self, channels: int, groups: int = 1) -> None:
        nn.Conv3d.__init__(self, channels, channels, kernel_size=1, stride=1, padding=0, groups=groups, bias=False)
        self._init_identity(channels, groups, 3)


def identity_based_conv1x1(channels: int, groups: int = 1, dim: int = 2) -> nn.Module:
    """The identity-based 1x1 conv of dimension ``dim``."""
    return {1: IdentityBasedConv1x1_1d, 2: IdentityBasedConv1x1, 3: IdentityBasedConv1x1_3d}[dim](channels, groups)


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
    """A norm, then pad ``pad_pixels`` on every side with the norm's output for a zero input.

    For a BatchNorm (the default, ``BatchNorm{dim}d``) the pad value per channel is
    ``beta - running_mean * gamma / sqrt(running_var + eps)`` (detached, as in the original); for a
    :class:`~acnet.norms.ChannelAffine` (``norm=``, the frozen and BN-free forms) it is the shift
    ``bias`` itself (not detached: the block then computes exactly its fused conv in training too).
    The norm is the child ``bn`` (state-dict keys ``<name>.bn.*``). ``pad_pixels``: one int or one per axis.
    """

    def __init__(self, pad_pixels: Sizes, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, *, dim: int = 2, norm: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.bn = norm if norm is not None else norms.batch_norm_class(dim)(num_features, eps=eps, momentum=momentum,
                                                                            affine=affine)
        self.pad_pixels = pad_pixels
        self.pad_nd = (pad_pixels,) * dim if isinstance(pad_pixels, int) else tuple(pad_pixels)

    def pad_values(self) -> Tensor:
        """Per-channel value of ``bn(0)`` in eval mode (detached for a BatchNorm)."""
        _, shift = norms.scale_shift(self.bn)
        return shift if isinstance(self.bn, norms.ChannelAffine) else shift.detach()

    def forward(self, x: Tensor) -> Tensor:
        p = self.pad_pixels
        if isinstance(p, int) and p > 0 and bns_fusable([x], [self.bn]) and self.bn.affine:
            with torch.no_grad():
                mean, var = batch_stats(x, self.bn)
                pad_value = self.pad_values().to(x.dtype)  # running stats after this batch's update, as the original
                invstd = (var + self.bn.eps).rsqrt().to(x.dtype)
            return _BNTrainPad.apply(x, self.bn.weight, self.bn.bias, mean.to(x.dtype), invstd, pad_value, p)
        out = self.bn(x)
        if any(self.pad_nd):
            value = self.pad_values().to(out.dtype).reshape(1, -1, *([1] * len(self.pad_nd)))
            pads = []
            for q in reversed(self.pad_nd):
                pads += [q, q]
            out = F.pad(out, pads)
            for axis, q in enumerate(self.pad_nd):
                if q > 0:
                    for border in (slice(None, q), slice(-q, None)):
                        index = [slice(None)] * out.dim()
                        index[2 + axis] = border
                        out[tuple(index)] = value
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
    """K average pooling (padded pixels counted) that also supports dilation; no parameters.

    Computed as a depthwise conv with the constant kernel ``1/prod(K)`` (``transforms.avg_pool_kernel``):
    the same values as ``F.avg_pool2d(count_include_pad=True)`` and several times faster forward and
    backward on CPU. ``kernel_size`` etc.: one int or one per axis; ``dim``: 1, 2 or 3.
    """

    def __init__(self, kernel_size: Sizes, stride: Sizes = 1, padding: Sizes = 0, dilation: Sizes = 1, *,
                 dim: int = 2, transposed: bool = False, output_padding: Sizes = 0) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation
        self.dim, self.transposed, self.output_padding = dim, transposed, output_padding

    def forward(self, x: Tensor) -> Tensor:
        channels = x.shape[1]
        k = (self.kernel_size,) * self.dim if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        kernel = x.new_full((channels, 1, *k), 1.0 / math.prod(k))  # avg_pool_kernel(channels, k, groups=channels)
        if self.transposed:  # the adjoint of the pooling: each input pixel spread over its window
            return conv_transpose_nd(x, kernel, None, self.stride, self.padding, self.output_padding, channels,
                                     self.dilation)
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.dim - 1]
        return conv(x, kernel, None, self.stride, self.padding, self.dilation, channels)

    def extra_repr(self) -> str:
        text = f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, dilation={self.dilation}"
        return text + (f", transposed=True, output_padding={self.output_padding}" if self.transposed else "")


class IdentityBasedConvTranspose1x1(nn.Module):
    """A 1x1 transposed conv (stride 1) whose kernel ``(C, C/g, 1, ...)`` is ``identity + weight`` (``weight``
    starts at 0): the transposed DBB's identity-based 1x1 (``idconv1``), any dimension."""

    def __init__(self, channels: int, groups: int = 1, dim: int = 2) -> None:
        super().__init__()
        self.in_channels = self.out_channels = channels
        self.groups, self.dim = groups, dim
        self.weight = nn.Parameter(torch.zeros(channels, channels // groups, *((1,) * dim)))
        self.register_buffer("id_tensor", transforms.identity_kernel(channels, groups, dim=dim), persistent=False)

    def get_actual_kernel(self) -> Tensor:
        """``identity + weight``."""
        return self.weight + self.id_tensor.to(dtype=self.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        conv_t = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[self.dim - 1]
        return conv_t(x, self.get_actual_kernel(), None, 1, 0, 0, self.groups)




class DiverseBranchBlock(ReparamBlock):
    """Diverse Branch Block, state-dict compatible with the original; deploy form ``dbb_reparam``.

    ``internal_channels_1x1_3x3``: width of the 1x1-KxK branch (default: ``in_channels``, or
    ``2 * in_channels`` for depthwise blocks); when it equals ``in_channels`` the first conv is the
    identity-based ``idconv1``. ``nonlinear`` (default identity) is applied after the branch sum and
    kept by the deploy form. ``single_init``: only the KxK branch starts with norm weight 1.
    ``dim`` / ``norm``: the form (module docstring). The frozen form: ``dbb_origin`` = KxK conv + frozen
    BN; trainable: every conv weight and every other norm (learnable scale and shift per channel).
    """

    deploy_conv_name = "dbb_reparam"
    signature = "dbb_origin.conv.weight"

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
        dim: int = 2,
        norm: str = "batch",
        transposed: bool = False,
        output_padding: IntOrPair = 0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if padding is None:
            padding = self.same_padding(kernel_size, dilation, dim)
        self._init_geometry(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, "zeros",
            dim=dim, norm=norm, min_kernel=1, transposed=transposed, output_padding=output_padding, bias=bias,
        )
        k, s, p, d = self.kernel_size, self.stride, self.padding, self.dilation
        op = self.output_padding
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
        if deploy:
            self.dbb_reparam = self._empty_deploy_conv(torch.get_default_dtype(), torch.device("cpu"))
            return
        # Depthwise (one input channel per output): no 1x1 branch, the avg branch pools the input itself.
        pointwise = groups < out_channels or in_channels != out_channels
        # the 1x1 conv of the 1x1-KxK branch is identity-based when it keeps the channel count: the first
        # conv (in -> internal) of the conv form, the last (internal -> out) of the transposed form
        kept = out_channels if transposed else in_channels
        internal = self.internal_channels(internal_channels_1x1_3x3, kept if pointwise else 2 * kept)
        conv_cls = norms.conv_class(dim)

        def norm_of(channels: int, main: bool = False) -> nn.Module:
            return norms.make_norm(norm, channels, dim, main=main, eps=bn_eps, momentum=bn_momentum, bias=bias)

        def padded(channels: int) -> BNAndPadLayer:
            inner = None if norm == "batch" else norm_of(channels)
            return BNAndPadLayer(p, channels, eps=bn_eps, momentum=bn_momentum, dim=dim, norm=inner)

        nd = self.kernel_nd
        self.dbb_origin = nn.Sequential()
        self.dbb_origin.add_module("conv", self._make_conv(in_channels, out_channels, nd, padding=self.padding_nd,
                                                           output_padding=self.output_padding_nd))
        self.dbb_origin.add_module("bn", norm_of(out_channels, True))
        ones = (1,) * dim
        window = branch_window(nd, ones, transforms.centre_offsets(nd), self.padding_nd, self.dilation_nd,
                               self.output_padding_nd if transposed else None)
        self._window_1x1 = None  # the 1x1 branch's input (conv) / output (transposed) window, if any
        if transposed:
            self._init_transposed_branches(in_channels, out_channels, internal, pointwise, window, norm_of)
            if single_init:
                self.single_init()
            return

        self.dbb_avg = nn.Sequential()
        if pointwise:
            self.dbb_avg.add_module("conv", conv_cls(in_channels, out_channels, 1, groups=groups, bias=False))
            self.dbb_avg.add_module("bn", padded(out_channels))
            self.dbb_avg.add_module("avg", AvgPoolKxK(k, s, 0, d, dim=dim))
            pad_1x1, self._window_1x1 = conv_window_padding(window)
            self.dbb_1x1 = nn.Sequential()
            self.dbb_1x1.add_module("conv", self._make_conv(in_channels, out_channels, ones, padding=pad_1x1,
                                                            dilation=ones))
            self.dbb_1x1.add_module("bn", norm_of(out_channels))
        else:
            self.dbb_avg.add_module("avg", AvgPoolKxK(k, s, p, d, dim=dim))
        self.dbb_avg.add_module("avgbn", norm_of(out_channels))

        self.dbb_1x1_kxk = nn.Sequential()
        if internal == in_channels:
            self.dbb_1x1_kxk.add_module("idconv1", identity_based_conv1x1(in_channels, groups, dim))
        else:
            self.dbb_1x1_kxk.add_module("conv1", conv_cls(in_channels, internal, 1, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn1", padded(internal))
        self.dbb_1x1_kxk.add_module("conv2", conv_cls(internal, out_channels, k, stride=s, padding=0, dilation=d,
                                                      groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn2", norm_of(out_channels))

        if single_init:
            self.single_init()

    def _init_transposed_branches(self, in_channels: int, out_channels: int, internal: int, pointwise: bool,
                                  window, norm_of) -> None:
        """The transposed form's branches: each the adjoint of the conv form's (its convs transposed, in
        reverse order), so that every middle norm acts on a transposed conv's output and is followed by a
        pointwise 1x1 only -- exact everywhere (a shift before a strided transposed conv would not be)."""
        dim, g, nd = self.dim, self.groups, self.kernel_nd
        ones = (1,) * dim
        conv_t = norms.conv_class(dim, transposed=True)
        self.dbb_avg = nn.Sequential()
        if pointwise:
            self.dbb_avg.add_module("avg", AvgPoolKxK(self.kernel_size, self.stride, self.padding, self.dilation,
                                                      dim=dim, transposed=True, output_padding=self.output_padding))
            self.dbb_avg.add_module("bn", norm_of(in_channels))
            self.dbb_avg.add_module("conv", conv_t(in_channels, out_channels, 1, groups=g, bias=False))
            pad, extra, self._window_1x1 = transposed_window_padding(window, self.stride_nd, ones,
                                                                     use_output_padding=False)
            self.dbb_1x1 = nn.Sequential()
            self.dbb_1x1.add_module("conv", self._make_conv(in_channels, out_channels, ones, padding=pad,
                                                            output_padding=extra, dilation=ones))
            self.dbb_1x1.add_module("bn", norm_of(out_channels))
        else:
            self.dbb_avg.add_module("avg", AvgPoolKxK(self.kernel_size, self.stride, self.padding, self.dilation,
                                                      dim=dim, transposed=True, output_padding=self.output_padding))
        self.dbb_avg.add_module("avgbn", norm_of(out_channels))
        self.dbb_1x1_kxk = nn.Sequential()
        self.dbb_1x1_kxk.add_module("conv2", self._make_conv(in_channels, internal, nd, padding=self.padding_nd,
                                                             output_padding=self.output_padding_nd))
        self.dbb_1x1_kxk.add_module("bn1", norm_of(internal))
        if internal == out_channels:
            self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConvTranspose1x1(out_channels, g, dim))
        else:
            self.dbb_1x1_kxk.add_module("conv1", conv_t(internal, out_channels, 1, groups=g, bias=False))
        self.dbb_1x1_kxk.add_module("bn2", norm_of(out_channels))

    @classmethod
    def unsupported(cls, *, dim, kernel_size, stride, padding, dilation, groups, padding_mode, norm,
                    transposed: bool = False, bias: bool = True) -> Optional[str]:
        reason = super().unsupported(dim=dim, kernel_size=kernel_size, stride=stride, padding=padding,
                                     dilation=dilation, groups=groups, padding_mode=padding_mode, norm=norm,
                                     transposed=transposed, bias=bias)
        if reason is not None:
            return reason
        if padding_mode != "zeros":
            return f"DBB supports only padding_mode='zeros', not {padding_mode!r}"
        return None

    # --- state ------------------------------------------------------------------------------
    def _branch_output_bns(self) -> Tuple[nn.Module, ...]:
        if self.deployed:
            raise RuntimeError("DiverseBranchBlock: the block is deployed; its branches and BNs are gone")
        bns = [self.dbb_origin.bn, self.dbb_avg.avgbn, self.dbb_1x1_kxk.bn2]
        if hasattr(self, "dbb_1x1"):
            bns.insert(1, self.dbb_1x1.bn)
        return tuple(bns)

    def main_branch(self) -> Tuple[Tensor, nn.Module]:
        """``(dbb_origin.conv.weight, dbb_origin.bn)``."""
        self._branch_output_bns()
        return self.dbb_origin.conv.weight, self.dbb_origin.bn

    def init_gamma(self, gamma_value: float) -> None:
        """Set the weight of every branch's final norm to ``gamma_value`` (a frozen one is left as it is)."""
        with torch.no_grad():
            for bn in self._trainable_norms(self._branch_output_bns()):
                bn.weight.fill_(gamma_value)

    def single_init(self) -> None:
        """Final norm weights and biases 0 except the KxK branch's (weight 1; a frozen one unchanged): the block starts as a
        plain conv-norm; the zeroed norms still get gradients, the convs behind them from the next step on."""
        with torch.no_grad():
            for bn in self._branch_output_bns()[1:]:  # scale and shift 0: the branch adds exactly zero
                bn.weight.fill_(0.0)
                if bn.bias is not None:
                    bn.bias.fill_(0.0)
            if norms.trainable_norm(self.dbb_origin.bn):
                self.dbb_origin.bn.weight.fill_(1.0)

    @classmethod
    def stored_options(cls, state: Mapping[str, Tensor], in_channels: int) -> Dict[str, object]:
        options: Dict[str, object] = {}
        # the 1x1 conv's first axis is the internal width in both forms (conv: (D, C/g), transposed: (D, O/g))
        for key in ("dbb_1x1_kxk.conv1.weight", "dbb_1x1_kxk.idconv1.weight"):
            if key in state:
                options["internal_channels_1x1_3x3"] = state[key].shape[0]
        options.update(stored_dim_option(state, "dbb_origin.conv.weight"))
        options.update(stored_norm_option(state, "dbb_origin.bn", "dbb_avg.avgbn"))
        return options

    # --- forward ----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.deployed:
            return self.nonlinear(match_layout(run_conv(self.dbb_reparam, x), x))
        y = branch_input(x, self.branches_nhwc())
        outputs = self._transposed_branches(y) if self.transposed else self._conv_branches(y)
        # the branch BNs and the sum in one pass (batch statistics in training, else BN by BN)
        return self.nonlinear(match_layout(branch_bn_sum(outputs, self._branch_output_bns()), x))

    def _conv_branches(self, x: Tensor) -> list:
        """Branch outputs before their final norm, in the order of _branch_output_bns(); run_conv for the
        convs that may be 1x1 with a stride (the others have stride 1)."""
        outputs = [run_conv(self.dbb_origin.conv, x)]
        if hasattr(self, "dbb_1x1"):
            windowed = x if self._window_1x1 is None else apply_input_window(x, self._window_1x1)
            outputs.append(run_conv(self.dbb_1x1.conv, windowed))
        avg = self.dbb_avg
        outputs.append(avg.avg(avg.bn(avg.conv(x))) if hasattr(avg, "conv") else avg.avg(x))
        kxk = self.dbb_1x1_kxk
        first = kxk.idconv1(x) if hasattr(kxk, "idconv1") else kxk.conv1(x)
        outputs.append(run_conv(kxk.conv2, kxk.bn1(first)))
        return outputs

    def _transposed_branches(self, x: Tensor) -> list:
        """The transposed form's branch outputs before their final norm (the adjoint branches)."""
        outputs = [run_conv(self.dbb_origin.conv, x)]
        if hasattr(self, "dbb_1x1"):
            out = run_conv(self.dbb_1x1.conv, x)
            outputs.append(out if self._window_1x1 is None else apply_output_window(out, self._window_1x1))
        avg = self.dbb_avg
        outputs.append(avg.conv(avg.bn(avg.avg(x))) if hasattr(avg, "conv") else avg.avg(x))
        kxk = self.dbb_1x1_kxk
        last = kxk.idconv1 if hasattr(kxk, "idconv1") else kxk.conv1
        outputs.append(last(kxk.bn1(run_conv(kxk.conv2, x))))  # (stride 1 1x1 convs: never NHWC-faulty)
        return outputs

    # --- fusion -----------------------------------------------------------------------------
    def get_equivalent_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        """Sum of the four branches' kernels/biases, each fused with its norms (see module docstring); a
        transposed block's kernel in ``ConvTranspose`` layout."""
        if self.deployed:
            return self._deployed_kernel_bias()
        k, g = self.kernel_nd, self.groups
        major = self._output_major
        kernels, biases = [], []

        k_origin, b_origin = norms.fuse_norm(major(self.dbb_origin.conv.weight), self.dbb_origin.bn)
        kernels.append(k_origin)
        biases.append(b_origin)

        if hasattr(self, "dbb_1x1"):
            k_1x1, b_1x1 = norms.fuse_norm(major(self.dbb_1x1.conv.weight), self.dbb_1x1.bn)
            kernels.append(transforms.place_kernel(k_1x1, k, transforms.centre_offsets(k)))
            biases.append(b_1x1)

        branch = self.dbb_1x1_kxk
        one = branch.idconv1.get_actual_kernel() if hasattr(branch, "idconv1") else branch.conv1.weight
        avg = self.dbb_avg
        if self.transposed:  # K kernel, middle norm, then the 1x1: fuse_kxk_1x1
            k_first, b_first = norms.fuse_norm(major(branch.conv2.weight), branch.bn1)
            k_last, b_last = norms.fuse_norm(major(one), branch.bn2)
            k_merged, b_merged = transforms.fuse_kxk_1x1(k_first, b_first, k_last, b_last, groups=g)
            channels = self.in_channels if hasattr(avg, "conv") else self.out_channels
            k_avg = transforms.avg_pool_kernel(channels, k, g, dim=self.dim, dtype=k_origin.dtype,
                                               device=k_origin.device)
            if hasattr(avg, "conv"):
                k_avg, b_mid = norms.fuse_norm(k_avg, avg.bn)
                k_avg, b_avg = transforms.fuse_kxk_1x1(k_avg, b_mid, *norms.fuse_norm(major(avg.conv.weight),
                                                                                      avg.avgbn), groups=g)
            else:
                k_avg, b_avg = norms.fuse_norm(k_avg, avg.avgbn)
        else:  # 1x1, padded middle norm, then the K kernel: fuse_1x1_kxk
            k_first, b_first = norms.fuse_norm(one, branch.bn1.bn)
            k_second, b_second = norms.fuse_norm(branch.conv2.weight, branch.bn2)
            k_merged, b_merged = transforms.fuse_1x1_kxk(k_first, b_first, k_second, b_second, groups=g)
            k_avg = transforms.avg_pool_kernel(self.out_channels, k, g, dim=self.dim, dtype=k_origin.dtype,
                                               device=k_origin.device)
            k_avg, b_avg = norms.fuse_norm(k_avg, avg.avgbn)
            if hasattr(avg, "conv"):
                k_first, b_first = norms.fuse_norm(avg.conv.weight, avg.bn.bn)
                k_avg, b_avg = transforms.fuse_1x1_kxk(k_first, b_first, k_avg, b_avg, groups=g)
        kernels += [k_merged, k_avg]
        biases += [b_merged, b_avg]
        kernel, bias = transforms.add_branches(kernels, biases)
        return major(kernel), bias

    def switch_to_deploy(self) -> None:
        """Fuse into ``dbb_reparam`` and drop the branches (idempotent); ``nonlinear`` stays."""
        if self.deployed:
            return
        fused = self.make_deploy_conv()
        for name in ("dbb_origin", "dbb_1x1", "dbb_avg", "dbb_1x1_kxk"):
            if hasattr(self, name):
                delattr(self, name)
        self.dbb_reparam = fused
