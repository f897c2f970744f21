"""The one registry of block types: name -> block class.

A block type is declared once: its class carries what the project needs (``signature``,
``recipe_options``, ``deploy_conv_name``, ``stored_options``, ``unsupported``, ``load_main_branch``:
the block contract of :mod:`acnet.block`); :class:`BlockType` is a thin view of it. Read live by
:func:`acnet.convert_to_acnet` (which class to plug in), :func:`acnet.acnet_fuse_and_load` (how to
recognise a stored block and rebuild it), the architecture builder (``constructor``) and the command
line (``do_acnet.py -b``); :func:`register_block_type` adds one at run time for all of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Mapping, Tuple

from torch import Tensor

from .acb import ACBlock
from .block import ConvBN, ReparamBlock
from .dbb import DiverseBranchBlock
from .dilated import DilatedReparamBlock
from .ecb import ECBlock
from .orepa import OREPABlock

__all__ = ["BlockType", "BLOCK_REGISTRY", "block_type_names", "get_block_type", "register_block_type",
           "unregister_block_type"]


@dataclass(frozen=True)
class BlockType:
    """One block type: its ``-b`` name and its class; everything else is read from the class.

    ``name``: the ``-b`` name. ``block_class``: the :class:`~acnet.block.ReparamBlock` trained in place of
    each eligible conv-norm pair; the class declares what the rest of the project needs (the block
    contract): ``signature`` (a state-dict key, under a conv's prefix, that identifies a stored
    training-time block of this type), ``recipe_options`` (the recipe fields of ``train_configs``
    passed to every block as options), ``deploy_conv_name`` (the fused conv's attribute name),
    ``stored_options(state, in_channels)`` (constructor options read from a stored block's entries) and
    ``load_main_branch`` (keep_weights). ``plain``: the plain conv-BN unit (the ``base`` network: the
    builder keeps its plain units and :func:`~acnet.convert_to_acnet` has nothing to plug in).
    ``paper``: where the block comes from.
    """

    name: str
    block_class: type
    plain: bool = False
    paper: str = ""
    description: str = field(default="", compare=False)

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

    def stored_options(self, state: Mapping[str, Tensor], in_channels: int) -> Dict[str, object]:
        """Constructor options read from a stored block's entries (the class's ``stored_options``)."""
        return dict(self.block_class.stored_options(state, in_channels))


#: Block types by name, in the order the command line lists them.
BLOCK_REGISTRY: Dict[str, BlockType] = {
    spec.name: spec
    for spec in (
        BlockType("base", ConvBN, plain=True, description="plain conv-BN"),
        BlockType("acb", ACBlock, paper="ACNet, ICCV 2019", description="KxK + 1xK + Kx1 conv-BN branches"),
        BlockType("dbb", DiverseBranchBlock, paper="DBB, CVPR 2021",
                  description="four conv-BN branches (KxK, 1x1, 1x1-avg, 1x1-KxK)"),
        BlockType("orepa", OREPABlock, paper="OREPA, CVPR 2022",
                  description="six scaled linear branches merged into one kernel every step, one BN"),
        BlockType("ecb", ECBlock, paper="ECBSR, ACM MM 2021",
                  description="BN-free KxK + 1x1-KxK + 1x1-Sobel/Laplacian branches (then the conv's own norm)"),
        BlockType("dilated", DilatedReparamBlock, paper="RepLKNet CVPR 2022 / UniRepLKNet CVPR 2024",
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


def _check_block_type(spec: BlockType) -> None:
    if not isinstance(spec, BlockType):
        raise TypeError(f"register_block_type takes a BlockType, got {type(spec).__name__}")
    if not isinstance(spec.name, str) or not spec.name or spec.name != spec.name.lower():
        raise ValueError(f"block type name must be a non-empty lower-case str, got {spec.name!r}")
    if not (isinstance(spec.block_class, type) and issubclass(spec.block_class, ReparamBlock)):
        raise TypeError(f"block type {spec.name!r}: {spec.block_class!r} is not a ReparamBlock")
    if not (isinstance(spec.block_class.signature, str) and spec.block_class.signature):
        raise ValueError(f"block type {spec.name!r}: {spec.block_class.__name__}.signature must name a state-dict "
                         "key of a stored training-time block (e.g. 'square_conv.weight')")


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
