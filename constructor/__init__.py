"""Architectures and the conv-builder switch.

``build_model(arch, block_type='base', deploy=False, num_classes=None, **block_kwargs)`` builds a
registered architecture (``list_archs()``) whose conv-BN units are all of one block type
(``BLOCK_TYPES``, from :mod:`acnet.registry`: 'base', 'acb', 'dbb', 'orepa') or in the shared deploy form. See
:mod:`constructor.builder` for the units and how their training and deploy forms map.
"""
from .builder import BLOCK_TYPES, BiasFreeConv, ConvBuilder, is_reparameterizable_kernel, make_builder
from .registry import ARCHS, ArchSpec, build_model, get_arch_spec, list_archs

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
]
