"""The one registry of block types: name -> block class and what the rest of the project needs to know.

Read by :func:`acnet.convert_to_acnet` (which class to plug in), :func:`acnet.acnet_fuse_and_load`
(how to recognise a stored block and rebuild it), the architecture builder (``constructor``) and the
command line (``do_acnet.py -b``). A new block type is added here, once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Tuple

from torch import Tensor, nn

from .acb import ACBlock
from .base import ConvBN, ReparamBlock
from .dbb import DiverseBranchBlock
from .orepa import OREPABlock

__all__ = ["BlockType", "BLOCK_REGISTRY", "block_type_names", "get_block_type", "register_block_type",
           "unregister_block_type"]

StoredOptions = Callable[[Mapping[str, Tensor], int], Dict[str, object]]
MainBranch = Callable[[nn.Module], Tuple[Tensor, nn.BatchNorm2d]]


def _no_options(state: Mapping[str, Tensor], in_channels: int) -> Dict[str, object]:
    return {}


@dataclass(frozen=True)
class BlockType:
    """One block type.

    ``name``: the ``-b`` name. ``block_class``: the :class:`~acnet.base.ReparamBlock` trained in place of
    each eligible conv-BN pair. ``plain``: the plain conv-BN unit (the ``base`` network: the builder
    keeps its plain units and :func:`~acnet.convert_to_acnet` has nothing to plug in). ``signature``:
    a state-dict key (under a conv's prefix) that identifies a stored training-time block of this
    type. ``stored_options(state, in_channels)``: constructor options read from a stored block's
    entries (shapes, present keys). ``main_branch(block)``: the KxK weight and the BN that together
    equal the block after ``single_init()`` (fine-tuning from a trained conv-BN pair).
    ``recipe_options``: the recipe fields (``train_configs``) passed to every block as options.
    ``paper``: where the block comes from.
    """

    name: str
    block_class: type
    signature: str
    main_branch: MainBranch
    stored_options: StoredOptions = _no_options
    recipe_options: Tuple[str, ...] = ()
    plain: bool = False
    paper: str = ""
    description: str = field(default="", compare=False)

    @property
    def deploy_conv_name(self) -> str:
        """Attribute name of the fused conv of a deployed block (the original implementations')."""
        return self.block_class.deploy_conv_name


def _acb_options(state: Mapping[str, Tensor], in_channels: int) -> Dict[str, object]:
    return {"use_affine": "hor_bn.weight" in state}


def _dbb_options(state: Mapping[str, Tensor], in_channels: int) -> Dict[str, object]:
    if "dbb_1x1_kxk.conv1.weight" in state:
        return {"internal_channels_1x1_3x3": state["dbb_1x1_kxk.conv1.weight"].shape[0]}
    if "dbb_1x1_kxk.idconv1.weight" in state:
        return {"internal_channels_1x1_3x3": in_channels}
    return {}


def _orepa_options(state: Mapping[str, Tensor], in_channels: int) -> Dict[str, object]:
    key = "weight_orepa_1x1_kxk_idconv1"
    return {"internal_channels_1x1_3x3": state[key].shape[0]} if key in state else {}


#: Block types by name, in the order the command line lists them.
BLOCK_REGISTRY: Dict[str, BlockType] = {
    spec.name: spec
    for spec in (
        BlockType("base", ConvBN, "bn.running_mean", lambda b: (b.conv.weight, b.bn), plain=True,
                  description="plain conv-BN"),
        BlockType("acb", ACBlock, "square_conv.weight", lambda b: (b.square_conv.weight, b.square_bn),
                  _acb_options, recipe_options=("gamma_init",), paper="ACNet, ICCV 2019",
                  description="KxK + 1xK + Kx1 conv-BN branches"),
        BlockType("dbb", DiverseBranchBlock, "dbb_origin.conv.weight",
                  lambda b: (b.dbb_origin.conv.weight, b.dbb_origin.bn), _dbb_options, paper="DBB, CVPR 2021",
                  description="four conv-BN branches (KxK, 1x1, 1x1-avg, 1x1-KxK)"),
        BlockType("orepa", OREPABlock, "weight_orepa_origin", lambda b: (b.weight_orepa_origin, b.bn),
                  _orepa_options, paper="OREPA, CVPR 2022",
                  description="six scaled linear branches merged into one kernel every step, one BN"),
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
