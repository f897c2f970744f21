"""Architectures and the conv-builder switch.

``build_model(arch, block_type='base', deploy=False, num_classes=None, **block_kwargs)`` builds a
registered architecture (``list_archs()``) whose conv-BN units are all of one block type
(``BLOCK_TYPES``, from :mod:`acnet.registry`: 'base', 'acb', 'dbb', 'orepa') or in the shared deploy form. See
:mod:`constructor.builder` for the units and how their training and deploy forms map.
"""
import importlib

from .published import PublishedResult

# The names below live in modules that import torch; they are loaded on first use (PEP 562), so that
# ``import constructor.published`` (show_log.py's published numbers) stays torch-free.
_LAZY = {
    "BiasFreeConv": "builder", "ConvBuilder": "builder", "is_reparameterizable_kernel": "builder",
    "make_builder": "builder", "build_model": "models", "naming_schemes": "models",
    "ARCHS": "registry", "ArchSpec": "registry", "get_arch_spec": "registry", "list_archs": "registry",
    "register_arch": "registry", "unregister_arch": "registry",
}

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
    """The torch-importing names of :data:`_LAZY`, imported on first use; ``BLOCK_TYPES``: the registered
    block type names, read live from :mod:`acnet.registry`."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later reads skip this function
        return value
    if name == "BLOCK_TYPES":
        from acnet.registry import block_type_names

        return block_type_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | {"BLOCK_TYPES"})
