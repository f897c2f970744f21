"""Online re-parameterization (OREPA, Hu et al., CVPR 2022): six linear branches merged into one kernel
at every training step, one conv and one BN on the feature map.

No branch has a BN: each branch is a kernel built from raw parameters, scaled per output channel by
a learned vector ``vector[b]`` ("linear scaling"), and the six kernels are summed *before* the conv
(``weight_gen``). With ``x`` the input (zero padding ``p``, stride ``s``, dilation ``d``, ``groups``):

* origin: ``v0 * W0`` (KxK);
* avg: ``v1 * a ⊗ A`` (1x1 ``a`` times the fixed ``1/K^2`` average kernel ``A``);
* prior: ``v2 * f ⊗ P[o]`` (1x1 ``f`` times the fixed per-channel cosine "frequency prior" ``P``,
  :func:`acnet.transforms.frequency_prior`);
* 1x1-KxK: ``v3 * (I + c1) * c2`` (identity-based 1x1 ``c1``, the identity ``I`` a buffer, then KxK
  ``c2``; :func:`acnet.transforms.merge_1x1_kxk_kernel`);
* 1x1: ``v4 * pad(e)`` (1x1 on the centre tap);
* depthwise-pointwise: ``v5 * merge(dw, pw)`` (depthwise KxK with 8 channels per input channel, then
  a 1x1; :func:`acnet.transforms.merge_depthwise_pointwise`).

Training form: ``nonlinear(bn(conv(x; W)))`` with ``W = sum of the six`` -- so training costs one conv
and one BN per block plus a kernel assembly that does not depend on the batch. Eval mode equals
``conv(x; W * s, t)`` (``(s, t)`` the BN's scale and shift) for any padding, dilation and padding mode:
the branches are merged in kernel space, never on feature maps. Deploy form: ``orepa_reparam``.

State-dict names, buffers (``weight_orepa_avg_avg``, ``weight_orepa_prior``, ``id_tensor``) and initial
values are the original's (JUGGHM/OREPA_CVPR2022, ``blocks.py`` class ``OREPA``).
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn import init

from . import transforms
from .base import IntOrPair, ReparamBlock, conv2d, run_conv

__all__ = ["OREPABlock", "OREPA_BRANCHES", "OREPA_INITIAL_SCALES"]

#: The branches, in the order of the rows of ``vector``.
OREPA_BRANCHES: Tuple[str, ...] = ("origin", "avg", "prior", "1x1_kxk", "1x1", "dw_pw")
#: The original's initial value of each branch's scale (times ``sqrt(init_hyper_gamma)``).
OREPA_INITIAL_SCALES: Tuple[float, ...] = (0.25, 0.25, 0.0, 0.5, 1.0, 0.5)
#: Depthwise channels per input channel of the depthwise-pointwise branch (the original's ``expand_ratio``).
DEPTHWISE_EXPANSION = 8


class OREPABlock(ReparamBlock):
    """OREPA block (the original's ``OREPA``), state-dict compatible; deploy form ``orepa_reparam``.

    Arguments in the original's order. ``kernel_size``: odd int >= 1; ``padding`` (default
    ``dilation * (K // 2)``): any value >= 0, as are ``dilation`` and ``padding_mode`` (keyword); any
    ``groups``. ``internal_channels_1x1_3x3``: width of the 1x1-KxK branch (default ``in_channels``,
    ``2 * in_channels`` when ``groups > 4``, as the original). ``nonlinear`` is applied after the BN and
    kept by the deploy form. ``single_init``: scales 1 for the KxK branch, 0 for the others (the block
    starts as a plain conv-BN). ``init_hyper_para`` multiplies the initial branch weights (square root
    of it for the depthwise-pointwise pair), ``init_hyper_gamma`` the squared initial scales.
    ``bn_eps`` / ``bn_momentum`` configure the BN.
    """

    deploy_conv_name = "orepa_reparam"

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
        init_hyper_para: float = 1.0,
        init_hyper_gamma: float = 1.0,
        *,
        padding_mode: str = "zeros",
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        if padding is None:
            k0 = kernel_size if isinstance(kernel_size, int) else kernel_size[0]
            d0 = dilation if isinstance(dilation, int) else dilation[0]
            padding = d0 * (k0 // 2) if isinstance(k0, int) and isinstance(d0, int) else 0
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode,
                            min_kernel=1, odd_kernel=True)
        for name, value in (("init_hyper_para", init_hyper_para), ("init_hyper_gamma", init_hyper_gamma)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"OREPABlock: {name} must be a number >= 0, got {value!r}")
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
        if deploy:
            self.orepa_reparam = self._empty_deploy_conv(torch.get_default_dtype(), torch.device("cpu"))
            return
        k, c_g = self.kernel_size, in_channels // groups
        if internal_channels_1x1_3x3 is None:
            internal_channels_1x1_3x3 = in_channels if groups <= 4 else 2 * in_channels
        internal = internal_channels_1x1_3x3
        if isinstance(internal, bool) or not isinstance(internal, int) or internal < 1 or internal % groups:
            raise ValueError(
                f"OREPABlock: internal_channels_1x1_3x3 must be a positive multiple of groups ({groups}), got {internal!r}"
            )

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape))

        self.weight_orepa_origin = param(out_channels, c_g, k, k)
        self.weight_orepa_avg_conv = param(out_channels, c_g, 1, 1)
        self.weight_orepa_pfir_conv = param(out_channels, c_g, 1, 1)
        self.register_buffer("weight_orepa_avg_avg", torch.full((k, k), 1.0 / (k * k)))
        self.register_buffer("weight_orepa_prior", transforms.frequency_prior(out_channels, k))
        self.weight_orepa_1x1 = param(out_channels, c_g, 1, 1)
        self.weight_orepa_1x1_kxk_idconv1 = nn.Parameter(torch.zeros(internal, c_g, 1, 1))
        self.register_buffer("id_tensor", transforms.identity_kernel(in_channels, groups, out_channels=internal))
        self.weight_orepa_1x1_kxk_conv2 = param(out_channels, internal // groups, k, k)
        self.weight_orepa_gconv_dw = param(in_channels * DEPTHWISE_EXPANSION, 1, k, k)
        self.weight_orepa_gconv_pw = param(out_channels, in_channels * DEPTHWISE_EXPANSION // groups, 1, 1)
        self.vector = param(len(OREPA_BRANCHES), out_channels)
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum)
        self.reset_parameters(init_hyper_para, init_hyper_gamma)
        if single_init:
            self.single_init()

    # --- initialisation ---------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, init_hyper_para: float = 1.0, init_hyper_gamma: float = 1.0) -> None:
        """The original's initialisation: Kaiming-uniform (``a=0``) branch weights times ``init_hyper_para``
        (``sqrt`` of it for the depthwise-pointwise pair), the identity-based 1x1 at zero, scales
        :data:`OREPA_INITIAL_SCALES` times ``sqrt(init_hyper_gamma)``."""
        for weight in (self.weight_orepa_origin, self.weight_orepa_avg_conv, self.weight_orepa_pfir_conv,
                       self.weight_orepa_1x1, self.weight_orepa_1x1_kxk_conv2):
            init.kaiming_uniform_(weight, a=0.0)
            weight.mul_(init_hyper_para)
        for weight in (self.weight_orepa_gconv_dw, self.weight_orepa_gconv_pw):
            init.kaiming_uniform_(weight, a=0.0)
            weight.mul_(math.sqrt(init_hyper_para))
        self.weight_orepa_1x1_kxk_idconv1.zero_()
        scales = torch.tensor(OREPA_INITIAL_SCALES, dtype=self.vector.dtype) * math.sqrt(init_hyper_gamma)
        self.vector.copy_(scales.view(-1, 1).expand_as(self.vector))

    def _training_form(self) -> None:
        if self.deployed:
            raise RuntimeError("OREPABlock: the block is deployed; its branches and BN are gone")

    def init_gamma(self, gamma_value: float) -> None:
        """Set every branch's scale to ``gamma_value`` (the original's ``init_gamma``)."""
        self._training_form()
        with torch.no_grad():
            self.vector.fill_(gamma_value)

    def single_init(self) -> None:
        """Scale 1 for the KxK branch, 0 for the others: the block starts as a plain conv-BN."""
        self.init_gamma(0.0)
        with torch.no_grad():
            self.vector[0].fill_(1.0)

    # --- the kernel -------------------------------------------------------------------------
    def weight_gen(self) -> Tensor:
        """The merged kernel ``W`` (``(O, C/g, K, K)``) of the six scaled branches.

        Differentiable in every parameter (first order: the gradients are written out in
        :class:`_MergedKernel`, a few small ops per block and step instead of an autograd graph of
        about thirty nodes).
        """
        self._training_form()
        pointwise = self.weight_orepa_gconv_pw
        if 1 < self.groups < self.out_channels:
            pointwise = _original_pointwise_order(pointwise, self.groups)
        return _MergedKernel.apply(
            self.weight_orepa_origin, self.weight_orepa_avg_conv, self.weight_orepa_pfir_conv, self.weight_orepa_1x1,
            self.weight_orepa_1x1_kxk_idconv1, self.weight_orepa_1x1_kxk_conv2, self.weight_orepa_gconv_dw, pointwise,
            self.vector, self.weight_orepa_avg_avg, self.weight_orepa_prior, self.id_tensor, self.groups,
        )

    def _conv(self, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        if self.padding_mode != "zeros":
            x = F.pad(x, [self.padding] * 4, mode=self.padding_mode)
            return conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        if self.deployed:
            return self.nonlinear(run_conv(self.orepa_reparam, x))
        return self.nonlinear(self.bn(self._conv(x, self.weight_gen())))

    # --- fusion -----------------------------------------------------------------------------
    def get_equivalent_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        """``(W * s, t)``: the merged kernel folded with the BN's eval-mode scale ``s`` and shift ``t``."""
        if self.deployed:
            return self.orepa_reparam.weight, self.orepa_reparam.bias
        return transforms.fuse_bn(self.weight_gen(), self.bn)

    def switch_to_deploy(self) -> None:
        """Fuse into ``orepa_reparam`` and drop the branches, scales and BN (idempotent); ``nonlinear`` stays."""
        if self.deployed:
            return
        fused = self.make_deploy_conv()
        for name in [n for n, _ in self.named_parameters(recurse=False)] + [n for n, _ in self.named_buffers(recurse=False)]:
            delattr(self, name)
        del self.bn
        self.orepa_reparam = fused

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.deployed else f", internal_channels_1x1_3x3="
                                       f"{self.weight_orepa_1x1_kxk_idconv1.shape[0]}")


def _original_pointwise_order(pointwise: Tensor, groups: int) -> Tensor:
    """The original's row order of the pointwise weight for ``1 < groups < out_channels``.

    Its ``dwsc2full`` gives output ``j * O/g + a`` (group ``j``) the pointwise row ``a * g + j``; this
    reorders the rows so that :func:`acnet.transforms.merge_depthwise_pointwise` (output ``o`` from row
    ``o``) computes the original's kernel from the original's weights.
    """
    rows = pointwise.shape[0]
    return pointwise.reshape(rows // groups, groups, *pointwise.shape[1:]).transpose(0, 1).reshape(pointwise.shape)


def _no_autocast(device_type: str):
    """The kernel is assembled in its parameters' dtype (autocast applies to the conv that uses it)."""
    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        return contextlib.nullcontext()


class _MergedKernel(torch.autograd.Function):
    """``W = v0*W0 + v1*a⊗A + v2*f⊗P + v3*merge(I + c1, c2) + v4*pad(e) + v5*merge(dw, pw)`` and its gradients.

    Shapes: ``W0 (O, C/g, K, K)``; ``a, f, e (O, C/g, 1, 1)``; ``c1 (D, C/g, 1, 1)``; ``c2 (O, D/g, K, K)``;
    ``dw (m*C, 1, K, K)``; ``pw (O, m*C/g, 1, 1)``; ``vector (6, O)``; constants ``A (K, K)``,
    ``P (O, K, K)``, ``I`` like ``c1``. With ``G = dL/dW``: ``dL/dW0 = v0*G``,
    ``dL/da = v1 * <G, A>_taps``, ``dL/df = v2 * <G, P>_taps``, ``dL/de = v4 * G[centre]``,
    ``dL/dv_b = <G, B_b>`` per output channel (``B_b`` the unscaled branch kernel); the two products
    (``1x1-KxK``, depthwise-pointwise) are batched matrix products whose gradients are two more each.
    The products are the only work that grows with the channels: ``3 * O * D * (C/g) * K^2``
    multiply-adds per step for the 1x1-KxK branch, independent of the batch.
    """

    @staticmethod
    def forward(ctx, origin, avg_conv, prior_conv, centre, idconv1, conv2, dw, pw, vector, avg_kernel, prior,
                identity, groups):
        with _no_autocast(origin.device.type):
            out_ch, c_g, k, _ = origin.shape
            taps, g = k * k, groups
            o_g = out_ch // g
            v = vector.view(6, out_ch, 1, 1)
            first = idconv1 + identity
            m11 = transforms.merge_1x1_kxk_kernel(first, conv2, g).view(g, o_g, c_g, taps)
            mdp = transforms.merge_depthwise_pointwise(dw, pw, c_g * g, g).view(g, o_g, c_g, taps)
            kernel = origin.reshape(out_ch, c_g, taps) * v[0]
            kernel.addcmul_(avg_conv.view(out_ch, c_g, 1) * v[1], avg_kernel.reshape(1, 1, taps))
            kernel.addcmul_(prior_conv.view(out_ch, c_g, 1) * v[2], prior.reshape(out_ch, 1, taps))
            kernel.view(g, o_g, c_g, taps).addcmul_(m11, v[3].view(g, o_g, 1, 1))
            kernel.view(g, o_g, c_g, taps).addcmul_(mdp, v[5].view(g, o_g, 1, 1))
            kernel[:, :, taps // 2].addcmul_(centre.view(out_ch, c_g), vector[4].view(out_ch, 1))
        # Only inputs are saved (parameters and constants): the kernel-sized intermediates are
        # recomputed or avoided in backward, so the block holds no memory beyond the conv's own.
        ctx.save_for_backward(origin, avg_conv, prior_conv, centre, idconv1, conv2, dw, pw, vector, avg_kernel,
                              prior, identity)
        ctx.groups = groups
        return kernel.view(out_ch, c_g, k, k)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        origin, avg_conv, prior_conv, centre, idconv1, conv2, dw, pw, vector, avg_kernel, prior, identity = \
            ctx.saved_tensors
        g = ctx.groups
        with _no_autocast(grad.device.type):
            out_ch, c_g, k, _ = origin.shape
            taps, o_g, m = k * k, out_ch // g, dw.shape[0] // (c_g * g)
            grad = grad.contiguous().view(out_ch, c_g, taps)  # a channels_last conv gives an NHWC-strided one
            v = vector.view(6, out_ch, 1, 1)
            grad_vector = torch.empty_like(vector)
            grad_vector[0] = (grad * origin.view(out_ch, c_g, taps)).sum((1, 2))
            grad_origin = (grad * v[0]).view(origin.shape)
            # the fixed-pattern branches: <G, pattern> over the taps, per (o, c)
            on_avg = torch.mv(grad.view(-1, taps), avg_kernel.reshape(taps)).view(out_ch, c_g)
            on_prior = torch.bmm(grad, prior.reshape(out_ch, taps, 1)).view(out_ch, c_g)
            on_centre = grad[:, :, taps // 2]
            grads = []
            for row, on, weight in ((1, on_avg, avg_conv), (2, on_prior, prior_conv), (4, on_centre, centre)):
                grad_vector[row] = (on * weight.view(out_ch, c_g)).sum(1)
                grads.append((on * vector[row].view(out_ch, 1)).view(weight.shape))
            # 1x1 then KxK, v3*M(first, conv2) = M(first, v3*conv2): d/d first from the scaled conv2;
            # H = dL/d(v3*conv2) is the unscaled gradient of conv2, and <G, M>_o = <H, conv2>_o.
            first = idconv1 + identity
            scale3 = vector[3].view(out_ch, 1, 1, 1)
            grad_first, on_conv2 = _merge_1x1_kxk_backward(grad.view(out_ch, c_g, k, k), first, conv2 * scale3, g)
            grad_vector[3] = (on_conv2 * conv2).sum((1, 2, 3))
            grad_conv2 = on_conv2 * scale3
            # depthwise then pointwise, the same way: <G, Q>_o = <dL/d(pw) unscaled, pw>_o
            grad_t = grad.view(g, o_g, c_g, taps).transpose(1, 2).reshape(g * c_g, o_g, taps)
            dw_b = dw.view(g * c_g, m, taps)
            on_pw = torch.bmm(grad_t, dw_b.transpose(1, 2)).view(g, c_g, o_g, m).transpose(1, 2)
            on_pw = on_pw.reshape(out_ch, c_g * m)
            grad_vector[5] = (on_pw * pw.view(out_ch, -1)).sum(1)
            grad_pw = (on_pw * vector[5].view(out_ch, 1)).view(pw.shape)
            scaled_pw_b = (pw.view(out_ch, c_g * m) * vector[5].view(out_ch, 1)).view(g, o_g, c_g, m)
            scaled_pw_b = scaled_pw_b.transpose(1, 2).reshape(g * c_g, o_g, m)
            grad_dw = torch.bmm(scaled_pw_b.transpose(1, 2), grad_t).view(dw.shape)
        return (grad_origin, *grads, grad_first, grad_conv2, grad_dw, grad_pw, grad_vector, None, None, None, None)


def _merge_1x1_kxk_backward(grad: Tensor, first: Tensor, conv2: Tensor, groups: int) -> Tuple[Tensor, Tensor]:
    """Gradients ``(d/d first, d/d conv2)`` of :func:`acnet.transforms.merge_1x1_kxk_kernel` for ``grad``."""
    if transforms.merge_by_conv(first, conv2, groups):
        grad_conv2, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad, conv2, first.transpose(0, 1), None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, False])
        return grad_weight.transpose(0, 1).reshape(first.shape), grad_conv2
    out_ch, d_g, k, _ = conv2.shape
    c_g, o_g, taps = first.shape[1], out_ch // groups, k * k
    grad_t = grad.reshape(groups, o_g, c_g, taps).transpose(1, 2).reshape(groups, c_g, o_g * taps)
    first_g = first.view(groups, d_g, c_g)
    grad_conv2 = torch.bmm(first_g, grad_t).view(groups, d_g, o_g, taps).transpose(1, 2).reshape(conv2.shape)
    conv2_t = conv2.view(groups, o_g, d_g, taps).transpose(1, 2).reshape(groups, d_g, o_g * taps)
    grad_first = torch.bmm(conv2_t, grad_t.transpose(1, 2)).view(first.shape)
    return grad_first, grad_conv2
