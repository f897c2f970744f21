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
  :attr:`ReparamBlock.deploy_conv_name` and the classmethod :meth:`ReparamBlock.stored_options`
  (:func:`stored_dim_option`, :func:`stored_norm_option` read what every block stores alike).

Rules shared by every block type, in one place: :meth:`ReparamBlock.same_padding` (the padding of
``padding=None``), :meth:`ReparamBlock.internal_channels` (an internal branch's width), and the block
options a user may give (:data:`GEOMETRY_ARGUMENTS`, :data:`NORM_ARGUMENTS`, :func:`block_option_names`,
:func:`takes_arguments`), read by the plug-in and the architecture builder alike.
"""
from __future__ import annotations

import abc
import functools
import inspect
from typing import Any, Callable, Dict, FrozenSet, Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

import torch.nn.functional as F

from . import norms, transforms
from .fastpath import has_nhwc_faulty_conv, match_layout, run_conv

__all__ = ["ReparamBlock", "ConvBN", "PADDING_MODES", "IntOrPair", "IntOrTuple", "as_square_int", "as_tuple",
           "stored_dim_option", "stored_norm_option", "takes_arguments", "GEOMETRY_ARGUMENTS", "NORM_ARGUMENTS",
           "block_option_names"]

IntOrTuple = Union[int, Sequence[int]]
#: The 2-d name of :data:`IntOrTuple` (kept for importers).
IntOrPair = IntOrTuple
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
DIMS = (1, 2, 3)
#: Constructor arguments a caller sets from the conv a block stands in for (its geometry and form), and
#: ``deploy``: never a user's block option. The plug-in (:func:`acnet.convert_to_acnet`) and the
#: architecture builder (``constructor``) both refuse them as options (:func:`block_option_names`).
GEOMETRY_ARGUMENTS: FrozenSet[str] = frozenset({
    "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode", "deploy",
    "dim", "norm", "bias", "transposed", "output_padding"})
#: The settings of a block's norms: the plug-in takes ``bn_eps`` from the norm a block replaces, the
#: builder sets both from its own.
NORM_ARGUMENTS: FrozenSet[str] = frozenset({"bn_eps", "bn_momentum"})


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


def takes_arguments(function: Callable[..., Any], *names: str) -> bool:
    """Whether ``function`` (a block class: its constructor) takes every keyword argument in ``names``,
    by name or through a ``**kwargs``: how the plug-in and the builder learn which forms and options a
    block type offers (a user's block need not take ``dim``, ``norm``, ``transposed`` or ``bias``)."""
    parameters = inspect.signature(function).parameters
    return all(name in parameters for name in names) or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


def block_option_names(block_class: Callable[..., Any], excluding: Iterable[str] = ()) -> Tuple[str, ...]:
    """The options a user may give ``block_class`` (``gamma_init``, ``internal_channels_1x1_3x3``, ...), in
    constructor order: its named parameters but :data:`GEOMETRY_ARGUMENTS` and ``excluding`` (what the
    caller sets itself). The one rule by which the plug-in and the builder validate block options."""
    excluded = GEOMETRY_ARGUMENTS | frozenset(excluding)
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return tuple(name for name, p in inspect.signature(block_class).parameters.items()
                 if name not in excluded and p.kind not in variadic)


def _compact(values: Tuple[int, ...]) -> Union[int, Tuple[int, ...]]:
    """One int when every axis has the same value (as the attributes always were in 2-d), else the tuple."""
    return values[0] if len(set(values)) == 1 else values


def _shown(values: Tuple[int, ...]) -> str:
    return str(_compact(values))


Window = Tuple[Tuple[int, int], ...]


def branch_window(kernel: Sequence[int], sub_kernel: Sequence[int], offsets: Sequence[int], padding: Sequence[int],
                  dilation: Sequence[int], output_padding: Optional[Sequence[int]] = None) -> Window:
    """Per axis ``(before, after)``: how a branch with the ``sub_kernel`` placed at ``offsets`` inside the
    block's ``kernel`` reads (conv) or writes (transposed conv) the block's window.

    Conv (``output_padding=None``): output pixel ``i`` of the block reads the input padded by ``p`` at
    ``s*i + d*a``; the branch's taps are ``a = o + b``, so the branch conv (padding 0) must see the input
    padded by ``before = p - d*o`` and ``after = p - d*(K - k - o)`` (a negative amount crops).
    Transposed: the block's output is the full transposed output cropped by ``p`` before and
    ``p - op`` after; the branch's full output sits ``d*o`` later, so its full output (padding 0) is
    cropped by ``before = p - d*o`` and ``after = p - d*(K - k - o) - op`` (a negative amount pads zeros).
    """
    ops = output_padding if output_padding is not None else (0,) * len(kernel)
    return tuple((p - d * o, p - d * (K - k - o) - op)
                 for K, k, o, p, d, op in zip(kernel, sub_kernel, offsets, padding, dilation, ops))


def conv_window_padding(window: Window) -> Tuple[Tuple[int, ...], Optional[Window]]:
    """``(conv padding, input window)`` for a conv branch: an axis with the same non-negative amount on
    both sides goes into the conv's own padding; any other axis (asymmetric, or cropped) is a window
    applied to the input (:func:`apply_input_window`; padding another axis commutes with it). The
    window is None when there is none."""
    pads = tuple(b if b == a and b >= 0 else 0 for b, a in window)
    rest = tuple((0, 0) if b == a and b >= 0 else (b, a) for b, a in window)
    return pads, (None if all(b == 0 and a == 0 for b, a in rest) else rest)


def apply_input_window(x: Tensor, window: Window, padding_mode: str = "zeros") -> Tensor:
    """Pad (positive amounts, with ``padding_mode``) and crop (negative amounts) the spatial axes of ``x``."""
    index = [slice(None), slice(None)]
    for b, a in window:
        index.append(slice(max(-b, 0), None if a >= 0 else a))
    x = x[tuple(index)]
    pads = []
    for b, a in reversed(window):
        pads += [max(b, 0), max(a, 0)]
    if any(pads):
        x = F.pad(x, pads) if padding_mode == "zeros" else F.pad(x, pads, mode=padding_mode)
    return x


def transposed_window_padding(window: Window, stride: Sequence[int], dilation: Sequence[int], *,
                              use_output_padding: bool = True
                              ) -> Tuple[Tuple[int, ...], Tuple[int, ...], Optional[Window]]:
    """``(padding, output_padding, output window)`` for a transposed-conv branch with the crop ``window``:
    the conv crops ``q`` on both sides and adds ``output_padding`` at the end where it can (and
    ``use_output_padding``: a 1x1 transposed conv with an output_padding is one oneDNN cannot train
    on NHWC data, :func:`acnet.fastpath.nhwc_faulty_geometry`); the rest is a window applied to its
    output (:func:`apply_output_window`), None when there is none."""
    pads, extra, rest = [], [], []
    for (b, a), s, d in zip(window, stride, dilation):
        q = max(0, min(b, a))
        b, a = b - q, a - q
        op = 0
        if use_output_padding and b == 0 and a < 0 and -a < max(s, d):
            op, a = -a, 0
        pads.append(q)
        extra.append(op)
        rest.append((b, a))
    return tuple(pads), tuple(extra), (None if all(b == 0 and a == 0 for b, a in rest) else tuple(rest))


def apply_output_window(y: Tensor, window: Window) -> Tensor:
    """Crop (positive amounts) and zero-pad (negative amounts) the spatial axes of ``y``."""
    pads = []
    for b, a in reversed(window):
        pads += [-b, -a]
    return F.pad(y, pads)


class ReparamBlock(nn.Module, metaclass=abc.ABCMeta):
    """A training-time block equal, in eval mode, to one conv with bias (see the module docstring).

    Geometry attributes mean what they mean for ``nn.Conv{dim}d``: ``in_channels, out_channels,
    kernel_size, stride, padding, dilation, groups, padding_mode``; ``kernel_size`` etc. are one int
    when equal on every axis (always so for the square 2-d forms), else a tuple of ``dim`` ints
    (``kernel_nd`` etc. are always the tuples). ``dim`` and ``norm`` are the block's dimension and norm kind.
    """

    in_channels: int
    out_channels: int
    transposed: bool = False
    has_bias: bool = True
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
        transposed: bool = False,
        output_padding: IntOrTuple = 0,
        bias: bool = True,
    ) -> None:
        """Validate and store the conv geometry; every rule violation is a ``ValueError`` naming the
        argument, then the block's own rules (:meth:`unsupported`) are a ``ValueError`` with the reason."""
        owner = type(self).__name__
        for name, flag in (("transposed", transposed), ("bias", bias)):
            if not isinstance(flag, bool):
                raise ValueError(f"{owner}: {name} must be True or False, got {flag!r}")
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
        op = as_tuple(output_padding, "output_padding", owner, dim)
        if any(v != 0 for v in op) and not transposed:
            raise ValueError(f"{owner}: output_padding is for transposed=True blocks, got {_shown(op)}")
        if any(v < 0 or (v >= si and v >= di) for v, si, di in zip(op, s, d)):
            raise ValueError(f"{owner}: output_padding must be >= 0 and smaller than stride or dilation on each "
                             f"axis, got {_shown(op)} (stride {_shown(s)}, dilation {_shown(d)})")
        reason = type(self).unsupported(dim=dim, kernel_size=k, stride=s, padding=p, dilation=d, groups=groups,
                                        padding_mode=padding_mode, norm=norm, transposed=transposed, bias=bias)
        if reason is not None:
            raise ValueError(f"{owner}: {reason}")
        self.transposed, self.has_bias = transposed, bias
        self.output_padding_nd, self.output_padding = op, _compact(op)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_nd, self.stride_nd, self.padding_nd, self.dilation_nd = k, s, p, d
        self.kernel_size, self.stride, self.padding, self.dilation = _compact(k), _compact(s), _compact(p), _compact(d)
        self.padding_mode = padding_mode
        self.dim, self.norm = dim, norm

    @staticmethod
    def same_padding(kernel_size: IntOrTuple, dilation: IntOrTuple, dim: int) -> IntOrTuple:
        """The padding of a block built with ``padding=None`` (the original DBB / OREPA default):
        ``d * (k // 2)`` per axis, so that stride 1 keeps an odd kernel's input size; one int when every
        axis has the same, else the tuple. ``0`` for a ``kernel_size`` / ``dilation`` that is neither an
        int nor a sequence (the geometry check then names it)."""
        try:
            kernels = (kernel_size,) * dim if isinstance(kernel_size, int) else tuple(kernel_size)
            dilations = (dilation,) * len(kernels) if isinstance(dilation, int) else tuple(dilation)
            same = tuple(d * (k // 2) for k, d in zip(kernels, dilations))
        except TypeError:
            return 0
        return same[0] if len(set(same)) == 1 else same

    def internal_channels(self, value: Optional[int], default: int) -> int:
        """The width of an internal branch (``internal_channels_1x1_3x3`` of DBB and OREPA): ``value``, or
        ``default`` when it is None; anything but a positive multiple of ``groups`` is a ``ValueError``
        (call after :meth:`_init_geometry`)."""
        internal = default if value is None else value
        if isinstance(internal, bool) or not isinstance(internal, int) or internal < 1 or internal % self.groups:
            raise ValueError(f"{type(self).__name__}: internal_channels_1x1_3x3 must be a positive multiple of "
                             f"groups ({self.groups}), got {internal!r}")
        return internal

    @classmethod
    def unsupported(cls, *, dim: int, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                    dilation: Sequence[int], groups: int, padding_mode: str, norm: str, transposed: bool = False,
                    bias: bool = True) -> Optional[str]:
        """None when the block can represent this conv geometry (every tuple of length ``dim``), else
        one short reason (the converter calls it before constructing and reports the reason).

        ``transposed``: the geometry of an ``nn.ConvTranspose{dim}d`` (its output_padding never matters
        here); ``bias=False``: a block whose deploy conv has no bias (BN-free form only)."""
        if dim not in DIMS:
            return f"dim must be 1, 2 or 3, got {dim!r}"
        if norm not in norms.NORM_KINDS:
            return f"norm must be one of {norms.NORM_KINDS}, got {norm!r}"
        if padding_mode not in PADDING_MODES:
            return f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}"
        if transposed and padding_mode != "zeros":
            return f"a transposed conv pads only with zeros, got padding_mode={padding_mode!r}"
        if not bias and norm != "none":
            return (f"bias=False needs norm='none': a {norm!r} form's main norm has a shift, which the deploy conv "
                    "takes as its bias")
        return None

    # --- the contract (abstract: a subclass that misses one cannot be instantiated) -----------
    @abc.abstractmethod
    def get_equivalent_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        """``(kernel (O, C/g, *K), bias (O,))`` of the one conv equal to this block in eval mode; a
        transposed block's kernel is in ``nn.ConvTranspose{dim}d``'s layout ``(C, O/g, *K)``; a block
        built with ``bias=False`` gives a zero bias.

        Differentiable in the block's parameters; uses the BN running statistics and each BN's eps.
        """

    def _deployed_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        """The deploy conv's ``(weight, bias)`` (a zero bias for a conv without one)."""
        conv = self._deploy_conv_module()
        bias = conv.bias if conv.bias is not None else torch.zeros(self.out_channels, dtype=conv.weight.dtype,
                                                                   device=conv.weight.device)
        return conv.weight, bias

    def _output_major(self, kernel: Tensor) -> Tensor:
        """A transposed block's kernel ``(C, O/g, *K)`` as ``(O, C/g, *K)`` and back (an involution;
        :func:`acnet.transforms.swap_in_out`); a conv block's kernel unchanged."""
        return transforms.swap_in_out(kernel, self.groups) if self.transposed else kernel

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
        conv_cls = norms.conv_class(self.dim, self.transposed)
        factory = conv_cls if initialise else functools.partial(torch.nn.utils.skip_init, conv_cls)
        extra = dict(output_padding=self.output_padding) if self.transposed else {}
        return factory(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.has_bias,
            padding_mode=self.padding_mode,
            dtype=dtype,
            device=device,
            **extra,
        )

    def _make_conv(self, in_channels: int, out_channels: int, kernel: Sequence[int], *, padding: Sequence[int],
                   stride: Optional[Sequence[int]] = None, dilation: Optional[Sequence[int]] = None,
                   groups: Optional[int] = None, output_padding: Optional[Sequence[int]] = None,
                   padding_mode: str = "zeros") -> nn.Module:
        """A bias-free branch conv of the block's kind (``nn.ConvTranspose{dim}d`` for a transposed block);
        stride, dilation and groups default to the block's."""
        conv_cls = norms.conv_class(self.dim, self.transposed)
        common = dict(stride=_compact(tuple(stride or self.stride_nd)),
                      dilation=_compact(tuple(dilation or self.dilation_nd)),
                      groups=self.groups if groups is None else groups, bias=False)
        if self.transposed:
            common["output_padding"] = _compact(tuple(output_padding or (0,) * self.dim))
        else:
            common["padding_mode"] = padding_mode
        return conv_cls(in_channels, out_channels, _compact(tuple(kernel)), padding=_compact(tuple(padding)), **common)

    def make_deploy_conv(self) -> nn.Module:
        """A NEW ``nn.Conv{dim}d`` (``nn.ConvTranspose{dim}d`` for a transposed block; same geometry, dtype,
        device) holding the equivalent kernel and bias (no bias for a block built with ``bias=False``).

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
            if conv.bias is not None:
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
        if self.transposed:
            text += f", transposed=True, output_padding={self.output_padding}"
        if not self.has_bias:
            text += ", bias=False"
        return text


def stored_norm_option(state: Mapping[str, Tensor], main_norm: str, branch_norm: Optional[str]) -> Dict[str, object]:
    """The ``norm`` option of a stored block (for :meth:`ReparamBlock.stored_options`), as its entries
    (keys relative to the block's prefix) tell it: ``{}`` for the batch form; no running
    statistics on the main norm -> ``"none"`` (and ``"bias": False`` when it has no shift either); on
    the main norm but not on ``branch_norm`` -> ``"frozen"``."""
    if f"{main_norm}.weight" in state and f"{main_norm}.running_mean" not in state:
        return {"norm": "none"} if f"{main_norm}.bias" in state else {"norm": "none", "bias": False}
    if branch_norm is not None and f"{main_norm}.running_mean" in state and f"{branch_norm}.weight" in state \
            and f"{branch_norm}.running_mean" not in state:
        return {"norm": "frozen"}
    return {}


def stored_dim_option(state: Mapping[str, Tensor], weight_key: str) -> Dict[str, object]:
    """The ``dim`` option of a stored block (for :meth:`ReparamBlock.stored_options`): ``{"dim": d}`` from the
    rank of its kernel ``state[weight_key]`` (``{}`` for 2-d or when the entry is absent)."""
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
        transposed: bool = False,
        output_padding: IntOrTuple = 0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode,
                            dim=dim, norm=norm, min_kernel=1, transposed=transposed, output_padding=output_padding,
                            bias=bias)
        if deploy:
            self.fused_conv = self._empty_deploy_conv(torch.get_default_dtype(), torch.device("cpu"))
        else:
            self.conv = self._make_conv(in_channels, out_channels, self.kernel_nd, padding=self.padding_nd,
                                        output_padding=self.output_padding_nd, padding_mode=padding_mode)
            self.bn = norms.make_norm(norm, out_channels, dim, main=True, eps=bn_eps, momentum=bn_momentum, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.deployed:
            return match_layout(run_conv(self.fused_conv, x), x)
        return match_layout(self.bn(run_conv(self.conv, x)), x)

    def get_equivalent_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        if self.deployed:
            return self._deployed_kernel_bias()
        kernel, bias = norms.fuse_norm(self._output_major(self.conv.weight), self.bn)
        return self._output_major(kernel), bias

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
        return {**stored_dim_option(state, "conv.weight"), **stored_norm_option(state, "bn", None)}

    def switch_to_deploy(self) -> None:
        if self.deployed:
            return
        self.fused_conv = self.make_deploy_conv()
        del self.conv
        del self.bn
