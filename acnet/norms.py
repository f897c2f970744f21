"""The norms a block's branches end in, for every norm kind and dimension, and their eval-mode algebra.

A block's ``norm`` argument chooses the kind (:data:`NORM_KINDS`):

* ``"batch"``: every branch ends in a ``BatchNorm{dim}d`` (the papers' form; batch statistics in training).
* ``"frozen"``: the main (KxK) branch ends in a :class:`FrozenBatchNorm` (buffers only, never updated:
  the pretrained pair of a detector backbone), every new branch in a :class:`ChannelAffine` (learnable
  per-channel scale and shift, no statistics). No batch statistics anywhere: a batch of one trains.
* ``"none"``: BN-free: every branch ends in a :class:`ChannelAffine`; the main branch's shift is the
  conv's bias.

Every such norm is, in eval mode, ``y -> scale * y + shift`` per channel (:func:`scale_shift`), so a
conv followed by it folds into one conv with bias (:func:`fuse_norm`).
"""
from __future__ import annotations

import copy
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import transforms

__all__ = ["NORM_KINDS", "CONV_CLASSES", "TRANSPOSED_CONV_CLASSES", "FrozenBatchNorm", "ChannelAffine", "batch_norm_class", "conv_class", "make_norm",
           "scale_shift", "fuse_norm", "load_norm", "trainable_norm"]

#: The values of a block's ``norm`` argument.
NORM_KINDS: Tuple[str, ...] = ("batch", "frozen", "none")
_BATCH_NORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
#: The conv classes by dimension (the one table: blocks build them, the plug-in replaces them).
CONV_CLASSES: Dict[int, type] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
#: The transposed conv classes by dimension.
TRANSPOSED_CONV_CLASSES: Dict[int, type] = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def batch_norm_class(dim: int) -> type:
    """``nn.BatchNorm1d`` / ``2d`` / ``3d``."""
    return _BATCH_NORMS[dim]


def conv_class(dim: int, transposed: bool = False) -> type:
    """``nn.Conv1d`` / ``2d`` / ``3d`` (``transposed``: ``nn.ConvTranspose1d`` / ``2d`` / ``3d``)."""
    return (TRANSPOSED_CONV_CLASSES if transposed else CONV_CLASSES)[dim]


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    return t.reshape(1, -1, *([1] * (ndim - 2)))


class FrozenBatchNorm(nn.Module):
    """A BatchNorm with fixed statistics, for any input dimension: the one frozen BN of acnet.

    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` per channel, always (train or
    eval mode); the running statistics are buffers, never updated, ``eps`` an attribute.

    * Default (the frozen form's main norm): ``weight`` and ``bias`` are buffers too, nothing trains:
      torchvision's ``FrozenBatchNorm2d`` (same state-dict names, its scale-and-shift arithmetic) for
      1-, 2- and 3-d data.
    * ``trainable_affine=True`` (QAT's standalone BNs, :meth:`from_batch_norm`): ``weight`` and ``bias``
      are parameters that still learn (None for a BN without affine parameters), the BN's batch count
      ``num_batches_tracked`` is kept (never updated), so the state dict is the BatchNorm's; it computes
      exactly what that BatchNorm computes in eval mode, and :meth:`to_batch_norm` gives it back.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, *, trainable_affine: bool = False) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.trainable_affine = trainable_affine
        if trainable_affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_buffer("weight", torch.ones(num_features))
            self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        if trainable_affine:
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @classmethod
    @torch.no_grad()
    def from_batch_norm(cls, bn: nn.Module) -> "FrozenBatchNorm":
        """A trainable-affine frozen copy of ``bn`` (a BatchNorm with running statistics): same values,
        device, dtype and state-dict names; :meth:`to_batch_norm` restores ``bn``'s class and settings."""
        if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
            raise ValueError(f"{type(bn).__name__} has no running statistics to freeze (track_running_stats=False)")
        frozen = cls(bn.num_features, bn.eps, trainable_affine=True).to(device=bn.running_mean.device,
                                                                        dtype=bn.running_mean.dtype)
        if bn.weight is None:
            frozen.weight = frozen.bias = None
        frozen.load_state_dict(bn.state_dict())
        frozen.__dict__["stock"] = copy.deepcopy(bn).to("meta")  # its class and settings, no memory
        return frozen

    @torch.no_grad()
    def to_batch_norm(self) -> nn.Module:
        """The BatchNorm :meth:`from_batch_norm` froze, holding this module's current values."""
        stock = self.__dict__.get("stock")
        if stock is None:
            raise ValueError("to_batch_norm: this FrozenBatchNorm was not made by FrozenBatchNorm.from_batch_norm")
        bn = copy.deepcopy(stock).to_empty(device=self.running_mean.device).to(dtype=self.running_mean.dtype)
        bn.load_state_dict(self.state_dict())
        return bn.train(self.training)

    def forward(self, x: Tensor) -> Tensor:
        if self.trainable_affine:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        scale, shift = transforms.bn_scale_shift(self)
        return x * _channel_view(scale.to(x.dtype), x.dim()) + _channel_view(shift.to(x.dtype), x.dim())

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}" + (", trainable_affine=True" if self.trainable_affine else "")


class ChannelAffine(nn.Module):
    """A learnable per-channel scale and shift, ``y = weight * x + bias``: a branch norm without statistics.

    ``weight`` starts at 1 and ``bias`` at 0 (a BN's affine initialisation); the same in train and eval mode.
    ``bias=False``: a scale only (``bias`` is None, the shift is exactly zero).
    """

    def __init__(self, num_features: int, bias: bool = True) -> None:
        super().__init__()
        self.num_features = num_features
        self.weight = nn.Parameter(torch.ones(num_features))
        if bias:
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        if self.bias is None:
            return x * _channel_view(self.weight, x.dim())
        return torch.addcmul(_channel_view(self.bias, x.dim()), x, _channel_view(self.weight, x.dim()))

    def extra_repr(self) -> str:
        return f"{self.num_features}" + ("" if self.bias is not None else ", bias=False")


def make_norm(kind: str, channels: int, dim: int, *, main: bool, eps: float = 1e-5, momentum: Optional[float] = 0.1,
              affine: bool = True, bias: bool = True) -> nn.Module:
    """The norm ending a branch: ``BatchNorm{dim}d`` for ``"batch"``; for ``"frozen"`` a
    :class:`FrozenBatchNorm` on the main branch (``main=True``) and a :class:`ChannelAffine` elsewhere;
    a :class:`ChannelAffine` everywhere for ``"none"`` (``bias=False``: without a shift)."""
    if kind == "batch":
        return batch_norm_class(dim)(channels, eps=eps, momentum=momentum, affine=affine)
    if kind == "frozen" and main:
        return FrozenBatchNorm(channels, eps=eps)
    if kind in ("frozen", "none"):
        return ChannelAffine(channels, bias=bias)
    raise ValueError(f"norm must be one of {NORM_KINDS}, got {kind!r}")


def trainable_norm(norm: nn.Module) -> bool:
    """Whether ``norm``'s affine weight is a parameter a block may initialise (not a frozen norm's buffer)."""
    return isinstance(getattr(norm, "weight", None), nn.Parameter)


def scale_shift(norm: nn.Module) -> Tuple[Tensor, Tensor]:
    """Per-channel ``(scale, shift)`` with ``norm(y) = scale * y + shift`` in eval mode.

    :class:`ChannelAffine`: ``(weight, bias)``; a BatchNorm of any dimension, ``SyncBatchNorm`` or a
    frozen BN (anything with ``running_mean`` / ``running_var`` / ``eps``):
    :func:`acnet.transforms.bn_scale_shift`.
    """
    if isinstance(norm, ChannelAffine):
        return norm.weight, norm.bias if norm.bias is not None else torch.zeros_like(norm.weight)
    return transforms.bn_scale_shift(norm)


def fuse_norm(kernel: Tensor, norm: nn.Module, conv_bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``norm(conv(x; kernel, conv_bias)) = conv(x; kernel * s, s * conv_bias + t)``, ``(s, t) = scale_shift(norm)``.

    ``kernel`` output-channel major (a conv's layout; a transposed conv's kernel after
    :func:`acnet.transforms.swap_in_out`)."""
    scale, shift = scale_shift(norm)
    return transforms.fuse_scale_shift(kernel, scale, shift, conv_bias)


@torch.no_grad()
def load_norm(target: nn.Module, source: Optional[nn.Module], conv_bias: Optional[Tensor] = None) -> None:
    """Make ``target(y)`` equal ``source(y + conv_bias)`` in eval mode (``source=None``: ``y + conv_bias``).

    A BatchNorm / :class:`FrozenBatchNorm` target takes the source's affine parameters, running
    statistics (the mean shifted by ``conv_bias``), ``eps`` and batch count; it needs a source with
    running statistics. A :class:`ChannelAffine` target takes the source's eval-mode scale and shift
    (folded with ``conv_bias``).
    """
    if isinstance(target, ChannelAffine):
        if source is None:
            target.weight.fill_(1.0)
            shift = conv_bias
        else:
            scale, shift = scale_shift(source)
            target.weight.copy_(scale)
            shift = shift if conv_bias is None else shift + scale * conv_bias
        if target.bias is not None:
            target.bias.copy_(shift if shift is not None else torch.zeros_like(target.bias))
        elif shift is not None and bool((shift != 0).any()):
            raise ValueError("the block has no biases (bias=False): it cannot take a conv bias or a norm's shift; "
                             "build it with bias=True")
        return
    if source is None or getattr(source, "running_mean", None) is None or getattr(source, "running_var", None) is None:
        raise ValueError(
            f"a {type(target).__name__} main branch needs a norm with running statistics to load; a conv without "
            "one goes into a block with norm='none'"
        )
    weight = getattr(source, "weight", None)
    bias = getattr(source, "bias", None)
    if target.weight is not None:
        target.weight.copy_(weight if weight is not None else torch.ones_like(target.weight))
        target.bias.copy_(bias if bias is not None else torch.zeros_like(target.bias))
    elif weight is not None:
        raise ValueError("the block's BatchNorms have no affine parameters (use_affine=False) to load the norm's into")
    target.running_mean.copy_(source.running_mean if conv_bias is None else source.running_mean - conv_bias)
    target.running_var.copy_(source.running_var)
    target.eps = source.eps
    count, target_count = getattr(source, "num_batches_tracked", None), getattr(target, "num_batches_tracked", None)
    if count is not None and target_count is not None:
        target_count.copy_(count)
