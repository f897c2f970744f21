"""ACNet's Asymmetric Convolution Block (ACB): KxK + 1xK + Kx1 conv-BN branches, fused into one KxK conv.

Branch alignment. With padding ``p``, dilation ``d`` and ``c = K // 2``, output pixel ``(i, j)`` of
the KxK conv reads the padded input at rows ``s*i + d*a`` and columns ``s*j + d*b``; its centre row
is ``a = c``, i.e. padded row ``s*i + d*c``. The 1xK branch must read exactly that row, so it pads
rows by ``p - d*c`` (columns by ``p``); the Kx1 branch does the same with the axes swapped. When
``p < d*c`` the input is cropped by ``d*c - p`` rows (columns) instead. The same ``padding_mode``
is used everywhere: for reflect / replicate / circular, padding by fewer pixels yields the central
part of padding by more, and cropping rows commutes with padding columns, so the three branches
read exactly the padded input the fused conv reads.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import transforms
from .base import IntOrPair, ReparamBlock, branch_bn_sum, branch_input

__all__ = ["ACBlock", "AsymConvBlock"]


class ACBlock(ReparamBlock):
    """Asymmetric Convolution Block (ACNet, ICCV 2019), state-dict compatible with the original.

    Training form: ``square_bn(square_conv(x)) + ver_bn(ver_conv(x)) + hor_bn(hor_conv(x))`` with a
    KxK, a Kx1 and a 1xK bias-free conv. Deploy form (:meth:`switch_to_deploy`): ``fused_conv``
    holding ``sum_i s_i * k_i`` (1xK / Kx1 on the centre row / column) and bias ``sum_i t_i``.

    Arguments as in the original ``ACBlock``; ``kernel_size`` is an odd int >= 3. ``use_affine``:
    affine BNs; ``reduce_gamma``: all BN weights start at 1/3; ``gamma_init``: all BN weights start
    at this value. ``bn_eps`` / ``bn_momentum`` configure the three BNs.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: IntOrPair = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        deploy: bool = False,
        use_affine: bool = True,
        reduce_gamma: bool = False,
        gamma_init: Optional[float] = None,
        *,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self._init_geometry(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode,
            min_kernel=3, odd_kernel=True,
        )
        if reduce_gamma and gamma_init is not None:
            raise ValueError("ACBlock: give at most one of reduce_gamma=True and gamma_init")
        if (reduce_gamma or gamma_init is not None) and not use_affine:
            raise ValueError("ACBlock: reduce_gamma / gamma_init need use_affine=True (BN weights to initialise)")
        self.use_affine = use_affine
        k, p, d = self.kernel_size, self.padding, self.dilation
        centre_offset = d * (k // 2)
        #   p >= d*(K//2): the side branches pad less; otherwise they crop the input (original: ``crop``).
        self.crop = max(centre_offset - p, 0)
        side_pad = max(p - centre_offset, 0)
        if deploy:
            self.fused_conv = self._empty_deploy_conv(torch.get_default_dtype(), torch.device("cpu"))
            return
        common = dict(stride=self.stride, dilation=d, groups=groups, bias=False, padding_mode=padding_mode)
        self.square_conv = nn.Conv2d(in_channels, out_channels, (k, k), padding=p, **common)
        self.square_bn = nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum, affine=use_affine)
        self.ver_conv = nn.Conv2d(in_channels, out_channels, (k, 1), padding=(p, side_pad), **common)
        self.hor_conv = nn.Conv2d(in_channels, out_channels, (1, k), padding=(side_pad, p), **common)
        self.ver_bn = nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum, affine=use_affine)
        self.hor_bn = nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum, affine=use_affine)
        if reduce_gamma:
            self.init_gamma(1.0 / 3)
        if gamma_init is not None:
            self.init_gamma(gamma_init)

    # --- state ------------------------------------------------------------------------------
    def _branch_bns(self) -> Tuple[nn.BatchNorm2d, ...]:
        if self.deployed:
            raise RuntimeError("ACBlock: the block is deployed; its branches and BNs are gone")
        return self.square_bn, self.ver_bn, self.hor_bn

    def init_gamma(self, gamma_value: float) -> None:
        """Set the BN weight of all three branches to ``gamma_value``."""
        if not self.use_affine:
            raise ValueError("ACBlock.init_gamma: the BNs have no weight (use_affine=False)")
        with torch.no_grad():
            for bn in self._branch_bns():
                bn.weight.fill_(gamma_value)

    def single_init(self) -> None:
        """Square branch BN weight 1, side branches 0: the block starts as a plain conv-BN."""
        if not self.use_affine:
            raise ValueError("ACBlock.single_init: the BNs have no weight (use_affine=False)")
        self.init_gamma(0.0)
        with torch.no_grad():
            self.square_bn.weight.fill_(1.0)

    # --- forward ----------------------------------------------------------------------------
    def _side_inputs(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Inputs of the Kx1 and 1xK branches (cropped by ``crop`` on the axis they do not slide on)."""
        if self.crop > 0:
            c = self.crop
            return x[:, :, :, c:-c], x[:, :, c:-c, :]
        return x, x

    def forward(self, x: Tensor) -> Tensor:
        if self.deployed:
            return self.fused_conv(x)
        x = branch_input(x, self.branches_nhwc())
        ver_input, hor_input = self._side_inputs(x)
        outputs = (self.square_conv(x), self.ver_conv(ver_input), self.hor_conv(hor_input))
        return branch_bn_sum(outputs, self._branch_bns())

    # --- fusion -----------------------------------------------------------------------------
    def get_equivalent_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        """``k = s_sq*k_sq + pad(s_ver*k_ver) + pad(s_hor*k_hor)``, ``b = t_sq + t_ver + t_hor`` (BN scale s, shift t)."""
        if self.deployed:
            return self.fused_conv.weight, self.fused_conv.bias
        k_sq, b_sq = transforms.fuse_bn(self.square_conv.weight, self.square_bn)
        k_ver, b_ver = transforms.fuse_bn(self.ver_conv.weight, self.ver_bn)
        k_hor, b_hor = transforms.fuse_bn(self.hor_conv.weight, self.hor_bn)
        kernel = transforms.add_to_centre(transforms.add_to_centre(k_sq, k_ver), k_hor)
        return kernel, b_sq + b_ver + b_hor

    def switch_to_deploy(self) -> None:
        """Fuse into ``fused_conv`` and drop the branches (idempotent)."""
        if self.deployed:
            return
        fused = self.make_deploy_conv()
        for name in ("square_conv", "square_bn", "ver_conv", "ver_bn", "hor_conv", "hor_bn"):
            delattr(self, name)
        self.fused_conv = fused


AsymConvBlock = ACBlock
