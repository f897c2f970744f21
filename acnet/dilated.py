"""Dilated re-parameterization of a large kernel (RepLKNet, CVPR 2022; UniRepLKNet, CVPR 2024).

A large KxK conv (usually depthwise) is trained beside small and dilated small convs, each ending in its
own norm; they all merge into the KxK kernel: a ``k`` kernel with dilation ``r`` is the sparse dense kernel
of size ``r * (k - 1) + 1`` (:func:`acnet.transforms.dilate_kernel`), placed at the centre of the large
one (:func:`acnet.transforms.place_kernel`).

Branches: ``lk_origin`` (the KxK conv) with ``origin_bn``, and for each ``(k, r)`` of the table a
``dil_conv_k{k}_{r}`` conv with ``dil_bn_k{k}_{r}`` -- UniRepLKNet's names and default table
(:data:`UNIREPLKNET_BRANCHES`: K=5: (3,1), (3,2); K=7: (5,1), (3,2), (3,3); ... K=17; a larger K takes the
K=17 table). RepLKNet's "large + small kernel" (``lkb_origin`` + ``small_conv``) is the one-branch table
``((small_kernel, 1),)`` (``small_kernel=``); :func:`replknet_scheme` / :func:`unireplknet_scheme`
translate the originals' state dicts.

Geometry. A cubic odd kernel K >= 5 (``unsupported()`` says why otherwise); any stride, padding
(the branches read the centre of the block's window, cropping or padding their input as
:func:`acnet.block.branch_window` says), padding mode, groups (depthwise or dense) and block dilation ``d``
(a branch then has dilation ``r * d``); ``dim`` 1, 2, 3. ``transposed=True``: each branch a transposed conv,
its output cropped / zero-padded to its place in the block's output window (as ACB's 1-D branches).
Norm kinds: ``"batch"`` (the papers'), ``"frozen"`` (``origin_bn`` a frozen BN, each branch a learnable
per-channel scale and shift), ``"none"`` (every branch a learnable scale and shift; ``bias=False``: no shifts).
"""
from __future__ import annotations

import re
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import norms, transforms
from .block import (IntOrTuple, ReparamBlock, stored_dim_option, stored_norm_option, apply_input_window, apply_output_window,
                    branch_window, conv_window_padding, transposed_window_padding)
from .fastpath import branch_bn_sum, branch_input, match_layout
from .schemes import NamingScheme, Rule

__all__ = ["DilatedReparamBlock", "UNIREPLKNET_BRANCHES", "default_branches", "unireplknet_scheme",
           "replknet_scheme"]

#: UniRepLKNet's ``(kernel_sizes, dilates)`` per large kernel size (``DilatedReparamBlock.__init__``).
UNIREPLKNET_BRANCHES: Dict[int, Tuple[Tuple[int, int], ...]] = {
    5: ((3, 1), (3, 2)),
    7: ((5, 1), (3, 2), (3, 3)),
    9: ((5, 1), (5, 2), (3, 3), (3, 4)),
    11: ((5, 1), (5, 2), (3, 3), (3, 4), (3, 5)),
    13: ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5)),
    15: ((5, 1), (7, 2), (3, 3), (3, 5), (3, 7)),
    17: ((5, 1), (9, 2), (3, 4), (3, 5), (3, 7)),
}
MIN_KERNEL = 5
_BRANCH_NAME = re.compile(r"^dil_conv_k(\d+)_(\d+)\.weight$")


def default_branches(kernel_size: int) -> Tuple[Tuple[int, int], ...]:
    """UniRepLKNet's ``(k, r)`` table for an odd ``kernel_size`` >= 5 (the K=17 table above 17; K=19, 21 ...
    are not in the original, whose table stops at 17)."""
    if kernel_size < MIN_KERNEL or kernel_size % 2 == 0:
        raise ValueError(f"dilated re-param needs an odd kernel_size >= {MIN_KERNEL}, got {kernel_size}")
    table = UNIREPLKNET_BRANCHES.get(kernel_size)
    if table is None:
        table = UNIREPLKNET_BRANCHES[max(k for k in UNIREPLKNET_BRANCHES if k <= kernel_size)]
    return table


class DilatedReparamBlock(ReparamBlock):
    """UniRepLKNet's Dilated Reparam Block for any conv geometry; deploy form ``lkb_reparam`` (RepLKNet's name).

    Training form: ``origin_bn(lk_origin(x)) + sum_(k,r) dil_bn_k{k}_{r}(dil_conv_k{k}_{r}(x))``; eval mode
    equals one conv with kernel ``s0 * W + sum place(dilate(s_b * w_b, r))`` and bias ``t0 + sum t_b``
    (``(s, t)`` each norm's scale and shift). ``kernel_sizes`` / ``dilates``: the branches (default
    :func:`default_branches`); ``small_kernel``: RepLKNet's single undilated small branch instead. Each
    branch ``(k, r)``: odd ``k``, span ``r * (k - 1) + 1 <= K``, no pair twice.
    """

    deploy_conv_name = "lkb_reparam"
    signature = "origin_bn.weight"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple,
        stride: IntOrTuple = 1,
        padding: Optional[IntOrTuple] = None,
        dilation: IntOrTuple = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        deploy: bool = False,
        kernel_sizes: Optional[Sequence[int]] = None,
        dilates: Optional[Sequence[int]] = None,
        small_kernel: Optional[int] = None,
        *,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
        dim: int = 2,
        norm: str = "batch",
        transposed: bool = False,
        output_padding: IntOrTuple = 0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if padding is None:  # the originals' "same" padding (the block contract's rule)
            padding = self.same_padding(kernel_size, dilation, dim)
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode,
                            dim=dim, norm=norm, min_kernel=1, transposed=transposed, output_padding=output_padding,
                            bias=bias)
        big = self.kernel_nd[0]
        self.branches = self._branch_table(big, kernel_sizes, dilates, small_kernel)
        self.kernel_sizes = [k for k, _ in self.branches]
        self.dilates = [r for _, r in self.branches]
        if deploy:
            self.lkb_reparam = self._empty_deploy_conv(torch.get_default_dtype(), torch.device("cpu"))
            return
        k, p, d = self.kernel_nd, self.padding_nd, self.dilation_nd
        norm_kw = dict(eps=bn_eps, momentum=bn_momentum, bias=bias)
        self.lk_origin = self._make_conv(in_channels, out_channels, k, padding=p,
                                         output_padding=self.output_padding_nd, padding_mode=padding_mode)
        self.origin_bn = norms.make_norm(norm, out_channels, dim, main=True, **norm_kw)
        self._windows = []  # per branch: the input (conv) / output (transposed) window, or None
        for small, rate in self.branches:
            span = rate * (small - 1) + 1
            offsets = ((big - span) // 2,) * dim
            window = branch_window(k, (span,) * dim, offsets, p, d, self.output_padding_nd if transposed else None)
            branch_dilation = tuple(rate * di for di in d)
            if transposed:
                pad, extra, window = transposed_window_padding(window, self.stride_nd, branch_dilation)
                conv = self._make_conv(in_channels, out_channels, (small,) * dim, padding=pad, output_padding=extra,
                                       dilation=branch_dilation)
            else:
                pad, window = conv_window_padding(window)
                conv = self._make_conv(in_channels, out_channels, (small,) * dim, padding=pad,
                                       dilation=branch_dilation, padding_mode=padding_mode)
            setattr(self, f"dil_conv_k{small}_{rate}", conv)
            setattr(self, f"dil_bn_k{small}_{rate}", norms.make_norm(norm, out_channels, dim, main=False, **norm_kw))
            self._windows.append(window)

    @staticmethod
    def _branch_table(big: int, kernel_sizes, dilates, small_kernel) -> Tuple[Tuple[int, int], ...]:
        owner = "DilatedReparamBlock"
        if small_kernel is not None:
            if kernel_sizes is not None or dilates is not None:
                raise ValueError(f"{owner}: give either small_kernel (RepLKNet) or kernel_sizes/dilates, not both")
            table = ((small_kernel, 1),)
        elif kernel_sizes is None and dilates is None:
            table = default_branches(big)
        else:
            if kernel_sizes is None or dilates is None or len(kernel_sizes) != len(dilates):
                raise ValueError(f"{owner}: kernel_sizes and dilates must be given together, of the same length")
            table = tuple(zip(kernel_sizes, dilates))
        seen = set()
        for small, rate in table:
            if any(isinstance(v, bool) or not isinstance(v, int) for v in (small, rate)) or small < 1 or rate < 1:
                raise ValueError(f"{owner}: each branch needs an int kernel >= 1 and dilation >= 1, got {(small, rate)}")
            if small % 2 == 0:
                raise ValueError(f"{owner}: branch kernel {small} must be odd (it sits at the centre of the large one)")
            if rate * (small - 1) + 1 > big:
                raise ValueError(f"{owner}: a {small}-kernel with dilation {rate} spans {rate * (small - 1) + 1} "
                                 f"taps, more than kernel_size {big}")
            if (small, rate) in seen:
                raise ValueError(f"{owner}: branch (kernel {small}, dilation {rate}) given twice")
            seen.add((small, rate))
        return tuple(table)

    @classmethod
    def unsupported(cls, *, dim, kernel_size, stride, padding, dilation, groups, padding_mode, norm,
                    transposed: bool = False, bias: bool = True) -> Optional[str]:
        reason = super().unsupported(dim=dim, kernel_size=kernel_size, stride=stride, padding=padding,
                                     dilation=dilation, groups=groups, padding_mode=padding_mode, norm=norm,
                                     transposed=transposed, bias=bias)
        if reason is not None:
            return reason
        shown = "x".join(map(str, kernel_size))
        if len(set(kernel_size)) != 1:
            return f"dilated re-param on a {shown} kernel: it needs a cubic kernel (its branches are centred squares)"
        if kernel_size[0] < MIN_KERNEL or kernel_size[0] % 2 == 0:
            return (f"dilated re-param on a {shown} kernel: it needs an odd kernel >= {MIN_KERNEL} (smaller "
                    "kernels have no dilated branch; the papers use 7 to 31)")
        return None

    # --- state ------------------------------------------------------------------------------
    def _branch_convs(self) -> Tuple[nn.Module, ...]:
        return tuple(getattr(self, f"dil_conv_k{k}_{r}") for k, r in self.branches)

    def _side_norms(self) -> Tuple[nn.Module, ...]:
        return tuple(getattr(self, f"dil_bn_k{k}_{r}") for k, r in self.branches)

    def _branch_bns(self) -> Tuple[nn.Module, ...]:
        if self.deployed:
            raise RuntimeError("DilatedReparamBlock: the block is deployed; its branches and BNs are gone")
        return (self.origin_bn,) + self._side_norms()

    def main_branch(self) -> Tuple[Tensor, nn.Module]:
        """``(lk_origin.weight, origin_bn)``."""
        self._branch_bns()
        return self.lk_origin.weight, self.origin_bn

    def init_gamma(self, gamma_value: float) -> None:
        """Set every trainable branch norm's weight to ``gamma_value`` (a frozen ``origin_bn`` is left as it is)."""
        with torch.no_grad():
            for norm in self._trainable_norms(self._branch_bns()):
                norm.weight.fill_(gamma_value)

    def single_init(self) -> None:
        """Branch norms' weights and shifts 0 (the block equals ``origin_bn(lk_origin(x))``; their scales
        still get gradients, their convs from the next step on); a trainable ``origin_bn`` weight 1."""
        with torch.no_grad():
            for norm in self._side_norms():
                norm.weight.fill_(0.0)
                if norm.bias is not None:
                    norm.bias.fill_(0.0)
            if norms.trainable_norm(self.origin_bn):
                self.origin_bn.weight.fill_(1.0)

    @classmethod
    def stored_options(cls, state: Mapping[str, Tensor], in_channels: int) -> Dict[str, object]:
        found = [m for m in (_BRANCH_NAME.match(key) for key in state) if m]
        options: Dict[str, object] = {"kernel_sizes": [int(m.group(1)) for m in found],
                                      "dilates": [int(m.group(2)) for m in found]}
        options.update(stored_dim_option(state, "lk_origin.weight"))
        first = f"dil_bn_k{found[0].group(1)}_{found[0].group(2)}" if found else None
        options.update(stored_norm_option(state, "origin_bn", first))
        return options

    # --- forward ----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.deployed:
            return self.lkb_reparam(x)
        y = branch_input(x, self.branches_nhwc())
        outputs = [self.lk_origin(y)]
        for conv, window in zip(self._branch_convs(), self._windows):
            if self.transposed:
                out = conv(y)
                outputs.append(out if window is None else apply_output_window(out, window))
            else:
                outputs.append(conv(y if window is None else apply_input_window(y, window, self.padding_mode)))
        return match_layout(branch_bn_sum(outputs, self._branch_bns()), x)

    # --- fusion -----------------------------------------------------------------------------
    def get_equivalent_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        """``k = s0*W + sum place(dilate(s_b*w_b, r_b))``, ``b = t0 + sum t_b`` (a transposed block's kernel
        in ``ConvTranspose`` layout)."""
        if self.deployed:
            return self._deployed_kernel_bias()
        kernel, bias = norms.fuse_norm(self._output_major(self.lk_origin.weight), self.origin_bn)
        big = self.kernel_nd[0]
        for (small, rate), conv, norm in zip(self.branches, self._branch_convs(), self._side_norms()):
            k_branch, b_branch = norms.fuse_norm(self._output_major(conv.weight), norm)
            dense = transforms.dilate_kernel(k_branch, rate)
            offset = (big - dense.shape[-1]) // 2
            kernel = kernel + transforms.place_kernel(dense, self.kernel_nd, (offset,) * self.dim)
            bias = bias + b_branch
        return self._output_major(kernel), bias

    def switch_to_deploy(self) -> None:
        """Fuse into ``lkb_reparam`` and drop the branches (idempotent)."""
        if self.deployed:
            return
        fused = self.make_deploy_conv()
        for name in ["lk_origin", "origin_bn"] + [f"dil_{part}_k{k}_{r}" for k, r in self.branches
                                                  for part in ("conv", "bn")]:
            delattr(self, name)
        self.lkb_reparam = fused

    def extra_repr(self) -> str:
        return super().extra_repr() + f", branches={list(self.branches)}"


# --------------------------------------------------------------------------------------------
# the originals' block state dicts
# --------------------------------------------------------------------------------------------
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _shapes(block: nn.Module) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in block.state_dict().items()}


def _scheme(name: str, description: str, pairs: Sequence[Tuple[str, str]], block: DilatedReparamBlock
            ) -> NamingScheme:
    ours = _shapes(block)
    rules = tuple(Rule("copy", (theirs,), (own,)) for theirs, own in pairs if own in ours)
    return NamingScheme(name, description, rules, {r.theirs[0]: ours[r.ours[0]] for r in rules},
                        {r.ours[0]: ours[r.ours[0]] for r in rules})


def unireplknet_scheme(block: DilatedReparamBlock) -> NamingScheme:
    """AILab-CVC/UniRepLKNet's ``DilatedReparamBlock`` names for ``block`` (our names are theirs; the deploy
    form's ``lk_origin`` (with bias) is our ``lkb_reparam``). ``to_ours`` / ``from_ours`` translate a block
    state dict (training form, or deploy form for a deployed ``block``)."""
    if block.deployed:
        pairs = [("lk_origin.weight", "lkb_reparam.weight"), ("lk_origin.bias", "lkb_reparam.bias")]
    else:
        pairs = [(k, k) for k in block.state_dict()]
    return _scheme("unireplknet/DilatedReparamBlock", "UniRepLKNet's DilatedReparamBlock", pairs, block)


def replknet_scheme(block: DilatedReparamBlock) -> NamingScheme:
    """DingXiaoH/RepLKNet-pytorch's ``ReparamLargeKernelConv`` names (``lkb_origin.conv/bn``,
    ``small_conv.conv/bn``; deploy ``lkb_reparam``) for a block built with ``small_kernel=`` (one branch
    ``(small_kernel, 1)``)."""
    if block.deployed:
        pairs = [("lkb_reparam.weight", "lkb_reparam.weight"), ("lkb_reparam.bias", "lkb_reparam.bias")]
    else:
        if len(block.branches) > 1 or (block.branches and block.branches[0][1] != 1):
            raise ValueError("replknet_scheme: RepLKNet's block has one undilated small branch (small_kernel=)")
        pairs = [("lkb_origin.conv.weight", "lk_origin.weight")]
        pairs += [(f"lkb_origin.bn.{e}", f"origin_bn.{e}") for e in _BN]
        for small, _ in block.branches:
            pairs.append(("small_conv.conv.weight", f"dil_conv_k{small}_1.weight"))
            pairs += [(f"small_conv.bn.{e}", f"dil_bn_k{small}_1.{e}") for e in _BN]
    return _scheme("replknet/ReparamLargeKernelConv", "RepLKNet's ReparamLargeKernelConv", pairs, block)
