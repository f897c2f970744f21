"""ACNet's Asymmetric Convolution Block (ACB): a K kernel plus a 1-D kernel along each axis of size > 1, fused
into one conv.

Branch alignment. With padding ``p``, dilation ``d`` and ``c = K // 2`` on an axis, output pixel ``i`` of
the K conv reads the padded input at ``s*i + d*a`` on that axis; its centre line is ``a = c``, i.e. padded
index ``s*i + d*c``. A 1-D branch sliding along another axis must read exactly that line, so it pads this
axis by ``p - d*c``; when ``p < d*c`` the input is cropped by ``d*c - p`` instead. The same
``padding_mode`` is used everywhere: for reflect / replicate / circular, padding by fewer pixels yields
the central part of padding by more, and cropping one axis commutes with padding another, so every
branch reads exactly the padded input the fused conv reads.

Forms (``dim``, ``norm``): in 2-d the 1xK (``hor``) and Kx1 (``ver``) branches of the paper; in 3-d a
Kx1x1 (``dep``), 1xKx1 (``ver``) and 1x1xK (``hor``) branch, one per axis of size > 1 (a (1,3,3) kernel
gets (1,3,1) and (1,1,3)). A 1-d ACB is refused (its one branch would be the kernel itself), as is a
kernel with a single axis of size > 1. ``norm="frozen"``: the square branch ends in a frozen BN (the
pretrained pair), each 1-D branch in a learnable per-channel scale and shift (no statistics);
``norm="none"``: every branch ends in a learnable scale and shift (conv with bias). Conv biases add
after the conv, whatever the padding, so every form is exact at the borders.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from . import norms, transforms
from .block import IntOrPair, ReparamBlock, _dim_in, _norm_kind_in
from .fastpath import branch_bn_sum, branch_input

__all__ = ["ACBlock", "AsymConvBlock", "ACB_AXIS_NAMES"]

#: Name of the 1-D branch along each axis (``<name>_conv`` / ``<name>_bn``), by dimension.
ACB_AXIS_NAMES: Dict[int, Tuple[str, ...]] = {2: ("ver", "hor"), 3: ("dep", "ver", "hor")}


class ACBlock(ReparamBlock):
    """Asymmetric Convolution Block (ACNet, ICCV 2019), state-dict compatible with the original.

    Training form: ``square_bn(square_conv(x)) + ver_bn(ver_conv(x)) + hor_bn(hor_conv(x))`` with a
    KxK, a Kx1 and a 1xK bias-free conv (3-d: also ``dep_conv`` / ``dep_bn``). Deploy form
    (:meth:`switch_to_deploy`): ``fused_conv`` holding ``sum_i s_i * k_i`` (each 1-D kernel on its centre
    line) and bias ``sum_i t_i`` (``(s_i, t_i)`` each branch norm's eval-mode scale and shift).

    Arguments as in the original ``ACBlock``; ``kernel_size`` odd (>= 3 on at least two axes, any odd
    size per axis). ``use_affine``: affine BNs; ``reduce_gamma``: all branch norm weights start at 1/3;
    ``gamma_init``: all start at this value (a frozen norm is never changed). ``bn_eps`` /
    ``bn_momentum`` configure the BNs; ``dim`` / ``norm`` choose the form (module docstring).

    The frozen form (``norm="frozen"``): what normalises each branch -- the square branch: a
    :class:`~acnet.norms.FrozenBatchNorm` (buffers, the pretrained BN); each 1-D branch: a
    :class:`~acnet.norms.ChannelAffine` (learnable scale and shift, no statistics). Trainable: every
    conv weight and the 1-D branches' scales and shifts; nothing depends on the batch.
    """

    signature = "square_conv.weight"
    recipe_options = ("gamma_init",)

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
        dim: int = 2,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        self._init_geometry(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode,
            dim=dim, norm=norm, min_kernel=3, odd_kernel=True,
        )
        if reduce_gamma and gamma_init is not None:
            raise ValueError("ACBlock: give at most one of reduce_gamma=True and gamma_init")
        if (reduce_gamma or gamma_init is not None) and not use_affine:
            raise ValueError("ACBlock: reduce_gamma / gamma_init need use_affine=True (BN weights to initialise)")
        if not use_affine and norm != "batch":
            raise ValueError(f"ACBlock: use_affine=False needs norm='batch' (the {norm!r} form's branch scales "
                             "are its affine parameters)")
        self.use_affine = use_affine
        k, p, d = self.kernel_nd, self.padding_nd, self.dilation_nd
        centre = tuple(di * (ki // 2) for ki, di in zip(k, d))
        #   p >= d*(K//2): the 1-D branches pad less; otherwise they crop the input (original: ``crop``).
        crops = tuple(max(c - pi, 0) for c, pi in zip(centre, p))
        side_pads = tuple(max(pi - c, 0) for c, pi in zip(centre, p))
        self.crop_nd = crops
        self.crop = crops[0] if len(set(crops)) == 1 else crops
        self.side_axes = tuple(a for a, ka in enumerate(k) if ka > 1)
        if deploy:
            self.fused_conv = self._empty_deploy_conv(torch.get_default_dtype(), torch.device("cpu"))
            return
        conv_cls = norms.conv_class(dim)
        common = dict(stride=self.stride, dilation=self.dilation, groups=groups, bias=False, padding_mode=padding_mode)
        norm_kw = dict(eps=bn_eps, momentum=bn_momentum, affine=use_affine)
        self.square_conv = conv_cls(in_channels, out_channels, k, padding=p, **common)
        self.square_bn = norms.make_norm(norm, out_channels, dim, main=True, **norm_kw)
        for a in self.side_axes:
            kernel = tuple(ka if b == a else 1 for b, ka in enumerate(k))
            pad = tuple(pb if b == a else side_pads[b] for b, pb in enumerate(p))
            setattr(self, f"{self._side_name(a)}_conv", conv_cls(in_channels, out_channels, kernel, padding=pad, **common))
        for a in self.side_axes:
            setattr(self, f"{self._side_name(a)}_bn", norms.make_norm(norm, out_channels, dim, main=False, **norm_kw))
        if reduce_gamma:
            self.init_gamma(1.0 / 3)
        if gamma_init is not None:
            self.init_gamma(gamma_init)

    @classmethod
    def unsupported(cls, *, dim, kernel_size, stride, padding, dilation, groups, padding_mode, norm) -> Optional[str]:
        reason = super().unsupported(dim=dim, kernel_size=kernel_size, stride=stride, padding=padding,
                                     dilation=dilation, groups=groups, padding_mode=padding_mode, norm=norm)
        if reason is not None:
            return reason
        if dim == 1:
            return "ACB on a 1-D conv: its 1xK/Kx1 branches would duplicate the KxK one"
        shown = "x".join(map(str, kernel_size))
        if sum(k > 1 for k in kernel_size) < 2:
            return f"ACB on a {shown} kernel: it needs two axes of size > 1 (its 1-D branch would duplicate the kernel)"
        if any(k % 2 == 0 for k in kernel_size):
            return f"ACB on a {shown} kernel: needs odd sizes (the 1-D branches sit on the centre lines)"
        return None

    def _side_name(self, axis: int) -> str:
        return ACB_AXIS_NAMES[self.dim][axis]

    # --- state ------------------------------------------------------------------------------
    def _side_convs(self) -> Tuple[nn.Module, ...]:
        return tuple(getattr(self, f"{self._side_name(a)}_conv") for a in self.side_axes)

    def _side_norms(self) -> Tuple[nn.Module, ...]:
        return tuple(getattr(self, f"{self._side_name(a)}_bn") for a in self.side_axes)

    def _branch_bns(self) -> Tuple[nn.Module, ...]:
        if self.deployed:
            raise RuntimeError("ACBlock: the block is deployed; its branches and BNs are gone")
        return (self.square_bn,) + self._side_norms()

    def main_branch(self) -> Tuple[Tensor, nn.Module]:
        """``(square_conv.weight, square_bn)``."""
        self._branch_bns()
        return self.square_conv.weight, self.square_bn

    def init_gamma(self, gamma_value: float) -> None:
        """Set the weight of every branch norm to ``gamma_value`` (a frozen square norm is left as it is)."""
        if not self.use_affine:
            raise ValueError("ACBlock.init_gamma: the BNs have no weight (use_affine=False)")
        with torch.no_grad():
            for norm in self._trainable_norms(self._branch_bns()):
                norm.weight.fill_(gamma_value)

    def single_init(self) -> None:
        """Square branch norm weight 1 (a frozen one unchanged), 1-D branch norms' weights and biases 0: the block starts as a
        plain conv-norm; the 1-D branches' scales still get gradients, their convs from the next step on."""
        if not self.use_affine:
            raise ValueError("ACBlock.single_init: the BNs have no weight (use_affine=False)")
        with torch.no_grad():
            for norm in self._side_norms():  # scale and shift 0: the branch adds exactly zero
                norm.weight.fill_(0.0)
                norm.bias.fill_(0.0)
            if norms.trainable_norm(self.square_bn):
                self.square_bn.weight.fill_(1.0)

    @classmethod
    def stored_options(cls, state: Mapping[str, Tensor], in_channels: int) -> Dict[str, object]:
        sides = [name for name in ("dep", "ver", "hor") if f"{name}_conv.weight" in state]
        options: Dict[str, object] = {"use_affine": any(f"{name}_bn.weight" in state for name in sides)}
        options.update(_dim_in(state, "square_conv.weight"))
        options.update(_norm_kind_in(state, "square_bn", f"{sides[0]}_bn" if sides else None))
        return options

    # --- forward ----------------------------------------------------------------------------
    def _side_inputs(self, x: Tensor) -> Tuple[Tensor, ...]:
        """Inputs of the 1-D branches (each cropped by ``crop`` on the axes it does not slide on)."""
        if not any(self.crop_nd):
            return (x,) * len(self.side_axes)
        inputs = []
        for a in self.side_axes:
            index = [slice(None), slice(None)]
            index += [slice(None) if b == a or c == 0 else slice(c, -c) for b, c in enumerate(self.crop_nd)]
            inputs.append(x[tuple(index)])
        return tuple(inputs)

    def forward(self, x: Tensor) -> Tensor:
        if self.deployed:
            return self.fused_conv(x)
        x = branch_input(x, self.branches_nhwc())
        outputs = (self.square_conv(x),) + tuple(conv(t) for conv, t in zip(self._side_convs(), self._side_inputs(x)))
        return branch_bn_sum(outputs, self._branch_bns())

    # --- fusion -----------------------------------------------------------------------------
    def get_equivalent_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        """``k = s_sq*k_sq + sum_axes pad(s_a*k_a)``, ``b = t_sq + sum_axes t_a`` (norm scale s, shift t)."""
        if self.deployed:
            return self.fused_conv.weight, self.fused_conv.bias
        kernel, bias = norms.fuse_norm(self.square_conv.weight, self.square_bn)
        for conv, norm in zip(self._side_convs(), self._side_norms()):
            k_side, b_side = norms.fuse_norm(conv.weight, norm)
            kernel = transforms.add_to_centre(kernel, k_side)
            bias = bias + b_side
        return kernel, bias

    def switch_to_deploy(self) -> None:
        """Fuse into ``fused_conv`` and drop the branches (idempotent)."""
        if self.deployed:
            return
        fused = self.make_deploy_conv()
        names = ["square_conv", "square_bn"] + [f"{self._side_name(a)}_{part}" for a in self.side_axes
                                                 for part in ("conv", "bn")]
        for name in names:
            delattr(self, name)
        self.fused_conv = fused


AsymConvBlock = ACBlock
