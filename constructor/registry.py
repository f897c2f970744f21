"""The architecture registry: every fact about an arch, declared once in its :class:`ArchSpec`.

An arch is its model factory, the dataset it is defined for, its input size and class count, the
name of its training recipe (``train_configs``), the published numbers to compare runs with, and
optionally its layouts in the original repositories (for their weights files). Everything else
(do_acnet.py, show_log.py, reproduce.py, the weights loaders) reads :data:`ARCHS` at call time, so
:func:`register_arch` at run time adds an arch everywhere. ``constructor.build_model`` builds one.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Tuple

from acnet.errors import BlockTypeNotApplicableError
from data.registry import get_dataset

from .original_layouts import OriginalLayout, original_layouts_of
from .published import PUBLISHED, PublishedResult

if TYPE_CHECKING:
    from torch import nn

    from .builder import ConvBuilder

__all__ = ["ArchSpec", "ARCHS", "arch_for_dataset", "get_arch_spec", "list_archs", "build_arch", "register_arch", "unregister_arch"]

ModelFactory = Callable[["ConvBuilder", int], "nn.Module"]


@dataclass(frozen=True)
class ArchSpec:
    """An architecture: its short ``name``, the ``dataset`` it is defined for (a name in the dataset
    registry, ``data.registry``), the square ``input_size`` it expects, its default ``num_classes``, a
    one-line ``description`` and ``factory(builder, num_classes) -> nn.Module``; ``recipe``: the name
    of its recipe in ``train_configs.RECIPES`` (default: its own name); ``published``: the papers'
    top-1 for it; ``original_formats``: repository ('acnet', 'dbb') -> its layout there."""

    name: str
    dataset: str
    input_size: int
    num_classes: int
    description: str
    factory: ModelFactory = field(repr=False, compare=False)
    recipe: Optional[str] = None
    published: Tuple[PublishedResult, ...] = field(default=(), compare=False)
    original_formats: Mapping[str, OriginalLayout] = field(default_factory=dict, repr=False, compare=False)

    @property
    def recipe_name(self) -> str:
        return self.recipe or self.name

    def build(self, builder: ConvBuilder, num_classes: Optional[int] = None) -> nn.Module:
        """The model made with ``builder`` (any :class:`ConvBuilder`, e.g. one for a custom block)."""
        return self.factory(builder, self.num_classes if num_classes is None else _check_num_classes(num_classes))


def arch_for_dataset(name: str, dataset: str, description: str, factory: ModelFactory, **fields: Any) -> ArchSpec:
    """An :class:`ArchSpec` whose input size and class count are those its ``dataset`` declares in the
    dataset registry (any registered dataset with both); ``fields``: the other ArchSpec fields."""
    spec = get_dataset(dataset)
    if spec.input_size is None or spec.num_classes is None:
        raise ValueError(f"dataset {dataset!r} declares no input size or class count; "
                         "give the arch's input_size and num_classes to ArchSpec")
    return ArchSpec(name, dataset, spec.input_size, spec.num_classes, description, factory, **fields)


def _model(module: str, name: str) -> Any:
    """``constructor.<module>.<name>``, imported when an arch is built: the model modules import torch, the
    registry does not (the arch names list without it: ``do_acnet.py -h``)."""
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def _resnet(builder: ConvBuilder, block: str, layers: Tuple[int, ...], num_classes: int) -> nn.Module:
    return _model("resnet", "ImageNetResNet")(builder, _model("resnet", block), layers, num_classes)


def _spec(name: str, dataset: str, description: str, factory: ModelFactory) -> ArchSpec:
    return arch_for_dataset(name, dataset, description, factory,
                    published=PUBLISHED.get(name, ()), original_formats=original_layouts_of(name))


#: The registry: arch name -> :class:`ArchSpec` (read it at call time; :func:`register_arch` adds one).
ARCHS: Dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        _spec("cfqkbnc", "cifar10", "Cifar-quick with BN", lambda b, n: _model("cifar_quick", "CifarQuickBN")(b, n)),
        _spec("vc", "cifar10", "VGG-16 for CIFAR", lambda b, n: _model("vgg", "VGGCifar")(b, n)),
        _spec("src56", "cifar10", "ResNet-56 for CIFAR", lambda b, n: _model("resnet_cifar", "CifarResNet")(b, 56, n)),
        _spec("src110", "cifar10", "ResNet-110 for CIFAR", lambda b, n: _model("resnet_cifar", "CifarResNet")(b, 110, n)),
        _spec("wrnc16plain", "cifar10", "WRN-16-8 for CIFAR (pre-activation, no dropout)",
              lambda b, n: _model("wrn", "WideResNetCifar")(b, 16, 8, n)),
        _spec("sres18", "imagenet", "ResNet-18 (torchvision's)", lambda b, n: _resnet(b, "BasicBlock", (2, 2, 2, 2), n)),
        _spec("sres34", "imagenet", "ResNet-34 (torchvision's)", lambda b, n: _resnet(b, "BasicBlock", (3, 4, 6, 3), n)),
        _spec("sres50", "imagenet", "ResNet-50 (torchvision's)", lambda b, n: _resnet(b, "Bottleneck", (3, 4, 6, 3), n)),
        _spec("smi1", "imagenet", "MobileNetV1", lambda b, n: _model("mobilenet", "MobileNetV1")(b, n)),
    )
}


def register_arch(spec: ArchSpec) -> ArchSpec:
    """Add ``spec`` to :data:`ARCHS` (every tool sees it from then on); a taken name is a ``ValueError``."""
    if spec.name in ARCHS:
        raise ValueError(f"architecture {spec.name!r} is already registered")
    ARCHS[spec.name] = spec
    return spec


def unregister_arch(name: str) -> None:
    """Remove ``name`` from :data:`ARCHS` (the inverse of :func:`register_arch`)."""
    get_arch_spec(name)
    del ARCHS[name]


def list_archs() -> List[str]:
    """The registered architecture names, in registry order."""
    return list(ARCHS)


def get_arch_spec(arch: str) -> ArchSpec:
    """The :class:`ArchSpec` of ``arch``; an unknown name raises ``ValueError`` listing the valid ones."""
    try:
        return ARCHS[arch]
    except (KeyError, TypeError):
        raise ValueError(f"unknown architecture {arch!r}; valid architectures: {', '.join(ARCHS)}") from None


def _check_num_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return num_classes


def build_arch(
    arch: str, block_type: str = "base", deploy: bool = False, num_classes: Optional[int] = None, **block_kwargs: Any
) -> nn.Module:
    """Build architecture ``arch`` with every conv-BN unit of type ``block_type`` (a registered block
    type: ``acnet.registry.block_type_names()``), or in deploy form (``deploy=True``: one
    ``nn.Conv2d(bias=True)`` per unit, the same tree for every block type). ``num_classes`` overrides
    the arch's default (e.g. 100 for CIFAR-100); ``block_kwargs``: ``bn_eps``, ``bn_momentum`` and
    per-block options such as ACB ``gamma_init`` or DBB ``internal_channels_1x1_3x3``. Bad names raise
    one ``ValueError``. :func:`constructor.build_model` is this plus the model's weight naming schemes.
    """
    from .builder import make_builder  # torch: the registry itself stays torch-free

    spec = get_arch_spec(arch)
    builder = make_builder(block_type, deploy=deploy, **block_kwargs)
    model = spec.build(builder, num_classes)
    if not deploy and builder.block_class is not None and builder.blocks_built == 0:
        raise BlockTypeNotApplicableError(_no_block_reason(arch, block_type))
    return model


def _no_block_reason(arch: str, block_type: str) -> str:
    """One line: ``block_type`` fits no conv of ``arch``; the archs it fits (each built on the meta device)."""
    import torch  # the registry itself stays torch-free

    from .builder import kernel_rule_text, make_builder

    fits = []
    for name in ARCHS:
        builder = make_builder(block_type)
        with torch.device("meta"):
            get_arch_spec(name).build(builder, None)
        if builder.blocks_built:
            fits.append(name)
    return (f"-b {block_type} fits no conv of {arch} (the paper's rule: KxK convs with {kernel_rule_text(block_type)}); "
            f"it applies to {', '.join(fits) or 'no architecture'}")
