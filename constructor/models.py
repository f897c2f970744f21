"""``build_model``: a registered arch built with one block type, knowing the weight names it can load."""
from __future__ import annotations

import functools
from typing import Any, Optional

from torch import nn

from .original_formats import known_schemes
from .registry import build_arch

__all__ = ["build_model"]


def build_model(
    arch: str, block_type: str = "base", deploy: bool = False, num_classes: Optional[int] = None, **block_kwargs: Any
) -> nn.Module:
    """:func:`constructor.registry.build_arch` (same arguments), with ``model.weight_naming_schemes``:
    the naming schemes of the files this model loads (ours and the original repositories'), which
    ``acnet.acnet_fuse_and_load`` reads."""
    model = build_arch(arch, block_type, deploy=deploy, num_classes=num_classes, **block_kwargs)
    model.weight_naming_schemes = functools.partial(known_schemes, arch, num_classes)
    return model
