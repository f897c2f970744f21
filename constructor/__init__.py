"""Architectures and the conv-builder switch.

``build_model(arch, block_type='base', deploy=False, num_classes=None, **block_kwargs)`` builds a
registered architecture (``list_archs()``) whose conv-BN units are all of one block type
(``BLOCK_TYPES``, from :mod:`acnet.registry`: 'base', 'acb', 'dbb', 'orepa') or in the shared deploy form. See
:mod:`constructor.builder` for the units and how their training and deploy forms map.
"""
from .builder import BiasFreeConv, ConvBuilder, is_reparameterizable_kernel, make_builder
from .models import build_model, naming_schemes
from .published import PublishedResult
from .registry import ARCHS, ArchSpec, get_arch_spec, list_archs, register_arch, unregister_arch

__all__ = [
    "ARCHS",
    "ArchSpec",
    "BLOCK_TYPES",
    "BiasFreeConv",
    "ConvBuilder",
    "build_model",
    "get_arch_spec",
    "is_reparameterizable_kernel",
    "list_archs",
    "make_builder",
    "naming_schemes",
    "PublishedResult",
    "register_arch",
    "unregister_arch",
]


def __getattr__(name: str):
    """``BLOCK_TYPES``: the registered block type names (``acnet.registry.block_type_names()``, read at
    each access: a block type registered at run time is seen), the one alias of that function."""
    if name == "BLOCK_TYPES":
        from acnet.registry import block_type_names

        return block_type_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
