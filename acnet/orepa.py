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

Forms. ``dim`` 1, 2, 3: every branch in N-d (any ``K`` per axis, even sizes -- the 1x1 branch on the
tap ``(K - 1) // 2`` -- and non-cubic kernels such as (1,3,3) too; the frequency prior of :func:`acnet.transforms.frequency_prior` splits the channels over the
axes). ``norm``: the one norm after the conv is a ``BatchNorm{dim}d`` (``"batch"``), a frozen BN
(``"frozen"``: the pretrained pair's; the new branches are normalised by their learned scales
``vector[1:]`` only, no batch statistics anywhere, so a batch of one trains) or a learnable
per-channel scale and shift (``"none"``, BN-free: the conv with a bias). The branches are merged in
kernel space before the one conv on the zero-padded input, so every form is exact at the borders
without any bias padding. ``transposed=True``: the merged kernel is built as the adjoint conv's
(``(C, O/g, *K)``, ConvTranspose's layout: rows are the input channels, so the branch scales are per
input channel) and the one conv is ``conv_transpose``; linear in the parameters, exact as the conv form.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn import init

from . import norms, transforms
from .block import IntOrPair, ReparamBlock, stored_dim_option, stored_norm_option
from .fastpath import conv_nd, conv_transpose_nd, match_layout, run_conv

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
    ``bn_eps`` / ``bn_momentum`` configure the BN; ``dim`` / ``norm`` the form (module docstring). The
    frozen form: the main branch is ``weight_orepa_origin`` (scale ``vector[0]``) and the frozen ``bn``;
    trainable: every branch weight and every scale.
    """

    deploy_conv_name = "orepa_reparam"
    signature = "weight_orepa_origin"

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
        dim: int = 2,
        norm: str = "batch",
        transposed: bool = False,
        output_padding: IntOrPair = 0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if padding is None:
            padding = self.same_padding(kernel_size, dilation, dim)
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode,
                            dim=dim, norm=norm, min_kernel=1, transposed=transposed, output_padding=output_padding,
                            bias=bias)
        for name, value in (("init_hyper_para", init_hyper_para), ("init_hyper_gamma", init_hyper_gamma)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"OREPABlock: {name} must be a number >= 0, got {value!r}")
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
        if deploy:
            self.orepa_reparam = self._empty_deploy_conv(torch.get_default_dtype(), torch.device("cpu"))
            return
        # the merged kernel's rows and columns: (O, C/g) for a conv; a transposed block's kernel is the
        # ConvTranspose layout (C, O/g), i.e. the kernel of the adjoint conv (O -> C), built the same way
        rows, cols = (in_channels, out_channels) if transposed else (out_channels, in_channels)
        k, c_g = self.kernel_nd, cols // groups
        internal = self.internal_channels(internal_channels_1x1_3x3, cols if groups <= 4 else 2 * cols)

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape))

        one = (1,) * dim
        self.weight_orepa_origin = param(rows, c_g, *k)
        self.weight_orepa_avg_conv = param(rows, c_g, *one)
        self.weight_orepa_pfir_conv = param(rows, c_g, *one)
        self.register_buffer("weight_orepa_avg_avg", torch.full(k, 1.0 / math.prod(k)))
        prior = transforms.frequency_prior(rows, k, dim=dim)
        # 3-d: stored (O, 1, *K), a rank that module.to(memory_format=torch.channels_last_3d) accepts
        self.register_buffer("weight_orepa_prior", prior.unsqueeze(1) if dim == 3 else prior)
        self.weight_orepa_1x1 = param(rows, c_g, *one)
        self.weight_orepa_1x1_kxk_idconv1 = nn.Parameter(torch.zeros(internal, c_g, *one))
        self.register_buffer("id_tensor", transforms.identity_kernel(cols, groups, out_channels=internal, dim=dim))
        self.weight_orepa_1x1_kxk_conv2 = param(rows, internal // groups, *k)
        self.weight_orepa_gconv_dw = param(cols * DEPTHWISE_EXPANSION, 1, *k)
        self.weight_orepa_gconv_pw = param(rows, cols * DEPTHWISE_EXPANSION // groups, *one)
        self.vector = param(len(OREPA_BRANCHES), rows)
        self.bn = norms.make_norm(norm, out_channels, dim, main=True, eps=bn_eps, momentum=bn_momentum, bias=bias)
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
        """Scale 1 for the KxK branch, 0 for the others: the block starts as a plain conv-BN (the norm is
        left as it is); the zeroed scales still get gradients, the branch weights from the next step on."""
        self.init_gamma(0.0)
        with torch.no_grad():
            self.vector[0].fill_(1.0)

    def main_branch(self) -> Tuple[Tensor, nn.Module]:
        """``(weight_orepa_origin, bn)`` (with ``vector[0] = 1`` after :meth:`single_init`)."""
        self._training_form()
        return self.weight_orepa_origin, self.bn

    @classmethod
    def unsupported(cls, *, dim, kernel_size, stride, padding, dilation, groups, padding_mode, norm,
                    transposed: bool = False, bias: bool = True) -> Optional[str]:
        return super().unsupported(dim=dim, kernel_size=kernel_size, stride=stride, padding=padding,
                                   dilation=dilation, groups=groups, padding_mode=padding_mode, norm=norm,
                                   transposed=transposed, bias=bias)

    @classmethod
    def stored_options(cls, state: Mapping[str, Tensor], in_channels: int) -> Dict[str, object]:
        key = "weight_orepa_1x1_kxk_idconv1"
        options: Dict[str, object] = {"internal_channels_1x1_3x3": state[key].shape[0]} if key in state else {}
        options.update(stored_dim_option(state, "weight_orepa_origin"))
        options.update(stored_norm_option(state, "bn", None))
        return options

    # --- the kernel -------------------------------------------------------------------------
    def weight_gen(self) -> Tensor:
        """The merged kernel ``W`` (``(O, C/g, *K)``) of the six scaled branches.

        Differentiable in every parameter (first order: the gradients are written out in
        :class:`_MergedKernel`, a few small ops per block and step instead of an autograd graph of
        about thirty nodes).
        """
        self._training_form()
        pointwise = self.weight_orepa_gconv_pw
        if 1 < self.groups < pointwise.shape[0]:
            pointwise = _original_pointwise_order(pointwise, self.groups)
        return _MergedKernel.apply(
            self.weight_orepa_origin, self.weight_orepa_avg_conv, self.weight_orepa_pfir_conv, self.weight_orepa_1x1,
            self.weight_orepa_1x1_kxk_idconv1, self.weight_orepa_1x1_kxk_conv2, self.weight_orepa_gconv_dw, pointwise,
            self.vector, self.weight_orepa_avg_avg, self.weight_orepa_prior, self.id_tensor, self.groups,
            _flat_centre(self.kernel_nd),
        )

    def _conv(self, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        if self.transposed:
            return conv_transpose_nd(x, weight, bias, self.stride, self.padding, self.output_padding, self.groups,
                                     self.dilation)
        if self.padding_mode != "zeros":
            pads = []
            for q in reversed(self.padding_nd):
                pads += [q, q]
            x = F.pad(x, pads, mode=self.padding_mode)
            return conv_nd(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return conv_nd(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        if self.deployed:
            return self.nonlinear(match_layout(run_conv(self.orepa_reparam, x), x))
        return self.nonlinear(match_layout(self.bn(self._conv(x, self.weight_gen())), x))

    # --- fusion -----------------------------------------------------------------------------
    def get_equivalent_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        """``(W * s, t)``: the merged kernel folded with the BN's eval-mode scale ``s`` and shift ``t``."""
        if self.deployed:
            return self._deployed_kernel_bias()
        kernel, bias = norms.fuse_norm(self._output_major(self.weight_gen()), self.bn)
        return self._output_major(kernel), bias

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


def _flat_centre(kernel: Tuple[int, ...]) -> int:
    """Flat index of the centre tap (:func:`acnet.transforms.centre_offsets`) of a kernel of size ``kernel``
    (``taps // 2`` for odd sizes)."""
    index = 0
    for k, o in zip(kernel, transforms.centre_offsets(kernel)):
        index = index * k + o
    return index


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

    Shapes (2-d; N-d alike with ``K`` the kernel's sizes): ``W0 (O, C/g, K, K)``; ``a, f, e (O, C/g, 1, 1)``;
    ``c1 (D, C/g, 1, 1)``; ``c2 (O, D/g, K, K)``; ``dw (m*C, 1, K, K)``; ``pw (O, m*C/g, 1, 1)``; ``vector (6, O)``;
    constants ``A (K, K)``, ``P (O, K, K)``, ``I`` like ``c1``. With ``G = dL/dW``: ``dL/dW0 = v0*G``,
    ``dL/da = v1 * <G, A>_taps``, ``dL/df = v2 * <G, P>_taps``, ``dL/de = v4 * G[centre]``,
    ``dL/dv_b = <G, B_b>`` per output channel (``B_b`` the unscaled branch kernel); the two products
    (``1x1-KxK``, depthwise-pointwise) are batched matrix products whose gradients are two more each.
    The products are the only work that grows with the channels: ``3 * O * D * (C/g) * K^2``
    multiply-adds per step for the 1x1-KxK branch, independent of the batch.
    """

    @staticmethod
    def forward(ctx, origin, avg_conv, prior_conv, centre, idconv1, conv2, dw, pw, vector, avg_kernel, prior,
                identity, groups, centre_tap):
        with _no_autocast(origin.device.type):
            out_ch, c_g = origin.shape[:2]
            taps, g = math.prod(origin.shape[2:]), groups
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
            kernel[:, :, centre_tap].addcmul_(centre.view(out_ch, c_g), vector[4].view(out_ch, 1))
        # Only inputs are saved (parameters and constants): the kernel-sized intermediates are
        # recomputed or avoided in backward, so the block holds no memory beyond the conv's own.
        ctx.save_for_backward(origin, avg_conv, prior_conv, centre, idconv1, conv2, dw, pw, vector, avg_kernel,
                              prior, identity)
        ctx.groups, ctx.centre_tap = groups, centre_tap
        return kernel.view(origin.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        origin, avg_conv, prior_conv, centre, idconv1, conv2, dw, pw, vector, avg_kernel, prior, identity = \
            ctx.saved_tensors
        g = ctx.groups
        with _no_autocast(grad.device.type):
            out_ch, c_g = origin.shape[:2]
            taps, o_g, m = math.prod(origin.shape[2:]), out_ch // g, dw.shape[0] // (c_g * g)
            grad = grad.contiguous().view(out_ch, c_g, taps)  # a channels_last conv gives an NHWC-strided one
            v = vector.view(6, out_ch, 1, 1)
            grad_vector = torch.empty_like(vector)
            grad_vector[0] = (grad * origin.view(out_ch, c_g, taps)).sum((1, 2))
            grad_origin = (grad * v[0]).view(origin.shape)
            # the fixed-pattern branches: <G, pattern> over the taps, per (o, c)
            on_avg = torch.mv(grad.view(-1, taps), avg_kernel.reshape(taps)).view(out_ch, c_g)
            on_prior = torch.bmm(grad, prior.reshape(out_ch, taps, 1)).view(out_ch, c_g)
            on_centre = grad[:, :, ctx.centre_tap]
            grads = []
            for row, on, weight in ((1, on_avg, avg_conv), (2, on_prior, prior_conv), (4, on_centre, centre)):
                grad_vector[row] = (on * weight.view(out_ch, c_g)).sum(1)
                grads.append((on * vector[row].view(out_ch, 1)).view(weight.shape))
            # 1x1 then KxK, v3*M(first, conv2) = M(first, v3*conv2): d/d first from the scaled conv2;
            # H = dL/d(v3*conv2) is the unscaled gradient of conv2, and <G, M>_o = <H, conv2>_o.
            first = idconv1 + identity
            scale3 = vector[3].view(out_ch, *([1] * (origin.dim() - 1)))
            grad_first, on_conv2 = _merge_1x1_kxk_backward(grad.view(origin.shape), first, conv2 * scale3, g)
            grad_vector[3] = (on_conv2 * conv2).flatten(1).sum(1)
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
        return (grad_origin, *grads, grad_first, grad_conv2, grad_dw, grad_pw, grad_vector, None, None, None, None,
                None)


def _merge_1x1_kxk_backward(grad: Tensor, first: Tensor, conv2: Tensor, groups: int) -> Tuple[Tensor, Tensor]:
    """Gradients ``(d/d first, d/d conv2)`` of :func:`acnet.transforms.merge_1x1_kxk_kernel` for ``grad``."""
    if transforms.merge_by_conv(first, conv2, groups):
        nd = conv2.dim() - 2
        grad_conv2, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad, conv2, first.transpose(0, 1), None, [1] * nd, [0] * nd, [1] * nd, False, [0] * nd, 1,
            [True, True, False])
        return grad_weight.transpose(0, 1).reshape(first.shape), grad_conv2
    out_ch, d_g = conv2.shape[:2]
    c_g, o_g, taps = first.shape[1], out_ch // groups, math.prod(conv2.shape[2:])
    grad_t = grad.reshape(groups, o_g, c_g, taps).transpose(1, 2).reshape(groups, c_g, o_g * taps)
    first_g = first.view(groups, d_g, c_g)
    grad_conv2 = torch.bmm(first_g, grad_t).view(groups, d_g, o_g, taps).transpose(1, 2).reshape(conv2.shape)
    conv2_t = conv2.view(groups, o_g, d_g, taps).transpose(1, 2).reshape(groups, d_g, o_g * taps)
    grad_first = torch.bmm(conv2_t, grad_t.transpose(1, 2)).view(first.shape)
    return grad_first, grad_conv2
