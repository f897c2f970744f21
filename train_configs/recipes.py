"""Per-arch training recipes: the original ACNet repository's settings (docs/training.md, "Architectures
and recipes", whose table docs/tables.py generates from this one).

Common to every recipe (the original's): SGD with momentum 0.9 (Nesterov off), learning rate decayed
by a cosine to 0 *per iteration* over the whole run, no warmup, weight decay also on BN weights and
biases, and biases (every parameter named ``*.bias``, BN included) at twice the learning rate.
``lr`` is for the ``batch_size`` given here (the GLOBAL batch over all ranks); changing the batch on
the command line does not rescale it (pass ``--lr`` yourself, e.g. linearly).

``gamma_init`` is the initial weight of every BN of every ACB branch (1/3 on CIFAR, 1 on ImageNet);
it is passed to the ACB builder only. Validation runs every ``val_every`` epochs, every epoch during
the last ``val_tail_epochs`` epochs, and always after the last epoch (``show_log.py`` averages the
final evaluations).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["Recipe", "RECIPES", "get_recipe", "list_recipes"]


@dataclass(frozen=True)
class Recipe:
    """Everything that defines a training run besides the arch and the block type."""

    batch_size: int  # global, over all ranks
    lr: float  # base learning rate for `batch_size`
    epochs: int
    weight_decay: float
    gamma_init: float  # initial BN weight of every ACB branch
    dataset: str = "cifar10"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay_bias: float | None = None  # None: same as weight_decay (the original's setting)
    bias_lr_factor: float = 2.0
    warmup_epochs: float = 0.0  # linear warmup from 0 over this many epochs (0: none, the original)
    label_smoothing: float = 0.0
    val_every: int = 5
    val_tail_epochs: int = 10

    def effective_weight_decay_bias(self) -> float:
        return self.weight_decay if self.weight_decay_bias is None else self.weight_decay_bias

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_CIFAR = dict(dataset="cifar10", batch_size=128, gamma_init=1 / 3, val_every=5, val_tail_epochs=10)
_IMAGENET = dict(dataset="imagenet", batch_size=256, gamma_init=1.0, val_every=5, val_tail_epochs=5)

#: arch -> recipe.  Read it as a table: batch / lr / epochs / weight decay / gamma init.
RECIPES: dict[str, Recipe] = {
    "cfqkbnc": Recipe(**_CIFAR, lr=0.1, epochs=150, weight_decay=1e-4),
    "vc": Recipe(**_CIFAR, lr=0.1, epochs=400, weight_decay=1e-4),
    "src56": Recipe(**_CIFAR, lr=0.2, epochs=400, weight_decay=1e-4),
    # ResNet-110: the original has no separate entry; it shares the ResNet-56 recipe.
    "src110": Recipe(**_CIFAR, lr=0.2, epochs=400, weight_decay=1e-4),
    "wrnc16plain": Recipe(**_CIFAR, lr=0.1, epochs=400, weight_decay=5e-4),
    "sres18": Recipe(**_IMAGENET, lr=0.1, epochs=100, weight_decay=1e-4),
    "sres34": Recipe(**_IMAGENET, lr=0.1, epochs=100, weight_decay=1e-4),
    "sres50": Recipe(**_IMAGENET, lr=0.1, epochs=100, weight_decay=1e-4),
    # MobileNetV1: not in the ACNet table; the ImageNet recipe with the usual MobileNet weight decay
    # (depthwise kernels have few weights and over-regularise at 1e-4).
    "smi1": Recipe(**_IMAGENET, lr=0.1, epochs=100, weight_decay=4e-5),
}


def list_recipes() -> list[str]:
    return sorted(RECIPES)


def get_recipe(arch: str, **overrides: Any) -> Recipe:
    """The recipe of ``arch`` with ``overrides`` applied (``None`` values are ignored).

    Raises ``ValueError`` naming the valid archs / fields when ``arch`` or an override is unknown,
    and when a value is out of range.
    """
    if arch not in RECIPES:
        raise ValueError(f"no training recipe for arch {arch!r}; recipes exist for: {', '.join(list_recipes())}")
    valid = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown recipe field(s) {unknown}; valid fields: {', '.join(sorted(valid))}")
    recipe = dataclasses.replace(RECIPES[arch], **{k: v for k, v in overrides.items() if v is not None})
    validate_recipe(recipe)
    return recipe


def validate_recipe(recipe: Recipe) -> None:
    """Raise ``ValueError`` naming the offending field and value when a recipe cannot train."""
    r = recipe
    rules = [
        ("batch_size", r.batch_size >= 1, ">= 1"),
        ("epochs", r.epochs >= 1, ">= 1"),
        ("lr", r.lr > 0, "> 0"),
        ("weight_decay", r.weight_decay >= 0, ">= 0"),
        ("weight_decay_bias", r.effective_weight_decay_bias() >= 0, ">= 0"),
        ("momentum", 0 <= r.momentum < 1, "in [0, 1)"),
        ("bias_lr_factor", r.bias_lr_factor > 0, "> 0"),
        ("warmup_epochs", 0 <= r.warmup_epochs < r.epochs, f"in [0, epochs={r.epochs})"),
        ("label_smoothing", 0 <= r.label_smoothing < 1, "in [0, 1)"),
        ("val_every", r.val_every >= 1, ">= 1"),
        ("val_tail_epochs", r.val_tail_epochs >= 0, ">= 0"),
        ("gamma_init", r.gamma_init > 0, "> 0"),
    ]
    for name, ok, rule in rules:
        if not ok:
            raise ValueError(f"bad recipe value: {name} must be {rule}, got {getattr(r, name)!r}")


def should_validate(recipe: Recipe, epoch: int) -> bool:
    """Whether to evaluate after 0-based ``epoch``."""
    last = recipe.epochs - 1
    return epoch == last or (epoch + 1) % recipe.val_every == 0 or epoch >= recipe.epochs - recipe.val_tail_epochs
