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

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import init

from . import transforms
from .base import IntOrPair, ReparamBlock

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
        k, g, c_g = self.kernel_size, groups, in_channels // groups
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
        """The merged kernel ``W`` (``(O, C/g, K, K)``) of the six scaled branches; differentiable."""
        self._training_form()
        v = self.vector.unsqueeze(2).unsqueeze(3).unsqueeze(4)  # (6, O, 1, 1, 1)
        g, k = self.groups, self.kernel_size
        # The three branches with a fixed spatial pattern: 1x1 weights times (K, K) maps.
        kernel = torch.addcmul(self.weight_orepa_origin * v[0], self.weight_orepa_avg_conv * v[1],
                               self.weight_orepa_avg_avg)
        kernel = kernel.addcmul(self.weight_orepa_pfir_conv * v[2], self.weight_orepa_prior.unsqueeze(1))
        first = self.weight_orepa_1x1_kxk_idconv1 + self.id_tensor
        kernel = kernel + transforms.merge_1x1_kxk_kernel(first, self.weight_orepa_1x1_kxk_conv2 * v[3], g)
        pointwise = self.weight_orepa_gconv_pw
        if 1 < g < self.out_channels:
            pointwise = _original_pointwise_order(pointwise, g)
        pointwise = pointwise * v[5]
        kernel = kernel + transforms.merge_depthwise_pointwise(self.weight_orepa_gconv_dw, pointwise,
                                                               self.in_channels, g)
        centre = self.weight_orepa_1x1 * v[4]
        return kernel + (F.pad(centre, [k // 2] * 4) if k > 1 else centre)

    def _conv(self, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        if self.padding_mode != "zeros":
            x = F.pad(x, [self.padding] * 4, mode=self.padding_mode)
            return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        if self.deployed:
            return self.nonlinear(self.orepa_reparam(x))
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
