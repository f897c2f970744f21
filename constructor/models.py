"""``build_model``: a registered arch built with one block type; ``naming_schemes``: the weight names it loads."""
from __future__ import annotations

from typing import Any, Optional, Tuple

from torch import nn

from acnet.schemes import NamingScheme

from .original_formats import known_schemes
from .registry import build_arch

__all__ = ["build_model", "naming_schemes"]


def build_model(
    arch: str, block_type: str = "base", deploy: bool = False, num_classes: Optional[int] = None, **block_kwargs: Any
) -> nn.Module:
    """:func:`constructor.registry.build_arch` (same arguments): ``arch`` with every conv-BN unit of type
    ``block_type``, or in the shared deploy form."""
    return build_arch(arch, block_type, deploy=deploy, num_classes=num_classes, **block_kwargs)


def naming_schemes(arch: str, num_classes: Optional[int] = None) -> Tuple[NamingScheme, ...]:
    """The naming schemes of the weight files a model of ``arch`` loads: ours, then the original ACNet / DBB
    repositories' (for ``acnet.acnet_fuse_and_load(..., naming_schemes=...)``), with a classifier of
    ``num_classes`` outputs (default: the arch's)."""
    return known_schemes(arch, num_classes)
