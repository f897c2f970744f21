"""The re-parameterizable block contract and the plain conv-norm unit.

A :class:`ReparamBlock` is a training-time module that, in eval mode, computes exactly what one
``nn.Conv{dim}d(bias=True)`` of the same geometry computes with the kernel and bias returned by
:meth:`ReparamBlock.get_equivalent_kernel_bias`.

The contract every block type implements (the conversion, the registry and the framework rely on it):

* constructor: the block's own arguments, plus keyword-only ``dim`` (1, 2, 3: the block is an N-d
  conv; ``kernel_size``, ``stride``, ``padding``, ``dilation`` take an int or ``dim`` ints) and ``norm``
  (:data:`acnet.norms.NORM_KINDS`: ``"batch"``, ``"frozen"``, ``"none"``); an invalid combination is a
  ``ValueError`` with the reason;
* :meth:`ReparamBlock.unsupported`: the reason a conv geometry cannot be represented, or None;
* :meth:`ReparamBlock.load_main_branch`: function-preserving insertion of a pretrained conv (+ norm);
* :meth:`ReparamBlock.single_init`, :meth:`ReparamBlock.init_gamma`;
* :meth:`ReparamBlock.get_equivalent_kernel_bias`, :meth:`ReparamBlock.make_deploy_conv`,
  :meth:`ReparamBlock.switch_to_deploy`;
* class attributes :attr:`ReparamBlock.signature`, :attr:`ReparamBlock.recipe_options`,
  :attr:`ReparamBlock.deploy_conv_name` and the classmethod :meth:`ReparamBlock.stored_options`.
"""
from __future__ import annotations

import abc
import functools
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import norms
from .fastpath import has_nhwc_faulty_conv, run_conv

__all__ = ["ReparamBlock", "ConvBN", "PADDING_MODES", "IntOrPair", "IntOrTuple", "as_square_int", "as_tuple"]

IntOrTuple = Union[int, Sequence[int]]
#: The 2-d name of :data:`IntOrTuple` (kept for importers).
IntOrPair = IntOrTuple
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
DIMS = (1, 2, 3)


def as_square_int(value: IntOrTuple, name: str, owner: str) -> int:
    """``3`` or ``(3, 3)`` -> ``3``; anything else (non-square pair, non-int) is a ``ValueError``."""
    if isinstance(value, bool):
        raise ValueError(f"{owner}: {name} must be an int or a square pair of ints, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, (tuple, list, torch.Size)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        if value[0] != value[1]:
            raise ValueError(f"{owner}: {name} must be square (same value on both axes), got {tuple(value)}")
        return int(value[0])
    raise ValueError(f"{owner}: {name} must be an int or a square pair of ints, got {value!r}")


def as_tuple(value: IntOrTuple, name: str, owner: str, dim: int) -> Tuple[int, ...]:
    """``3`` -> ``(3,) * dim``; a sequence of ``dim`` ints as a tuple; anything else is a ``ValueError``."""
    def is_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if is_int(value):
        return (int(value),) * dim
    if isinstance(value, (tuple, list, torch.Size)) and len(value) == dim and all(is_int(v) for v in value):
        return tuple(int(v) for v in value)
    raise ValueError(f"{owner}: {name} must be an int or a tuple of {dim} ints (dim={dim}), got {value!r}")


def _compact(values: Tuple[int, ...]) -> Union[int, Tuple[int, ...]]:
    """One int when every axis has the same value (as the attributes always were in 2-d), else the tuple."""
    return values[0] if len(set(values)) == 1 else values


def _shown(values: Tuple[int, ...]) -> str:
    return str(_compact(values))


class ReparamBlock(nn.Module, metaclass=abc.ABCMeta):
    """A training-time block equal, in eval mode, to one conv with bias (see the module docstring).

    Geometry attributes mean what they mean for ``nn.Conv{dim}d``: ``in_channels, out_channels,
    kernel_size, stride, padding, dilation, groups, padding_mode``; ``kernel_size`` etc. are one int
    when equal on every axis (always so for the square 2-d forms), else a tuple of ``dim`` ints
    (``kernel_nd`` etc. are always the tuples). ``dim`` and ``norm`` are the block's dimension and norm kind.
    """

    in_channels: int
    out_channels: int
    kernel_size: Union[int, Tuple[int, ...]]
    stride: Union[int, Tuple[int, ...]]
    padding: Union[int, Tuple[int, ...]]
    dilation: Union[int, Tuple[int, ...]]
    groups: int
    padding_mode: str
    dim: int = 2
    norm: str = "batch"

    #: Attribute name of the fused conv a deployed block holds (the original implementations' names).
    deploy_conv_name: str = "fused_conv"
    #: A state-dict key (under the block's prefix) that identifies a stored training-time block of this type.
    signature: str = ""
    #: Recipe fields (``train_configs``) passed to every block of this type as constructor options.
    recipe_options: Tuple[str, ...] = ()

    # --- geometry ---------------------------------------------------------------------------
    def _init_geometry(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple,
        stride: IntOrTuple,
        padding: IntOrTuple,
        dilation: IntOrTuple,
        groups: int,
        padding_mode: str,
        *,
        dim: int = 2,
        norm: str = "batch",
        min_kernel: int = 1,
        odd_kernel: bool = False,
    ) -> None:
        """Validate and store the conv geometry; every rule violation is a ``ValueError`` naming the
        argument, then the block's own rules (:meth:`unsupported`) are a ``ValueError`` with the reason."""
        owner = type(self).__name__
        if isinstance(dim, bool) or dim not in DIMS:
            raise ValueError(f"{owner}: dim must be 1, 2 or 3, got {dim!r}")
        if norm not in norms.NORM_KINDS:
            raise ValueError(f"{owner}: norm must be one of {norms.NORM_KINDS}, got {norm!r}")
        k = as_tuple(kernel_size, "kernel_size", owner, dim)
        s = as_tuple(stride, "stride", owner, dim)
        p = as_tuple(padding, "padding", owner, dim)
        d = as_tuple(dilation, "dilation", owner, dim)
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
        if max(k) < min_kernel or min(k) < 1 or (odd_kernel and any(v % 2 == 0 for v in k)):
            rule = f"an odd int >= {min_kernel}" if odd_kernel else f"an int >= {min_kernel}"
            raise ValueError(f"{owner}: kernel_size must be {rule}, got {_shown(k)}")
        if min(s) < 1:
            raise ValueError(f"{owner}: stride must be >= 1, got {_shown(s)}")
        if min(d) < 1:
            raise ValueError(f"{owner}: dilation must be >= 1, got {_shown(d)}")
        if min(p) < 0:
            raise ValueError(f"{owner}: padding must be >= 0, got {_shown(p)}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"{owner}: in_channels ({in_channels}) and out_channels ({out_channels}) must both be "
                f"divisible by groups ({groups})"
            )
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"{owner}: padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        reason = type(self).unsupported(dim=dim, kernel_size=k, stride=s, padding=p, dilation=d, groups=groups,
                                        padding_mode=padding_mode, norm=norm)
        if reason is not None:
            raise ValueError(f"{owner}: {reason}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_nd, self.stride_nd, self.padding_nd, self.dilation_nd = k, s, p, d
        self.kernel_size, self.stride, self.padding, self.dilation = _compact(k), _compact(s), _compact(p), _compact(d)
        self.padding_mode = padding_mode
        self.dim, self.norm = dim, norm

    @classmethod
    def unsupported(cls, *, dim: int, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                    dilation: Sequence[int], groups: int, padding_mode: str, norm: str) -> Optional[str]:
        """None when the block can represent this conv geometry (every tuple of length ``dim``), else
        one short reason (the converter calls it before constructing and reports the reason)."""
        if dim not in DIMS:
            return f"dim must be 1, 2 or 3, got {dim!r}"
        if norm not in norms.NORM_KINDS:
            return f"norm must be one of {norms.NORM_KINDS}, got {norm!r}"
        if padding_mode not in PADDING_MODES:
            return f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}"
        return None

    # --- the contract (abstract: a subclass that misses one cannot be instantiated) -----------
    @abc.abstractmethod
    def get_equivalent_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        """``(kernel (O, C/g, *K), bias (O,))`` of the one conv equal to this block in eval mode.

        Differentiable in the block's parameters; uses the BN running statistics and each BN's eps.
        """

    @abc.abstractmethod
    def switch_to_deploy(self) -> None:
        """Replace the branches by the fused conv (named :attr:`deploy_conv_name`), in place (idempotent)."""

    # The methods below have no generic implementation: a block type that lacks one (e.g. a user's
    # block registered without keep_weights support) is refused with one line when it is called.
    def main_branch(self) -> Tuple[Tensor, nn.Module]:
        """``(KxK weight, its norm)``: the branch that, after :meth:`single_init`, equals the whole block."""
        raise TypeError(f"{type(self).__name__} does not define main_branch(): it cannot load a pretrained conv")

    def single_init(self) -> None:
        """Every branch but the main one contributes exactly zero (the block equals its main branch);
        those branches still get gradients (at least after one step). A frozen main norm is left as it is."""
        raise TypeError(f"{type(self).__name__} does not define single_init()")

    def init_gamma(self, gamma_value: float) -> None:
        """Set every trainable branch norm's (or branch scale's) weight to ``gamma_value``."""
        raise TypeError(f"{type(self).__name__} does not define init_gamma()")

    @torch.no_grad()
    def load_main_branch(self, conv_weight: Tensor, conv_bias: Optional[Tensor], norm: Optional[nn.Module]) -> None:
        """Function-preserving insertion: afterwards the block, in eval mode, computes ``norm(conv(x))``.

        Copies ``conv_weight`` into the main branch and ``norm``'s affine parameters / running
        statistics / eps (any BatchNorm{1,2,3}d, SyncBatchNorm or frozen BN; ``conv_bias`` folded into
        the running mean) into the main norm (:func:`acnet.norms.load_norm`); ``norm=None`` (a conv no
        norm follows) needs ``norm="none"`` blocks, whose main shift takes ``conv_bias``. Every other
        branch contributes exactly zero (:meth:`single_init`).
        """
        weight, main_norm = self.main_branch()
        if tuple(conv_weight.shape) != tuple(weight.shape):
            raise ValueError(f"{type(self).__name__}.load_main_branch: conv weight of shape {tuple(conv_weight.shape)} "
                             f"for a main branch of shape {tuple(weight.shape)}")
        self.single_init()
        weight.copy_(conv_weight)
        norms.load_norm(main_norm, norm, conv_bias)

    @classmethod
    def stored_options(cls, state: Mapping[str, Tensor], in_channels: int) -> Dict[str, object]:
        """Constructor options read from a stored training-time block's entries (keys relative to the
        block's prefix): what the geometry of the conv it replaces does not tell (``dim`` when not 2,
        ``norm`` when the entries tell it; a frozen BN is stored like a BN without its batch count, so a
        block with one norm (ConvBN, OREPA) in the frozen form reads as the batch form: same eval-mode
        function, the caller chooses the training form)."""
        return {}

    # --- deployment -------------------------------------------------------------------------
    @property
    def deployed(self) -> bool:
        """True once the block holds only its fused conv."""
        return self.deploy_conv_name in self._modules

    @property
    def deploy(self) -> bool:
        """The original implementations' attribute name for :attr:`deployed`."""
        return self.deployed

    def _deploy_conv_module(self) -> nn.Module:
        """The fused conv a deployed block holds."""
        return getattr(self, self.deploy_conv_name)

    def _empty_deploy_conv(self, dtype: torch.dtype, device: torch.device, initialise: bool = True) -> nn.Module:
        """The deploy conv's shell; ``initialise=False`` skips the random init when the caller overwrites it."""
        conv_cls = norms.conv_class(self.dim)
        factory = conv_cls if initialise else functools.partial(torch.nn.utils.skip_init, conv_cls)
        return factory(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=True,
            padding_mode=self.padding_mode,
            dtype=dtype,
            device=device,
        )

    def make_deploy_conv(self) -> nn.Module:
        """A NEW ``nn.Conv{dim}d(bias=True)`` (same geometry, dtype, device) holding the equivalent kernel/bias.

        The block itself is not modified.
        """
        with torch.no_grad():
            if self.deployed:
                source = self._deploy_conv_module()
                kernel, bias = source.weight, source.bias
            else:
                kernel, bias = self.get_equivalent_kernel_bias()
            conv = self._empty_deploy_conv(kernel.dtype, kernel.device, initialise=False)
            conv.weight.copy_(kernel)
            conv.bias.copy_(bias)
        return conv

    def branches_nhwc(self) -> bool:
        """Whether :func:`acnet.fastpath.branch_input` may give the branches NHWC data: no branch conv is
        one oneDNN cannot train on NHWC data (computed once, the geometry is fixed)."""
        cached = self.__dict__.get("_branches_nhwc")
        if cached is None:
            cached = self.__dict__["_branches_nhwc"] = not has_nhwc_faulty_conv(self)
        return cached

    def _trainable_norms(self, branch_norms: Sequence[nn.Module]) -> Tuple[nn.Module, ...]:
        """The norms among ``branch_norms`` whose weight is a parameter (not a frozen norm's buffer)."""
        return tuple(n for n in branch_norms if norms.trainable_norm(n))

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"padding_mode={self.padding_mode!r}, deployed={self.deployed}"
        )
        if self.dim != 2:
            text += f", dim={self.dim}"
        if self.norm != "batch":
            text += f", norm={self.norm!r}"
        return text


def _norm_kind_in(state: Mapping[str, Tensor], main_norm: str, branch_norm: Optional[str]) -> Dict[str, object]:
    """``{"norm": ...}`` as a stored block's entries tell it (``{}`` for the batch form): no running
    statistics on the main norm -> ``"none"``; on the main norm but not on ``branch_norm`` -> ``"frozen"``."""
    if f"{main_norm}.weight" in state and f"{main_norm}.running_mean" not in state:
        return {"norm": "none"}
    if branch_norm is not None and f"{main_norm}.running_mean" in state and f"{branch_norm}.weight" in state \
            and f"{branch_norm}.running_mean" not in state:
        return {"norm": "frozen"}
    return {}


def _dim_in(state: Mapping[str, Tensor], weight_key: str) -> Dict[str, object]:
    """``{"dim": d}`` from a stored kernel's rank (``{}`` for 2-d)."""
    weight = state.get(weight_key)
    if weight is None or weight.dim() == 4:
        return {}
    return {"dim": weight.dim() - 2}


class ConvBN(ReparamBlock):
    """The plain conv-norm unit (the ``base`` block): ``bn(conv(x))`` with a bias-free ``conv``.

    Children: ``conv`` (``nn.Conv{dim}d``, ``bias=False``) and ``bn``: a ``BatchNorm{dim}d``
    (``norm="batch"``), a :class:`~acnet.norms.FrozenBatchNorm` (``"frozen"``) or a
    :class:`~acnet.norms.ChannelAffine` (``"none"``: ``conv`` with a per-channel scale and bias); after
    :meth:`switch_to_deploy` only ``fused_conv`` remains (kernel ``conv.weight * s``, bias ``t``,
    ``(s, t)`` the norm's eval-mode scale and shift).
    """

    signature = "bn.running_mean"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple,
        stride: IntOrTuple = 1,
        padding: IntOrTuple = 0,
        dilation: IntOrTuple = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        deploy: bool = False,
        *,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
        dim: int = 2,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode,
                            dim=dim, norm=norm, min_kernel=1)
        if deploy:
            self.fused_conv = self._empty_deploy_conv(torch.get_default_dtype(), torch.device("cpu"))
        else:
            self.conv = norms.conv_class(dim)(
                in_channels,
                out_channels,
                self.kernel_size,
                stride=self.stride,
                padding=self.padding,
                dilation=self.dilation,
                groups=groups,
                bias=False,
                padding_mode=padding_mode,
            )
            self.bn = norms.make_norm(norm, out_channels, dim, main=True, eps=bn_eps, momentum=bn_momentum)

    def forward(self, x: Tensor) -> Tensor:
        if self.deployed:
            return run_conv(self.fused_conv, x)
        return self.bn(run_conv(self.conv, x))

    def get_equivalent_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        if self.deployed:
            return self.fused_conv.weight, self.fused_conv.bias
        return norms.fuse_norm(self.conv.weight, self.bn)

    def main_branch(self) -> Tuple[Tensor, nn.Module]:
        return self.conv.weight, self.bn

    def single_init(self) -> None:
        """Nothing to do: the unit is its main branch."""

    def init_gamma(self, gamma_value: float) -> None:
        """Set the norm's weight (a frozen norm is left as it is)."""
        with torch.no_grad():
            for norm in self._trainable_norms([self.bn]):
                norm.weight.fill_(gamma_value)

    @classmethod
    def stored_options(cls, state: Mapping[str, Tensor], in_channels: int) -> Dict[str, object]:
        return {**_dim_in(state, "conv.weight"), **_norm_kind_in(state, "bn", None)}

    def switch_to_deploy(self) -> None:
        if self.deployed:
            return
        self.fused_conv = self.make_deploy_conv()
        del self.conv
        del self.bn
