"""The one registry of block types: name -> block class.

A block type is declared once: its class carries what the project needs (``signature``,
``recipe_options``, ``deploy_conv_name``, ``stored_options``, ``unsupported``, ``load_main_branch``:
the block contract of :mod:`acnet.block`); :class:`BlockType` is a thin view of it. Read live by
:func:`acnet.convert_to_acnet` (which class to plug in), :func:`acnet.acnet_fuse_and_load` (how to
recognise a stored block and rebuild it), the architecture builder (``constructor``) and the command
line (``do_acnet.py -b``); :func:`register_block_type` adds one at run time for all of them.

Importing this module imports neither torch nor any block: a class may be registered as a
``"package.module:ClassName"`` string, imported on first use of :attr:`BlockType.block_class`, so
:func:`block_type_names` and a type's ``name`` / ``paper`` / ``description`` / ``plain`` are read
without torch (``do_acnet.py -h``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Mapping, Tuple, Union

if TYPE_CHECKING:  # the registry itself imports no torch: `do_acnet.py -h` lists the names without it
    from torch import Tensor

__all__ = ["BlockType", "BLOCK_REGISTRY", "block_type_names", "get_block_type", "register_block_type",
           "unregister_block_type"]


@dataclass(frozen=True, init=False)
class BlockType:
    """One block type: its ``-b`` name and its class; everything else is read from the class.

    ``name``: the ``-b`` name. ``block_class``: the :class:`~acnet.block.ReparamBlock` trained in place of
    each eligible conv-norm pair, given as the class or as a ``"package.module:ClassName"`` string
    (``block_ref``), imported on the first use of :attr:`block_class` (the registry stays importable
    without torch: names, papers and descriptions are read without importing any block). The class
    declares what the rest of the project needs (the block contract): ``signature`` (a state-dict key,
    under a conv's prefix, that identifies a stored training-time block of this type),
    ``recipe_options`` (the recipe fields of ``train_configs`` passed to every block as options),
    ``deploy_conv_name`` (the fused conv's attribute name), ``stored_options(state, in_channels)``
    (constructor options read from a stored block's entries) and ``load_main_branch`` (keep_weights).
    ``plain``: the plain conv-BN unit (the ``base`` network: the builder keeps its plain units and
    :func:`~acnet.convert_to_acnet` has nothing to plug in). ``paper``: where the block comes from.
    """

    name: str
    block_ref: Union[type, str]
    plain: bool = False
    paper: str = ""
    description: str = field(default="", compare=False)

    def __init__(self, name: str, block_class: Union[type, str], plain: bool = False, paper: str = "",
                 description: str = "") -> None:
        for attribute, value in (("name", name), ("block_ref", block_class), ("plain", plain), ("paper", paper),
                                 ("description", description)):
            object.__setattr__(self, attribute, value)

    @property
    def block_class(self) -> type:
        """The block class; a ``"module:Class"`` reference is imported and checked (the block contract)
        on first use, a bad one is one ``ValueError`` / ``TypeError`` naming the block type."""
        resolved = self.__dict__.get("_block_class")
        if resolved is None:
            resolved = _import_block_class(self.name, self.block_ref)
            _check_block_class(self.name, resolved)
            object.__setattr__(self, "_block_class", resolved)
        return resolved

    @property
    def signature(self) -> str:
        """State-dict key (under the block's prefix) of a stored training-time block of this type."""
        return self.block_class.signature

    @property
    def recipe_options(self) -> Tuple[str, ...]:
        """Recipe fields passed to every block of this type as constructor options."""
        return tuple(self.block_class.recipe_options)

    @property
    def deploy_conv_name(self) -> str:
        """Attribute name of the fused conv of a deployed block (the original implementations')."""
        return self.block_class.deploy_conv_name

    def stored_options(self, state: Mapping[str, "Tensor"], in_channels: int) -> Dict[str, object]:
        """Constructor options read from a stored block's entries (the class's ``stored_options``)."""
        return dict(self.block_class.stored_options(state, in_channels))


#: Block types by name, in the order the command line lists them (classes by reference: importing the
#: registry imports no block, nor torch).
BLOCK_REGISTRY: Dict[str, BlockType] = {
    spec.name: spec
    for spec in (
        BlockType("base", "acnet.block:ConvBN", plain=True, description="plain conv-BN"),
        BlockType("acb", "acnet.acb:ACBlock", paper="ACNet, ICCV 2019", description="KxK + 1xK + Kx1 conv-BN branches"),
        BlockType("dbb", "acnet.dbb:DiverseBranchBlock", paper="DBB, CVPR 2021",
                  description="four conv-BN branches (KxK, 1x1, 1x1-avg, 1x1-KxK)"),
        BlockType("orepa", "acnet.orepa:OREPABlock", paper="OREPA, CVPR 2022",
                  description="six scaled linear branches merged into one kernel every step, one BN"),
        BlockType("repvgg", "acnet.repvgg:RepVGGBlock", paper="RepVGG, CVPR 2021",
                  description="KxK conv-BN + 1x1 conv-BN + identity BN (in == out, stride 1)"),
        BlockType("mobileone", "acnet.mobileone:MobileOneBlock", paper="MobileOne, CVPR 2023",
                  description="k KxK conv-BN + 1x1 conv-BN (K > 1) + identity BN (in == out, stride 1)"),
        BlockType("ecb", "acnet.ecb:ECBlock", paper="ECBSR, ACM MM 2021",
                  description="BN-free KxK + 1x1-KxK + 1x1-Sobel/Laplacian branches (then the conv's own norm)"),
        BlockType("dilated", "acnet.dilated:DilatedReparamBlock", paper="RepLKNet CVPR 2022 / UniRepLKNet CVPR 2024",
                  description="large KxK (K >= 5) conv-BN + small dilated conv-BN branches"),
    )
}


def block_type_names() -> Tuple[str, ...]:
    """Every block type name (``base`` first), as the command line offers them."""
    return tuple(BLOCK_REGISTRY)


def get_block_type(name: str) -> BlockType:
    """The :class:`BlockType` called ``name`` (case-insensitive); an unknown name is one ``ValueError``."""
    key = name.lower() if isinstance(name, str) else name
    if key not in BLOCK_REGISTRY:
        raise ValueError(f"unknown block type {name!r}; valid block types: {', '.join(BLOCK_REGISTRY)}")
    return BLOCK_REGISTRY[key]


def _import_block_class(name: str, ref: Union[type, str]) -> object:
    """The object a block type's ``"module:Class"`` reference names (a class is returned as it is)."""
    if not isinstance(ref, str):
        return ref
    module_name, _, attribute = ref.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"block type {name!r}: cannot import its block class {ref!r} ({type(exc).__name__}: "
                         f"{exc}); give the class or a 'package.module:ClassName' string") from None


def _check_block_class(name: str, block_class: object) -> None:
    """The contract checks a block class must pass to be registered."""
    from .block import ReparamBlock  # here, not at the top: the registry is read without torch

    if not (isinstance(block_class, type) and issubclass(block_class, ReparamBlock)):
        raise TypeError(f"block type {name!r}: {block_class!r} is not a ReparamBlock")
    if not (isinstance(block_class.signature, str) and block_class.signature):
        raise ValueError(f"block type {name!r}: {block_class.__name__}.signature must name a state-dict "
                         "key of a stored training-time block (e.g. 'square_conv.weight')")


def _check_block_type(spec: BlockType) -> None:
    """A class is checked at once; a ``"module:Class"`` reference for its form (imported on first use)."""
    if not isinstance(spec, BlockType):
        raise TypeError(f"register_block_type takes a BlockType, got {type(spec).__name__}")
    if not isinstance(spec.name, str) or not spec.name or spec.name != spec.name.lower():
        raise ValueError(f"block type name must be a non-empty lower-case str, got {spec.name!r}")
    ref = spec.block_ref
    if isinstance(ref, str):
        module_name, colon, attribute = ref.partition(":")
        if not (colon and attribute.isidentifier() and all(p.isidentifier() for p in module_name.split("."))):
            raise ValueError(f"block type {spec.name!r}: {ref!r} is not a 'package.module:ClassName' reference")
    else:
        spec.block_class  # noqa: B018 - resolves and checks the class


def register_block_type(spec: BlockType, *, replace: bool = False) -> BlockType:
    """Add ``spec`` to :data:`BLOCK_REGISTRY` at run time; every path (conversion, builder, CLI, show_log)
    reads the registry live, so the new type is usable at once. An existing name is a ``ValueError``
    unless ``replace=True``. Returns ``spec``."""
    _check_block_type(spec)
    if spec.name in BLOCK_REGISTRY and not replace:
        raise ValueError(f"block type {spec.name!r} is already registered (pass replace=True to replace it)")
    BLOCK_REGISTRY[spec.name] = spec
    return spec


def unregister_block_type(name: str) -> BlockType:
    """Remove and return the block type called ``name`` (the inverse of :func:`register_block_type`)."""
    spec = get_block_type(name)
    del BLOCK_REGISTRY[spec.name]
    return spec


for _spec in BLOCK_REGISTRY.values():
    _check_block_type(_spec)
