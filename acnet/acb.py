"""ACNet's Asymmetric Convolution Block (ACB): a K kernel plus a 1-D kernel along each axis of size > 1, fused
into one conv.

Branch alignment. With padding ``p``, dilation ``d`` and ``c = (K - 1) // 2`` on an axis (``K // 2`` for an
odd ``K``; for an even one the tap ``padding="same"`` puts over the output pixel), output pixel ``i`` of
the K conv reads the padded input at ``s*i + d*a`` on that axis; its centre line is ``a = c``, i.e. padded
index ``s*i + d*c``. A 1-D branch sliding along another axis must read exactly that line, so it pads this
axis by ``p - d*c`` before and ``p - d*(K - 1 - c)`` after; a negative amount crops the input instead
(:func:`acnet.block.branch_window`). Transposed (``transposed=True``): each 1-D branch is a transposed
conv whose output is cropped or zero-padded to the same place in the block's output window, followed by
its norm. The same
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
from .block import (IntOrPair, ReparamBlock, stored_dim_option, stored_norm_option, apply_input_window, apply_output_window,
                    branch_window, conv_window_padding, transposed_window_padding)
from .fastpath import branch_bn_sum, branch_input, match_layout

__all__ = ["ACBlock", "AsymConvBlock", "ACB_AXIS_NAMES"]

#: Name of the 1-D branch along each axis (``<name>_conv`` / ``<name>_bn``), by dimension.
ACB_AXIS_NAMES: Dict[int, Tuple[str, ...]] = {2: ("ver", "hor"), 3: ("dep", "ver", "hor")}


class ACBlock(ReparamBlock):
    """Asymmetric Convolution Block (ACNet, ICCV 2019), state-dict compatible with the original.

    Training form: ``square_bn(square_conv(x)) + ver_bn(ver_conv(x)) + hor_bn(hor_conv(x))`` with a
    KxK, a Kx1 and a 1xK bias-free conv (3-d: also ``dep_conv`` / ``dep_bn``). Deploy form
    (:meth:`switch_to_deploy`): ``fused_conv`` holding ``sum_i s_i * k_i`` (each 1-D kernel on its centre
    line) and bias ``sum_i t_i`` (``(s_i, t_i)`` each branch norm's eval-mode scale and shift).

    Arguments as in the original ``ACBlock``; ``kernel_size`` >= 2 on at least two axes (any size per
    axis, even sizes too); ``transposed`` / ``output_padding`` / ``bias``: the forms of
    :class:`~acnet.block.ReparamBlock`. ``use_affine``: affine BNs; ``reduce_gamma``: all branch norm weights start at 1/3;
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
        transposed: bool = False,
        output_padding: IntOrPair = 0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self._init_geometry(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode,
            dim=dim, norm=norm, min_kernel=1, transposed=transposed, output_padding=output_padding, bias=bias,
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
        centre = tuple(di * o for o, di in zip(transforms.centre_offsets(k), d))
        #   p >= d*c: the 1-D branches pad less; otherwise they crop the input (original: ``crop``).
        crops = tuple(max(c - pi, 0) for c, pi in zip(centre, p))
        self.crop_nd = crops
        self.crop = crops[0] if len(set(crops)) == 1 else crops
        self.side_axes = tuple(a for a, ka in enumerate(k) if ka > 1)
        if deploy:
            self.fused_conv = self._empty_deploy_conv(torch.get_default_dtype(), torch.device("cpu"))
            return
        norm_kw = dict(eps=bn_eps, momentum=bn_momentum, affine=use_affine, bias=bias)
        self.square_conv = self._make_conv(in_channels, out_channels, k, padding=p,
                                           output_padding=self.output_padding_nd, padding_mode=padding_mode)
        self.square_bn = norms.make_norm(norm, out_channels, dim, main=True, **norm_kw)
        self._side_windows = []  # per 1-D branch: the input (conv) / output (transposed) window, or None
        for a in self.side_axes:
            kernel, offsets = self._side_kernel(a)
            window = branch_window(k, kernel, offsets, p, d, self.output_padding_nd if transposed else None)
            if transposed:
                pad, extra, window = transposed_window_padding(window, self.stride_nd, d)
                conv = self._make_conv(in_channels, out_channels, kernel, padding=pad, output_padding=extra)
            else:
                pad, window = conv_window_padding(window)
                conv = self._make_conv(in_channels, out_channels, kernel, padding=pad, padding_mode=padding_mode)
            setattr(self, f"{self._side_name(a)}_conv", conv)
            self._side_windows.append(window)
        for a in self.side_axes:
            setattr(self, f"{self._side_name(a)}_bn", norms.make_norm(norm, out_channels, dim, main=False, **norm_kw))
        if reduce_gamma:
            self.init_gamma(1.0 / 3)
        if gamma_init is not None:
            self.init_gamma(gamma_init)

    @classmethod
    def unsupported(cls, *, dim, kernel_size, stride, padding, dilation, groups, padding_mode, norm,
                    transposed: bool = False, bias: bool = True) -> Optional[str]:
        reason = super().unsupported(dim=dim, kernel_size=kernel_size, stride=stride, padding=padding,
                                     dilation=dilation, groups=groups, padding_mode=padding_mode, norm=norm,
                                     transposed=transposed, bias=bias)
        if reason is not None:
            return reason
        if dim == 1:
            return "ACB on a 1-D conv: its 1xK/Kx1 branches would duplicate the KxK one"
        shown = "x".join(map(str, kernel_size))
        if sum(k > 1 for k in kernel_size) < 2:
            return f"ACB on a {shown} kernel: it needs two axes of size > 1 (its 1-D branch would duplicate the kernel)"
        return None

    def _side_kernel(self, axis: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        """``(kernel, offsets)`` of the 1-D branch along ``axis``: the full size on that axis, 1 elsewhere,
        on the centre line (:func:`acnet.transforms.centre_offsets`; row ``(K - 1) // 2`` for an even ``K``)."""
        centre = transforms.centre_offsets(self.kernel_nd)
        kernel = tuple(ka if b == axis else 1 for b, ka in enumerate(self.kernel_nd))
        offsets = tuple(0 if b == axis else c for b, c in enumerate(centre))
        return kernel, offsets

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
                if norm.bias is not None:
                    norm.bias.fill_(0.0)
            if norms.trainable_norm(self.square_bn):
                self.square_bn.weight.fill_(1.0)

    @classmethod
    def stored_options(cls, state: Mapping[str, Tensor], in_channels: int) -> Dict[str, object]:
        sides = [name for name in ("dep", "ver", "hor") if f"{name}_conv.weight" in state]
        options: Dict[str, object] = {"use_affine": any(f"{name}_bn.weight" in state for name in sides)}
        options.update(stored_dim_option(state, "square_conv.weight"))
        options.update(stored_norm_option(state, "square_bn", f"{sides[0]}_bn" if sides else None))
        return options

    # --- forward ----------------------------------------------------------------------------
    def _side_inputs(self, x: Tensor) -> Tuple[Tensor, ...]:
        """Inputs of the 1-D branches of a conv block: each windowed (cropped by ``crop`` on the axes it does
        not slide on, or padded asymmetrically for an even kernel; :func:`acnet.block.branch_window`)."""
        return tuple(x if window is None else apply_input_window(x, window, self.padding_mode)
                     for window in self._side_windows)

    def forward(self, x: Tensor) -> Tensor:
        if self.deployed:
            return self.fused_conv(x)
        y = branch_input(x, self.branches_nhwc())
        if self.transposed:
            sides = tuple(conv(y) if window is None else apply_output_window(conv(y), window)
                          for conv, window in zip(self._side_convs(), self._side_windows))
        else:
            sides = tuple(conv(t) for conv, t in zip(self._side_convs(), self._side_inputs(y)))
        return match_layout(branch_bn_sum((self.square_conv(y),) + sides, self._branch_bns()), x)

    # --- fusion -----------------------------------------------------------------------------
    def get_equivalent_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        """``k = s_sq*k_sq + sum_axes place(s_a*k_a)``, ``b = t_sq + sum_axes t_a`` (norm scale s, shift t;
        each 1-D kernel on its centre line; a transposed block's kernel in ``ConvTranspose`` layout)."""
        if self.deployed:
            return self._deployed_kernel_bias()
        kernel, bias = norms.fuse_norm(self._output_major(self.square_conv.weight), self.square_bn)
        for a, conv, norm in zip(self.side_axes, self._side_convs(), self._side_norms()):
            k_side, b_side = norms.fuse_norm(self._output_major(conv.weight), norm)
            kernel = kernel + transforms.place_kernel(k_side, self.kernel_nd, self._side_kernel(a)[1])
            bias = bias + b_side
        return self._output_major(kernel), bias

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
