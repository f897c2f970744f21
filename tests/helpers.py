"""Small helpers shared by the block, conversion and architecture tests."""
from __future__ import annotations

import torch
from torch import nn

from constructor import build_model


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Random conv weights, BN affine parameters and running statistics (so fusion is non-trivial)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=torch.float64))
            elif isinstance(m, nn.BatchNorm2d):
                shape = m.running_mean.shape
                m.running_mean.copy_(torch.randn(shape, generator=gen, dtype=torch.float64))
                m.running_var.copy_(torch.rand(shape, generator=gen, dtype=torch.float64) * 2 + 0.1)
                if m.affine:
                    m.weight.copy_(torch.randn(shape, generator=gen, dtype=torch.float64))
                    m.bias.copy_(torch.randn(shape, generator=gen, dtype=torch.float64))
    return module


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|``."""
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def on_meta(arch: str, block_type: str = "base", deploy: bool = False, **kwargs) -> nn.Module:
    """The model built on the meta device: structure and shapes without initialisation cost."""
    with torch.device("meta"):
        return build_model(arch, block_type, deploy=deploy, **kwargs)


def gradcheck_equivalent_kernel(block: nn.Module) -> list:
    """``torch.autograd.gradcheck`` of ``block.get_equivalent_kernel_bias()`` in all the block's parameters
    (float64); returns the parameter names checked."""
    class Equivalent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = block

        def forward(self):
            return self.block.get_equivalent_kernel_bias()

    wrapper = Equivalent()
    names = [n for n, _ in wrapper.named_parameters()]
    inputs = tuple(p.detach().clone().requires_grad_(True) for _, p in wrapper.named_parameters())
    assert torch.autograd.gradcheck(lambda *t: torch.func.functional_call(wrapper, dict(zip(names, t)), ()), inputs)
    return [n[len("block."):] for n in names]


def mild_bn_statistics_(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BN running statistics and affine parameters that keep deep nets finite (eval mode)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return model.eval()


def randomize_all_(module: nn.Module, seed: int, scale: float = 0.5) -> nn.Module:
    """Every parameter random (``scale * N(0, 1)``) and every norm buffer random -- running means and frozen
    affine buffers ``N(0, 1)``, running variances in [0.5, 1.5] -- for any dimension and norm kind."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale)
        for name, b in module.named_buffers():
            last = name.rsplit(".", 1)[-1]
            if last == "running_var":
                b.copy_(torch.rand(b.shape, generator=gen, dtype=torch.float64) + 0.5)
            elif last in ("running_mean", "weight", "bias"):
                b.copy_(torch.randn(b.shape, generator=gen, dtype=torch.float64))
    return module


@torch.no_grad()
def randomize_state_(model: nn.Module, seed: int) -> nn.Module:
    """Every float state-dict entry random, as after some training: kernels uniform with a fan-in scale,
    running variances in [0.5, 2], running means and biases in [-0.5, 0.5], norm weights in [0.5, 1.5]
    (non-persistent buffers such as DBB's identity kernel are not state)."""
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not tensor.is_floating_point():
            continue
        noise = torch.rand(tensor.shape, generator=gen, dtype=torch.float64).to(tensor.dtype)
        if name.endswith("running_var"):
            tensor.copy_(0.5 + 1.5 * noise)
        elif name.endswith("running_mean") or name.endswith("bias"):
            tensor.copy_(noise - 0.5)
        elif tensor.dim() == 1:  # norm weights
            tensor.copy_(0.5 + noise)
        else:
            fan_in = tensor[0].numel()
            tensor.copy_((2 * noise - 1) * (3.0 / fan_in) ** 0.5)
    return model


@torch.no_grad()
def randomize_norm_state_(model: nn.Module, seed: int) -> nn.Module:
    """Random 1-D float state (norm affine parameters and statistics, conv biases), kernels kept, as a
    pretrained model has: running variances and weights in [0.5, 1.5], means and biases in [-0.5, 0.5]."""
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not tensor.is_floating_point() or tensor.dim() != 1:
            continue
        noise = torch.rand(tensor.shape, generator=gen, dtype=torch.float64).to(tensor.dtype)
        if name.endswith("running_mean") or name.endswith("bias"):
            tensor.copy_(noise - 0.5)
        else:
            tensor.copy_(0.5 + noise)
    return model
