"""RepVGG (Ding et al., CVPR 2021): a KxK conv-BN, a 1x1 conv-BN and an identity BN, fused into one KxK conv.

Branches (each ends in a norm; their sum, then ``nonlinear``, is the output):

* ``rbr_dense``: KxK conv (``conv``) -> BN (``bn``), the block's geometry;
* ``rbr_1x1``: 1x1 conv -> BN with the block's stride, reading the centre tap of the KxK window;
* ``rbr_identity``: a BN of the input itself, only where ``in_channels == out_channels`` and the stride
  is 1 (the paper's rule; any groups: the identity is a grouped kernel too).

Fusion: ``k = s_d * k_d + place(s_1 * k_1) + place(s_id * I)``, ``b = t_d + t_1 + t_id`` (norm scale ``s``,
shift ``t``; the 1x1 kernel and the identity ``I`` (:func:`acnet.transforms.identity_kernel`) at the
centre tap ``(K - 1) // 2`` of each axis, :func:`acnet.transforms.place_kernel`).

Centre alignment. Output pixel ``i`` of the KxK conv reads the padded input at ``s*i + d*a`` on an axis;
the 1x1 and identity branches must read the centre tap ``a = c``. They do so on the input windowed by
:func:`acnet.block.branch_window` (padded by ``p - d*c`` before and ``p - d*(K - 1 - c)`` after, a negative
amount crops; the same ``padding_mode`` as the KxK conv), so every padding (0 included), dilation, even
kernel and padding mode is exact at the borders. The original (DingXiaoH/RepVGG) accepts only 3x3 with
padding 1, where the window is the 1x1 conv's own zero padding 0 and the identity is the input.

Transposed form (``transposed=True``): each branch is a transposed conv (the identity: the input) whose
output is cropped or zero-padded to the centre tap's place in the block's output window; exact too.

Norm kinds (``norm``): ``"batch"`` as above; ``"frozen"``: ``rbr_dense.bn`` is a frozen BN (the
pretrained pair), ``rbr_1x1.bn`` and ``rbr_identity`` learnable per-channel scales and shifts
(:class:`~acnet.norms.ChannelAffine`), no batch statistics anywhere; ``"none"`` (BN-free): every norm is
such a scale and shift (the identity branch ``w * x + b`` per channel: a plain identity would have no
parameter to learn and could not start at zero for ``keep_weights``). ``bias=False`` (BN-free only):
scales without shifts. ``dim`` 1, 2 or 3: every branch in N-d. A kernel of size 1 on every axis is
refused (its 1x1 branch would duplicate it).

State-dict names are the original's (``repvgg.py`` of DingXiaoH/RepVGG, commit eae7c520): ``rbr_dense.conv``,
``rbr_dense.bn``, ``rbr_1x1.conv``, ``rbr_1x1.bn``, ``rbr_identity``; deploy form ``rbr_reparam``. A state dict
of the original's ``RepVGGBlock`` (without SE: ``use_se=False``) loads as it is; the original applies a
ReLU after the sum, ours ``nonlinear`` (default: none, the block replaces a conv-BN pair).
"""
from __future__ import annotations

import abc
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import norms, transforms
from .block import (IntOrTuple, ReparamBlock, Window, stored_dim_option, stored_norm_option, apply_input_window,
                    apply_output_window, branch_window, conv_window_padding, transposed_window_padding)
from .fastpath import branch_bn_sum, branch_input, match_layout, run_conv

__all__ = ["RepVGGBlock", "CentreBranchBlock"]


class CentreBranchBlock(ReparamBlock):
    """The RepVGG / MobileOne family: ``k`` KxK conv-norm branches, a 1x1 conv-norm branch on the centre
    tap (when the kernel is larger than 1x1) and an identity norm (when ``in == out`` and stride 1).

    Subclasses name the parts (the originals' names) with :meth:`_kxk_names`, :attr:`scale_name` and
    :attr:`identity_name`; the maths, forms and contract are here (see :mod:`acnet.repvgg`).
    """

    #: Attribute of the 1x1 branch (``nn.Sequential`` of ``conv``, ``bn``) and of the identity norm.
    scale_name: str = "rbr_1x1"
    identity_name: str = "rbr_identity"

    def _build(self, in_channels: int, out_channels: int, kernel_size: IntOrTuple, stride: IntOrTuple,
               padding: Optional[IntOrTuple], dilation: IntOrTuple, groups: int, padding_mode: str, deploy: bool,
               nonlinear: Optional[nn.Module], *, branches: int, bn_eps: float, bn_momentum: float, dim: int,
               norm: str, transposed: bool, output_padding: IntOrTuple, bias: bool) -> None:
        if padding is None:
            padding = self.same_padding(kernel_size, dilation, dim)
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode,
                            dim=dim, norm=norm, min_kernel=1, transposed=transposed, output_padding=output_padding,
                            bias=bias)
        if isinstance(branches, bool) or not isinstance(branches, int) or branches < 1:
            raise ValueError(f"{type(self).__name__}: the number of KxK branches must be a positive int, "
                             f"got {branches!r}")
        self.num_kxk_branches = branches
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
        if deploy:
            setattr(self, self.deploy_conv_name,
                    self._empty_deploy_conv(torch.get_default_dtype(), torch.device("cpu")))
            return
        k, p, d = self.kernel_nd, self.padding_nd, self.dilation_nd
        ones = (1,) * dim

        def norm_of(channels: int, main: bool = False) -> nn.Module:
            return norms.make_norm(norm, channels, dim, main=main, eps=bn_eps, momentum=bn_momentum, bias=bias)

        def conv_norm(conv: nn.Module, main: bool) -> nn.Sequential:
            unit = nn.Sequential()
            unit.add_module("conv", conv)
            unit.add_module("bn", norm_of(out_channels, main))
            return unit

        # registered in the original's order (identity, KxK, 1x1): the same state-dict key order
        identity = in_channels == out_channels and all(s == 1 for s in self.stride_nd)
        setattr(self, self.identity_name, norm_of(in_channels) if identity else None)
        self._set_kxk([conv_norm(self._make_conv(in_channels, out_channels, k, padding=p,
                                                 output_padding=self.output_padding_nd,
                                                 padding_mode=padding_mode), i == 0)
                       for i in range(branches)])
        # the centre tap's window: what a 1x1 branch (and the identity) reads (conv) / writes (transposed)
        window = branch_window(k, ones, transforms.centre_offsets(k), p, d,
                               self.output_padding_nd if transposed else None)
        self._scale_window = None
        if self.has_scale_branch(k):
            if transposed:
                pad, extra, self._scale_window = transposed_window_padding(window, self.stride_nd, ones,
                                                                           use_output_padding=False)
                conv = self._make_conv(in_channels, out_channels, ones, padding=pad, output_padding=extra,
                                       dilation=ones)
            elif padding_mode == "zeros":
                pad, self._scale_window = conv_window_padding(window)
                conv = self._make_conv(in_channels, out_channels, ones, padding=pad, dilation=ones)
            else:  # the input padded as the KxK conv pads it, then cropped to the window (_centre_input)
                self._scale_window = window
                conv = self._make_conv(in_channels, out_channels, ones, padding=(0,) * dim, dilation=ones)
            setattr(self, self.scale_name, conv_norm(conv, False))
        else:
            setattr(self, self.scale_name, None)
        self._identity_window = None if all(b == 0 and a == 0 for b, a in window) else window

    # --- the parts, named by the subclass -------------------------------------------------------
    @abc.abstractmethod
    def _set_kxk(self, units: List[nn.Sequential]) -> None:
        """Hold the KxK conv-norm units under the original's names."""

    @abc.abstractmethod
    def _kxk_units(self) -> Tuple[nn.Sequential, ...]:
        """The KxK conv-norm units, the main one first."""

    @abc.abstractmethod
    def _kxk_names(self) -> Tuple[str, ...]:
        """The attribute names holding the KxK units (deleted by :meth:`switch_to_deploy`)."""

    @staticmethod
    def has_scale_branch(kernel_size: Sequence[int]) -> bool:
        """Whether the block has a 1x1 branch: the kernel is larger than 1x1 (on some axis)."""
        return any(v > 1 for v in kernel_size)

    def _scale_unit(self) -> Optional[nn.Sequential]:
        return getattr(self, self.scale_name, None)

    def _identity_norm(self) -> Optional[nn.Module]:
        return getattr(self, self.identity_name, None)

    def _branch_norms(self) -> Tuple[nn.Module, ...]:
        """Every branch's norm, in forward order: the KxK branches', the 1x1's, the identity's."""
        if self.deployed:
            raise RuntimeError(f"{type(self).__name__}: the block is deployed; its branches and norms are gone")
        found = [unit.bn for unit in self._kxk_units()]
        if self._scale_unit() is not None:
            found.append(self._scale_unit().bn)
        if self._identity_norm() is not None:
            found.append(self._identity_norm())
        return tuple(found)

    # --- the contract ---------------------------------------------------------------------------
    def main_branch(self) -> Tuple[Tensor, nn.Module]:
        """``(KxK weight, its norm)`` of the first KxK branch."""
        self._branch_norms()
        unit = self._kxk_units()[0]
        return unit.conv.weight, unit.bn

    def single_init(self) -> None:
        """Every norm but the first KxK branch's gets weight and shift 0 (the branch adds exactly zero; its
        norm still gets gradients, its conv from the next step on); the main norm weight 1 (a frozen one
        is left as it is)."""
        norms_ = self._branch_norms()
        with torch.no_grad():
            for norm in norms_[1:]:
                norm.weight.fill_(0.0)
                if norm.bias is not None:
                    norm.bias.fill_(0.0)
            if norms.trainable_norm(norms_[0]):
                norms_[0].weight.fill_(1.0)

    def init_gamma(self, gamma_value: float) -> None:
        """Set the weight of every branch norm to ``gamma_value`` (a frozen main norm is left as it is)."""
        with torch.no_grad():
            for norm in self._trainable_norms(self._branch_norms()):
                norm.weight.fill_(gamma_value)

    @classmethod
    @abc.abstractmethod
    def _stored_parts(cls, state: Mapping[str, Tensor]) -> Tuple[str, Optional[str]]:
        """``(main norm, another branch's norm or None)`` prefixes in a stored block's entries."""

    @classmethod
    @abc.abstractmethod
    def _main_conv_key(cls) -> str:
        """The stored main KxK conv weight's key."""

    @classmethod
    def stored_options(cls, state: Mapping[str, Tensor], in_channels: int) -> Dict[str, object]:
        main, other = cls._stored_parts(state)
        return {**stored_dim_option(state, cls._main_conv_key()), **stored_norm_option(state, main, other)}

    # --- forward ----------------------------------------------------------------------------
    def _branch_outputs(self, y: Tensor) -> List[Tensor]:
        """Every branch's output before its norm (the order of :meth:`_branch_norms`)."""
        outputs = [run_conv(unit.conv, y) for unit in self._kxk_units()]
        scale = self._scale_unit()
        if scale is not None:
            if self.transposed:
                out = run_conv(scale.conv, y)
                outputs.append(out if self._scale_window is None else apply_output_window(out, self._scale_window))
            else:
                outputs.append(run_conv(scale.conv, self._centre_input(y, self._scale_window)))
        if self._identity_norm() is not None:
            window = self._identity_window
            if window is None:
                outputs.append(y)
            elif self.transposed:
                outputs.append(apply_output_window(y, window))
            else:
                outputs.append(self._centre_input(y, window))
        return outputs

    def _centre_input(self, y: Tensor, window: Optional[Window]) -> Tensor:
        """``y`` windowed for a branch that reads the centre tap (conv form). Zero padding: crop and pad
        (:func:`acnet.block.apply_input_window`). Other modes: pad by the block's padding with its mode,
        then crop to the window (every amount is at most the padding) -- cropping first would change what
        a reflect / circular pad on the same axis reads."""
        if window is None:
            return y
        if self.padding_mode == "zeros":
            return apply_input_window(y, window)
        pads = []
        for q in reversed(self.padding_nd):
            pads += [q, q]
        padded = F.pad(y, pads, mode=self.padding_mode) if any(pads) else y
        index = [slice(None), slice(None)]
        for (before, after), q, size in zip(window, self.padding_nd, padded.shape[2:]):
            index.append(slice(q - before, size - (q - after)))
        return padded[tuple(index)]

    def forward(self, x: Tensor) -> Tensor:
        if self.deployed:
            return self.nonlinear(match_layout(run_conv(self._deploy_conv_module(), x), x))
        y = branch_input(x, self.branches_nhwc())
        return self.nonlinear(match_layout(branch_bn_sum(self._branch_outputs(y), self._branch_norms()), x))

    # --- fusion -------------------------------------------------------------------------------
    def get_equivalent_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        """``sum_i fuse(k_i, n_i) + place(fuse(k_1x1, n_1x1)) + place(fuse(I, n_id))`` (module docstring; a
        transposed block's kernel in ``ConvTranspose`` layout)."""
        if self.deployed:
            return self._deployed_kernel_bias()
        major = self._output_major
        kernels, biases = [], []
        for unit in self._kxk_units():
            kernel, bias = norms.fuse_norm(major(unit.conv.weight), unit.bn)
            kernels.append(kernel)
            biases.append(bias)
        centre = transforms.centre_offsets(self.kernel_nd)
        scale = self._scale_unit()
        if scale is not None:
            kernel, bias = norms.fuse_norm(major(scale.conv.weight), scale.bn)
            kernels.append(transforms.place_kernel(kernel, self.kernel_nd, centre))
            biases.append(bias)
        identity = self._identity_norm()
        if identity is not None:
            reference = kernels[0]
            eye = transforms.identity_kernel(self.in_channels, self.groups, dim=self.dim, dtype=reference.dtype,
                                             device=reference.device)
            kernel, bias = norms.fuse_norm(eye, identity)
            kernels.append(transforms.place_kernel(kernel, self.kernel_nd, centre))
            biases.append(bias)
        kernel, bias = transforms.add_branches(kernels, biases)
        return major(kernel), bias

    def switch_to_deploy(self) -> None:
        """Fuse into the deploy conv and drop the branches (idempotent); ``nonlinear`` stays."""
        if self.deployed:
            return
        fused = self.make_deploy_conv()
        for name in (*self._kxk_names(), self.scale_name, self.identity_name):
            if hasattr(self, name):
                delattr(self, name)
        setattr(self, self.deploy_conv_name, fused)


class RepVGGBlock(CentreBranchBlock):
    """RepVGG block, state-dict compatible with the original ``RepVGGBlock``; deploy form ``rbr_reparam``.

    ``rbr_dense`` (KxK conv-norm), ``rbr_1x1`` (1x1 conv-norm on the centre tap), ``rbr_identity`` (a norm
    of the input, only where ``in_channels == out_channels`` and stride 1; ``None`` elsewhere, as in the
    original). ``padding`` (default ``d * ((K - 1) // 2)``), any ``dilation``, ``groups``, ``padding_mode``;
    ``nonlinear`` (default identity) is applied after the sum and kept by the deploy form; ``dim`` /
    ``norm`` / ``transposed`` / ``output_padding`` / ``bias``: the forms (module docstring).
    """

    deploy_conv_name = "rbr_reparam"
    signature = "rbr_dense.conv.weight"
    scale_name = "rbr_1x1"
    identity_name = "rbr_identity"

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
        nonlinear: Optional[nn.Module] = None,
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
        self._build(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode, deploy,
                    nonlinear, branches=1, bn_eps=bn_eps, bn_momentum=bn_momentum, dim=dim, norm=norm,
                    transposed=transposed, output_padding=output_padding, bias=bias)

    @classmethod
    def unsupported(cls, *, dim, kernel_size, stride, padding, dilation, groups, padding_mode, norm,
                    transposed: bool = False, bias: bool = True) -> Optional[str]:
        reason = super().unsupported(dim=dim, kernel_size=kernel_size, stride=stride, padding=padding,
                                     dilation=dilation, groups=groups, padding_mode=padding_mode, norm=norm,
                                     transposed=transposed, bias=bias)
        if reason is not None:
            return reason
        if not cls.has_scale_branch(kernel_size):
            return f"RepVGG on a {'x'.join(map(str, kernel_size))} kernel: its 1x1 branch would duplicate the kernel"
        return None

    def _set_kxk(self, units: List[nn.Sequential]) -> None:
        self.rbr_dense = units[0]

    def _kxk_units(self) -> Tuple[nn.Sequential, ...]:
        return (self.rbr_dense,)

    def _kxk_names(self) -> Tuple[str, ...]:
        return ("rbr_dense",)

    @classmethod
    def _main_conv_key(cls) -> str:
        return "rbr_dense.conv.weight"

    @classmethod
    def _stored_parts(cls, state: Mapping[str, Tensor]) -> Tuple[str, Optional[str]]:
        return "rbr_dense.bn", "rbr_1x1.bn"
