"""Quantization-aware training on the equivalent kernel (pure torch).

Every conv unit of a training-time model (any :class:`~acnet.ReparamBlock`: ACB, DBB, conv-BN, or a
plain ``nn.Conv2d``) and every ``nn.Linear`` is wrapped in a :class:`QATUnit` that computes, in
training and in eval mode alike::

    x_q = fq_u8(x; s_x, z_x)                       activation: per-tensor asymmetric uint8
    K, b = block.get_equivalent_kernel_bias()      differentiable through every branch
    s_w = max_{c,i,j} |K[o]| / 127                 per output channel, symmetric int8
    K_q = fq_s8(K; s_w),  b_q = fq_s32(b; s_x * s_w)
    y = conv(x_q, K_q) + b_q                       (the block's nonlinearity after it, if any)

with ``fq(v; s, z) = (clamp(round(v / s) + z, qmin, qmax) - z) * s`` and straight-through
gradients (``d fq / d v = 1`` inside the clamp range, 0 outside; ``s_w`` is not learned). The
block's BNs enter only through the equivalent kernel, i.e. with their running statistics: BN
statistics are frozen (the block is exactly ``conv(x, K_eq) + b_eq``, as the converted conv will
be), while BN weights and biases still learn. Standalone BNs (pre-activation WRN) become
:class:`~acnet.norms.FrozenBatchNorm` s with trainable affine parameters for the same reason.

Activation ranges ``[min, max]`` are running averages of each batch's min and max in training
mode (``momentum``, the first batch sets them) and frozen in eval mode; ``s_x, z_x`` follow
onnxruntime's asymmetric rule (``rmin = min(min, 0)``, ``rmax = max(max, 0)``,
``s = (rmax - rmin) / 255``, ``z = round(-rmin / s)``), so an int8 runtime given the same
``(s_x, z_x)`` (:func:`activation_qparams`) reproduces the QAT model. :func:`convert_qat` returns the
deploy model whose convs hold ``K_q`` (exactly ``int8 * s_w``) and ``b``: it computes what the QAT
model computes when its conv inputs, weights and biases are quantized with those scales.
"""
from __future__ import annotations

import copy
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .block import ReparamBlock
from .norms import FrozenBatchNorm

__all__ = ["fake_quantize", "weight_scale", "ActivationQuantizer", "QATUnit", "prepare_qat",
           "convert_qat", "activation_qparams", "qat_units", "INT8_MAX", "UINT8_MAX", "INT32_MAX"]

INT8_MAX = 127
UINT8_MAX = 255
INT32_MAX = 2 ** 31 - 1


class _FakeQuantize(torch.autograd.Function):
    """``(clamp(round(v / s) + z, qmin, qmax) - z) * s``; gradient 1 where ``round(v / s) + z`` is in range."""

    @staticmethod
    def forward(ctx, v: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
        q = torch.round(v / scale) + zero_point
        ctx.save_for_backward((q >= qmin) & (q <= qmax))
        return (q.clamp(qmin, qmax) - zero_point) * scale

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def fake_quantize(v: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Quantize-dequantize ``v`` (round half to even, as ONNX ``QuantizeLinear``); straight-through gradient.

    ``scale`` / ``zero_point`` broadcast against ``v`` (per-channel: shape ``(O, 1, 1, 1)``).
    """
    return _FakeQuantize.apply(v, scale.detach(), zero_point.detach(), qmin, qmax)


def weight_scale(kernel: Tensor) -> Tensor:
    """Per-output-channel symmetric int8 scale ``max |kernel[o]| / 127`` (1 for an all-zero channel), detached.

    Shaped to broadcast against ``kernel`` (``(O, 1, ...)``).
    """
    absmax = kernel.detach().abs().flatten(1).amax(dim=1)
    scale = torch.where(absmax > 0, absmax / INT8_MAX, torch.ones_like(absmax))
    return scale.view(-1, *([1] * (kernel.dim() - 1)))


class ActivationQuantizer(nn.Module):
    """Per-tensor asymmetric uint8 fake quantization with a running min/max (module docstring).

    Buffers ``min_val``, ``max_val`` (the range) and ``observed`` (0 until the first training batch).
    An input seen before any range is observed passes through unchanged (and, in training, sets it).
    """

    def __init__(self, momentum: float = 0.01) -> None:
        super().__init__()
        if not 0 < momentum <= 1:
            raise ValueError(f"ActivationQuantizer: momentum must be in (0, 1], got {momentum!r}")
        self.momentum = momentum
        self.register_buffer("min_val", torch.zeros(()))
        self.register_buffer("max_val", torch.zeros(()))
        self.register_buffer("observed", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        low, high = x.detach().aminmax()
        low, high = low.to(self.min_val.dtype), high.to(self.max_val.dtype)
        if int(self.observed) == 0:
            self.min_val.copy_(low)
            self.max_val.copy_(high)
        else:
            self.min_val.lerp_(low, self.momentum)
            self.max_val.lerp_(high, self.momentum)
        self.observed.add_(1)

    def qparams(self) -> Tuple[Tensor, Tensor]:
        """``(scale, zero_point)`` float32 scalars of the current range (onnxruntime's rule)."""
        rmin = torch.clamp(self.min_val.float(), max=0.0)
        rmax = torch.clamp(self.max_val.float(), min=0.0)
        span = rmax - rmin
        scale = torch.where(span > 0, span / UINT8_MAX, torch.ones_like(span))
        zero_point = torch.round(-rmin / scale).clamp(0, UINT8_MAX)
        return scale, zero_point

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.observe(x)
        if int(self.observed) == 0:
            return x
        scale, zero_point = self.qparams()
        return fake_quantize(x, scale.to(x.dtype), zero_point.to(x.dtype), 0, UINT8_MAX)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, range=[{float(self.min_val):.4g}, {float(self.max_val):.4g}]"


def _kernel_bias(module: nn.Module) -> Tuple[Tensor, Tensor]:
    if isinstance(module, ReparamBlock):
        return module.get_equivalent_kernel_bias()
    weight = module.weight
    bias = module.bias if module.bias is not None else weight.new_zeros(weight.shape[0])
    return weight, bias


class QATUnit(nn.Module):
    """A conv unit or linear layer with fake-quantized input, equivalent kernel and bias (module docstring).

    Children: ``block`` (the wrapped module, trained as usual) and ``input_quant``
    (:class:`ActivationQuantizer`).
    """

    def __init__(self, block: nn.Module, momentum: float = 0.01) -> None:
        super().__init__()
        if isinstance(block, ReparamBlock) and block.padding_mode != "zeros":
            raise ValueError(f"QATUnit: padding_mode {block.padding_mode!r} is not supported (zeros only)")
        if isinstance(block, ReparamBlock) and (block.transposed or block.dim != 2):
            raise ValueError(f"QATUnit: a {'transposed' if block.transposed else f'{block.dim}-d'} block is not "
                             "supported (2-d conv blocks only)")
        if isinstance(block, nn.Conv2d) and block.padding_mode != "zeros":
            raise ValueError(f"QATUnit: padding_mode {block.padding_mode!r} is not supported (zeros only)")
        self.block = block
        self.input_quant = ActivationQuantizer(momentum)

    @property
    def is_linear(self) -> bool:
        return isinstance(self.block, nn.Linear)

    def quantized_kernel_bias(self) -> Tuple[Tensor, Tensor, Tensor]:
        """``(K_q, b_q, s_w)``: the fake-quantized equivalent kernel and bias and the weight scales."""
        kernel, bias = _kernel_bias(self.block)
        s_w = weight_scale(kernel)
        zero = torch.zeros((), dtype=kernel.dtype, device=kernel.device)
        k_q = fake_quantize(kernel, s_w, zero, -INT8_MAX, INT8_MAX)
        s_x = self.input_quant.qparams()[0].to(kernel.dtype)
        b_q = fake_quantize(bias, s_x * s_w.flatten(), zero, -INT32_MAX - 1, INT32_MAX)
        return k_q, b_q, s_w

    def forward(self, x: Tensor) -> Tensor:
        x = self.input_quant(x)
        k_q, b_q, _ = self.quantized_kernel_bias()
        if self.is_linear:
            return F.linear(x, k_q, b_q)
        b = self.block
        out = F.conv2d(x, k_q, b_q, b.stride, b.padding, b.dilation, b.groups)
        nonlinear = getattr(b, "nonlinear", None)
        return out if nonlinear is None else nonlinear(out)

    def deploy_module(self) -> nn.Module:
        """A new ``nn.Conv2d(bias=True)`` / ``nn.Linear`` holding ``K_q`` and the float bias ``b``."""
        with torch.no_grad():
            k_q, _, _ = self.quantized_kernel_bias()
            bias = _kernel_bias(self.block)[1]
            b = self.block
            if self.is_linear:
                module = nn.Linear(b.in_features, b.out_features, bias=True, dtype=k_q.dtype, device=k_q.device)
            else:
                module = nn.Conv2d(b.in_channels, b.out_channels, b.kernel_size, stride=b.stride, padding=b.padding,
                                   dilation=b.dilation, groups=b.groups, bias=True, dtype=k_q.dtype,
                                   device=k_q.device)
            module.weight.copy_(k_q)
            module.bias.copy_(bias)
        nonlinear = getattr(self.block, "nonlinear", None)
        if nonlinear is not None and not isinstance(nonlinear, nn.Identity):
            return nn.Sequential(module, copy.deepcopy(nonlinear))
        return module


def _is_unit(module: nn.Module) -> bool:
    return isinstance(module, (ReparamBlock, nn.Conv2d, nn.Linear))


def prepare_qat(model: nn.Module, momentum: float = 0.01) -> nn.Module:
    """Wrap, in place, every conv unit and linear layer of ``model`` in a :class:`QATUnit`; freeze standalone BNs.

    Returns ``model``. A deployed block is wrapped like a plain conv. State-dict keys of a wrapped
    module ``m`` become ``m.block.*`` plus ``m.input_quant.*``.
    """
    for name, child in list(model.named_children()):
        if isinstance(child, QATUnit):
            continue
        if _is_unit(child):
            setattr(model, name, QATUnit(child, momentum))
        elif type(child) is nn.BatchNorm2d:
            setattr(model, name, FrozenBatchNorm.from_batch_norm(child))
        else:
            prepare_qat(child, momentum)
    return model


def qat_units(model: nn.Module) -> Dict[str, QATUnit]:
    """``{name: unit}`` of the :class:`QATUnit` s of ``model``, by their name in the model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QATUnit)}


def activation_qparams(model: nn.Module) -> Dict[str, Tuple[float, int]]:
    """``{unit name: (input scale, input zero point)}``: the uint8 quantization of each unit's input.

    A unit's name is the name its deploy conv / linear has in :func:`convert_qat`'s model.
    """
    out = {}
    for name, unit in qat_units(model).items():
        scale, zero_point = unit.input_quant.qparams()
        out[name] = (float(scale), int(zero_point))
    return out


def _replace_units(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, QATUnit):
            setattr(module, name, child.deploy_module())
        elif isinstance(child, FrozenBatchNorm) and child.trainable_affine:
            setattr(module, name, child.to_batch_norm())
        else:
            _replace_units(child)


def convert_qat(model: nn.Module) -> nn.Module:
    """The deploy model of a QAT model (a copy, eval mode): each :class:`QATUnit` -> its conv / linear
    holding the int8-representable kernel ``K_q`` and the bias ``b``; frozen BNs -> ``nn.BatchNorm2d``."""
    deploy = copy.deepcopy(model).eval()
    _replace_units(deploy)
    return deploy
