"""The architecture registry: every fact about an arch, declared once in its :class:`ArchSpec`.

An arch is its model factory, the dataset it is defined for, its input size and class count, the
name of its training recipe (``train_configs``), the published numbers to compare runs with, and
optionally its layouts in the original repositories (for their weights files). Everything else
(do_acnet.py, show_log.py, reproduce.py, the weights loaders) reads :data:`ARCHS` at call time, so
:func:`register_arch` at run time adds an arch everywhere. ``constructor.build_model`` builds one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from torch import nn

from .builder import ConvBuilder, make_builder
from .cifar_quick import CifarQuickBN
from .mobilenet import MobileNetV1
from .original_layouts import OriginalLayout, original_layouts_of
from .published import PUBLISHED, PublishedResult
from .resnet import BasicBlock, Bottleneck, ImageNetResNet
from .resnet_cifar import CifarResNet
from .vgg import VGGCifar
from .wrn import WideResNetCifar

__all__ = ["ArchSpec", "ARCHS", "get_arch_spec", "list_archs", "build_arch", "register_arch", "unregister_arch"]

ModelFactory = Callable[[ConvBuilder, int], nn.Module]


@dataclass(frozen=True)
class ArchSpec:
    """An architecture: its short ``name``, the ``dataset`` it is defined for ('cifar10' or
    'imagenet'), the square ``input_size`` it expects (32 or 224), its default ``num_classes``, a
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


def _spec(name: str, dataset: str, description: str, factory: ModelFactory) -> ArchSpec:
    input_size, num_classes = (32, 10) if dataset == "cifar10" else (224, 1000)
    return ArchSpec(name, dataset, input_size, num_classes, description, factory,
                    published=PUBLISHED.get(name, ()), original_formats=original_layouts_of(name))


#: The registry: arch name -> :class:`ArchSpec` (read it at call time; :func:`register_arch` adds one).
ARCHS: Dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        _spec("cfqkbnc", "cifar10", "Cifar-quick with BN", lambda b, n: CifarQuickBN(b, n)),
        _spec("vc", "cifar10", "VGG-16 for CIFAR", lambda b, n: VGGCifar(b, n)),
        _spec("src56", "cifar10", "ResNet-56 for CIFAR", lambda b, n: CifarResNet(b, 56, n)),
        _spec("src110", "cifar10", "ResNet-110 for CIFAR", lambda b, n: CifarResNet(b, 110, n)),
        _spec("wrnc16plain", "cifar10", "WRN-16-8 for CIFAR (pre-activation, no dropout)",
              lambda b, n: WideResNetCifar(b, 16, 8, n)),
        _spec("sres18", "imagenet", "ResNet-18 (torchvision's)", lambda b, n: ImageNetResNet(b, BasicBlock, (2, 2, 2, 2), n)),
        _spec("sres34", "imagenet", "ResNet-34 (torchvision's)", lambda b, n: ImageNetResNet(b, BasicBlock, (3, 4, 6, 3), n)),
        _spec("sres50", "imagenet", "ResNet-50 (torchvision's)", lambda b, n: ImageNetResNet(b, Bottleneck, (3, 4, 6, 3), n)),
        _spec("smi1", "imagenet", "MobileNetV1", lambda b, n: MobileNetV1(b, n)),
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
    spec = get_arch_spec(arch)
    builder = make_builder(block_type, deploy=deploy, **block_kwargs)
    model = spec.build(builder, num_classes)
    if not deploy and builder.block_class is not None and builder.blocks_built == 0:
        from .builder import BlockTypeNotApplicableError

        raise BlockTypeNotApplicableError(_no_block_reason(arch, block_type))
    return model


def _no_block_reason(arch: str, block_type: str) -> str:
    """One line: ``block_type`` fits no conv of ``arch``; the archs it fits (each built on the meta device)."""
    import torch

    from .builder import kernel_rule_text

    fits = []
    for name in ARCHS:
        builder = make_builder(block_type)
        with torch.device("meta"):
            get_arch_spec(name).build(builder, None)
        if builder.blocks_built:
            fits.append(name)
    return (f"-b {block_type} fits no conv of {arch} (the paper's rule: KxK convs with {kernel_rule_text(block_type)}); "
            f"it applies to {', '.join(fits) or 'no architecture'}")
