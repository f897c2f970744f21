"""Optimizer parameter groups and the per-iteration learning-rate schedule of the original recipes.

Parameter groups: every parameter whose name ends in ``bias`` (conv and BN biases) gets
``lr * bias_lr_factor`` and ``weight_decay_bias``; all others (conv/fc weights *and* BN weights) get
``lr`` and ``weight_decay``.

Schedule (one step per iteration, ``t`` = iterations done, ``T`` = total, ``W`` = warmup iterations)::

    factor(t) = t / W                                  for t < W        (linear warmup)
    factor(t) = 0.5 * (1 + cos(pi * (t - W) / (T - W)))  otherwise        (cosine to 0 at t = T)

and each group's lr is its base lr times ``factor(t)``, so the bias x2 ratio holds throughout.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["make_param_groups", "make_sgd", "CosineWarmupSchedule", "lr_factor"]


def make_param_groups(model: nn.Module, lr: float, weight_decay: float, *, bias_lr_factor: float = 2.0,
                      weight_decay_bias: float | None = None) -> list[dict]:
    """Two groups: weights (``lr``, ``weight_decay``) and biases (``lr*bias_lr_factor``, ``weight_decay_bias``)."""
    weights, biases = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (biases if name.endswith("bias") else weights).append(param)
    wd_bias = weight_decay if weight_decay_bias is None else weight_decay_bias
    groups = [{"params": weights, "lr": lr, "weight_decay": weight_decay, "name": "weights"}]
    if biases:
        groups.append({"params": biases, "lr": lr * bias_lr_factor, "weight_decay": wd_bias, "name": "biases"})
    return groups


def make_sgd(model: nn.Module, lr: float, weight_decay: float, *, momentum: float = 0.9, nesterov: bool = False,
             bias_lr_factor: float = 2.0, weight_decay_bias: float | None = None) -> torch.optim.SGD:
    groups = make_param_groups(model, lr, weight_decay, bias_lr_factor=bias_lr_factor,
                               weight_decay_bias=weight_decay_bias)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)


def lr_factor(iteration: int, total_iterations: int, warmup_iterations: int = 0) -> float:
    """The multiplier of the base lr after ``iteration`` steps (see the module docstring)."""
    if total_iterations <= 0:
        raise ValueError(f"total_iterations must be > 0, got {total_iterations}")
    if iteration < warmup_iterations:
        return iteration / warmup_iterations
    span = max(1, total_iterations - warmup_iterations)
    progress = min(1.0, (iteration - warmup_iterations) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class CosineWarmupSchedule:
    """Sets every group's lr to ``base_lr * lr_factor(t)``; call :meth:`step` once per iteration.

    Its whole state is the iteration counter (``state_dict``/``load_state_dict`` for resuming).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_iterations: int, warmup_iterations: int = 0):
        if not 0 <= warmup_iterations < total_iterations:
            raise ValueError(f"warmup_iterations must be in [0, {total_iterations}), got {warmup_iterations}")
        self.optimizer = optimizer
        self.total_iterations = total_iterations
        self.warmup_iterations = warmup_iterations
        self.base_lrs = [group.setdefault("initial_lr", group["lr"]) for group in optimizer.param_groups]
        self.iteration = 0
        self._apply()

    def _apply(self) -> None:
        factor = lr_factor(self.iteration, self.total_iterations, self.warmup_iterations)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def step(self) -> None:
        self.iteration += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "total_iterations": self.total_iterations,
                "warmup_iterations": self.warmup_iterations, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        if state["total_iterations"] != self.total_iterations:
            raise ValueError(
                f"the saved schedule spans {state['total_iterations']} iterations but this run has "
                f"{self.total_iterations} (different epochs, batch size or dataset size); continue with the "
                "original settings or start from scratch with -c fs")
        self.warmup_iterations = state["warmup_iterations"]
        self.base_lrs = list(state["base_lrs"])
        self.iteration = int(state["iteration"])
        self._apply()
