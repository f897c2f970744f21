"""The names the original repositories give our architectures' weights: their naming schemes.

DingXiaoH/ACNet (``acnet_exps/<arch>_<block>_train/finish.hdf5``, ``finish_deploy.hdf5``) and
DingXiaoH/DiverseBranchBlock (``.pth`` state dicts of ``-t DBB`` / ``-t base`` models, before and
after its ``convert.py``) build the same networks as ``constructor`` under other module names.
Each architecture declares, on its :class:`constructor.registry.ArchSpec` (``original_formats``), its
layout in each repository that has it (:mod:`constructor.original_layouts`: its conv units as
:class:`Unit` s, our module path, the original's and how the original stores the unit, plus its other
entries); an arch without any has no original scheme. From them :func:`original_schemes` makes one :class:`acnet.schemes.NamingScheme` per file form:

=============================  ===================================  ==============================
scheme name                    files                                loads into our
=============================  ===================================  ==============================
``acnet/acb/train``            ACNet ``-b acb`` ``finish.hdf5``     ``acb`` training-time model
``acnet/base/train``           ACNet ``-b base`` ``finish.hdf5``    ``base`` training-time model
``acnet/acb/deploy``           ACNet ``finish_deploy.hdf5``         deploy model
``dbb/DBB/train``              DBB ``-t DBB`` (e.g. the published  ``dbb`` training-time model
                               ``ResNet-18_DBB_7101.pth``)
``dbb/base/train``             DBB ``-t base``                      ``base`` training-time model
``dbb/DBB/deploy``             DBB ``convert.py`` output            deploy model
``dbb/base/deploy``            DBB ``-t base`` after conversion     deploy model
=============================  ===================================  ==============================

and for the DBB ResNets the same with the stem's ``stage0.`` prefix dropped (``.../hdf5``), as the
DBB repository's ``model_load_hdf5`` also reads them. How the originals store a unit:

* ACNet: a conv-BN-ReLU unit holds an ACB under ``<unit>.acb.``, a conv-BN unit directly under
  ``<unit>.``; plain units ``<unit>.conv`` / ``<unit>.bn``; a pre-activation unit ``<unit>.bn`` then
  ``<unit>.acb.`` (ACB) or ``<unit>.conv`` (plain); a bare conv ``<unit>.weight``. Its deploy file
  fuses only the ACBs (``fused_conv``, with bias); plain units keep their conv and BN, which
  loading folds (``fuse_bn``) into our deploy conv. Optional metadata entry ``deps``.
* DBB: every unit directly under ``<unit>.`` (``ConvBN``: ``conv``, ``bn``; a DBB: its branches);
  deploy: ``<unit>.conv`` (with bias) for ``ConvBN``, ``<unit>.dbb_reparam`` for a DBB.

The block internals (``square_conv`` ... ``dbb_1x1_kxk``) have the original names in our blocks.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, TypeVar

import torch
from torch import Tensor, nn

from acnet.block import ConvBN
from acnet.schemes import BN_ENTRIES, NamingScheme, Rule, closest_scheme, describe_difference, recognise
from acnet.weights import WeightsError

from acnet.registry import BLOCK_REGISTRY, block_type_names

from .builder import BiasFreeConv, BlockTypeNotApplicableError, is_reparameterizable_kernel
from .original_layouts import BN_RELU_CONV, CONV, CONV_BN, CONV_BN_RELU, Unit
from .registry import ARCHS, build_arch as build_model, get_arch_spec

__all__ = ["Unit", "Recognised", "recognise_weights", "own_schemes", "original_schemes", "export_scheme",
           "export_original", "EXPORT_USAGE",
           "EXPORT_FORMATS", "FAMILIES", "families_of", "their_arch_name", "known_schemes"]

#: Repositories whose files we read, and the formats ``export_scheme`` writes.
FAMILIES = ("acnet", "dbb")
EXPORT_FORMATS = FAMILIES
_ACNET_METADATA = frozenset({"deps"})  # written by ACNet's engine when the config has ``deps``


_Schemes = TypeVar("_Schemes")


def _same_objects(seen: Tuple[Any, ...], now: Tuple[Any, ...]) -> bool:
    """The same registry state: the same arch spec and block type objects, the same block type names."""
    return len(seen) == len(now) and seen[1] == now[1] and all(
        a is b for i, (a, b) in enumerate(zip(seen, now)) if i != 1)


def _cached_per_registry_state(function: Callable[[str, Optional[int]], _Schemes]
                               ) -> Callable[[str, Optional[int]], _Schemes]:
    """Memoise ``function(arch, num_classes)`` (building the schemes builds models) on what it reads: the
    arch's registered spec and the registered block types, compared by identity at each call, so that a
    block type or arch registered (or replaced) at run time is seen at once. The 32 latest entries."""
    cache: "OrderedDict[Tuple[str, Optional[int]], Tuple[Tuple[Any, ...], _Schemes]]" = OrderedDict()

    @functools.wraps(function)
    def cached(arch: str, num_classes: Optional[int] = None) -> _Schemes:
        state = (get_arch_spec(arch), tuple(BLOCK_REGISTRY), *BLOCK_REGISTRY.values())
        key = (arch, num_classes)
        hit = cache.get(key)
        if hit is not None and _same_objects(hit[0], state):
            cache.move_to_end(key)
            return hit[1]
        value = function(arch, num_classes)
        cache[key] = (state, value)
        cache.move_to_end(key)
        while len(cache) > 32:
            cache.popitem(last=False)
        return value

    cached.cache_clear = cache.clear  # type: ignore[attr-defined]
    return cached


# --------------------------------------------------------------------------- schemes from the tables
#: (family, the original's block type, our block type or None for the deploy model, description)
_FORMS = (
    ("acnet", "acb", "acb", "the original ACNet code's {arch} -b acb training-time weights (finish.hdf5)"),
    ("acnet", "base", "base", "the original ACNet code's {arch} -b base weights (finish.hdf5)"),
    ("acnet", "acb", None, "the original ACNet code's {arch} -b acb deploy weights (finish_deploy.hdf5)"),
    ("dbb", "DBB", "dbb", "the DBB repository's {their} -t DBB training-time weights"),
    ("dbb", "base", "base", "the DBB repository's {their} -t base training-time weights"),
    ("dbb", "DBB", None, "the DBB repository's {their} -t DBB deploy weights (convert.py)"),
    ("dbb", "base", None, "the DBB repository's {their} -t base deploy weights"),
)


def families_of(arch: str) -> Tuple[str, ...]:
    """The repositories that have ``arch``: ``("acnet",)`` or ``("acnet", "dbb")``."""
    return tuple(f for f in FAMILIES if f in get_arch_spec(arch).original_formats)


def their_arch_name(arch: str, family: str) -> str:
    """``arch``'s ``-a`` name in ``family``'s repository (``KeyError`` when it has none)."""
    return get_arch_spec(arch).original_formats[family].their_name


@_cached_per_registry_state
def original_schemes(arch: str, num_classes: Optional[int] = None) -> Tuple[NamingScheme, ...]:
    """Every naming scheme of the original repositories for ``arch`` (module docstring), in table order.

    ``num_classes``: the classifier's size (default: the arch's). Each scheme's ``info`` holds
    ``family``, ``their_block_type``, ``block_type`` (our model it loads into, ``None``: the deploy
    model), ``deploy`` and ``classifier`` (the foreign name of the classifier weight).
    """
    schemes = []
    for family, their_type, our_type, text in _FORMS:
        if family not in families_of(arch):
            continue
        description = text.format(arch=arch, their=their_arch_name(arch, family))
        scheme = _scheme(arch, num_classes, family, their_type, our_type, description)
        schemes.append(scheme)
        if family == "dbb" and any(k.startswith("stage0.") for k in scheme.their_shapes):
            schemes.append(_strip_stem_prefix(scheme))
    return tuple(schemes)


def export_scheme(arch: str, fmt: str, block_type: str, num_classes: Optional[int] = None) -> NamingScheme:
    """The deploy scheme ``--convert --format fmt`` writes: ACNet's ``finish_deploy.hdf5`` names
    (``acnet``), or the DBB repository's deploy names (``dbb``: ``-t base`` for a ``base`` model,
    else ``-t DBB``). Raises ``ValueError`` when that repository has no ``arch``."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid formats: {', '.join(EXPORT_FORMATS)}")
    if fmt not in families_of(arch):
        raise ValueError(f"the {fmt.upper()} repository has no {arch} (it has "
                         f"{', '.join(_archs_of(fmt))}); export {arch} with --format acnet")
    their_type = "acb" if fmt == "acnet" else ("base" if block_type == "base" else "DBB")
    return next(s for s in original_schemes(arch, num_classes) if s.info["family"] == fmt and s.info["deploy"]
                and s.info["their_block_type"] == their_type and not s.info.get("stem_prefix_dropped"))


def export_original(arch: str, fmt: str, block_type: str, deploy_state: Mapping[str, Tensor]
                    ) -> Tuple[Dict[str, Tensor], NamingScheme]:
    """Our deploy state dict of ``arch`` under the names of ``fmt``'s repository (:func:`export_scheme`),
    with the classifier size of ``deploy_state``; returns ``(state, scheme)``."""
    classifier = str(own_schemes(arch)[-1].info["classifier"])
    num_classes = int(deploy_state[classifier].shape[0]) if classifier in deploy_state else None
    scheme = export_scheme(arch, fmt, block_type, num_classes)
    return scheme.from_ours(deploy_state), scheme


def _archs_of(family: str) -> List[str]:
    return [arch for arch, spec in ARCHS.items() if family in spec.original_formats]


#: How to use an exported file with the original code, by format.
EXPORT_USAGE = {
    "acnet": "load it into the original ACNet code's deploy model (ACNetBuilder(deploy=True)), "
             "e.g. acnet_test.py's general_test(network_type='{arch}', weights=FILE)",
    "dbb": "test it with the DBB repository: python test.py IMGNET_PATH deploy FILE -a {their} -t {their_type}",
}


def _scheme(arch: str, num_classes: Optional[int], family: str, their_type: str, our_type: Optional[str],
            description: str) -> NamingScheme:
    with torch.device("meta"):
        model = build_model(arch, our_type or "base", deploy=our_type is None, num_classes=num_classes)
    modules = dict(model.named_modules())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    units, others = get_arch_spec(arch).original_formats[family].layout()
    rules: List[Rule] = []
    eps = 1e-5  # both originals build every BN with PyTorch's default eps
    for unit in units:
        rules += _unit_rules(unit, modules, shapes, family, deploy=our_type is None, blocks=their_type != "base",
                             eps=eps)
    for ours, theirs in others:
        rules += [Rule("copy", (f"{theirs}.{k[len(ours) + 1:]}",), (k,)) for k in shapes if k.startswith(ours + ".")]
    their_shapes: Dict[str, Tuple[int, ...]] = {}
    for rule in rules:
        their_shapes.update(_their_shapes(rule, shapes))
    covered = [k for rule in rules for k in rule.ours]
    if sorted(covered) != sorted(shapes):  # the tables must cover each of our entries exactly once
        raise AssertionError(f"{family} table for {arch} is incomplete: "
                             f"{sorted(set(shapes) ^ set(covered))[:5]}")
    classifier = f"{others[-1][1]}.weight"
    return NamingScheme(
        name=f"{family}/{their_type}/{'deploy' if our_type is None else 'train'}", description=description,
        rules=tuple(rules), their_shapes=their_shapes, our_shapes=shapes,
        ignored=_ACNET_METADATA if family == "acnet" else frozenset(),
        info={"family": family, "their_block_type": their_type, "block_type": our_type,
              "deploy": our_type is None, "classifier": classifier})


def _unit_rules(unit: Unit, modules: Dict[str, nn.Module], shapes: Dict[str, Tuple[int, ...]], family: str,
                deploy: bool, blocks: bool, eps: float) -> List[Rule]:
    """The rules of one unit: its conv (block or plain, training or deploy form) and a pre-activation BN.

    ``blocks``: the original model has blocks (ACB / DBB) where the kernel qualifies (not ``base``).
    """
    our_conv = f"{unit.ours}.conv" if unit.kind in (CONV_BN_RELU, BN_RELU_CONV) else unit.ours
    conv = modules[our_conv]
    kernel = conv.kernel_size if isinstance(conv.kernel_size, int) else conv.kernel_size[0]
    reparam = blocks and is_reparameterizable_kernel(kernel)  # the originals' rule too: a block iff 1 < K < 7
    block_here = deploy or not isinstance(conv, (ConvBN, BiasFreeConv))  # the file holds a block (or fused)
    theirs = unit.theirs
    if family == "acnet" and unit.their_kind in (CONV_BN_RELU, BN_RELU_CONV) and reparam and block_here:
        theirs = f"{unit.theirs}.acb"
    rules: List[Rule] = []
    if unit.kind == BN_RELU_CONV:
        rules += [Rule("copy", (f"{unit.theirs}.bn.{k}",), (f"{unit.ours}.bn.{k}",)) for k in BN_ENTRIES]
    ours = [k for k in shapes if k.startswith(our_conv + ".")]
    if not deploy:
        bare = family == "acnet" and unit.their_kind == CONV and isinstance(conv, BiasFreeConv)
        for k in ours:
            rel = k[len(our_conv) + 1:]
            rules.append(Rule("copy", (f"{theirs}.{'weight' if bare else rel}",), (k,)))
        return rules
    weight, bias = f"{our_conv}.weight", f"{our_conv}.bias"
    if reparam:
        leaf = "fused_conv" if family == "acnet" else "dbb_reparam"
        return rules + [Rule("copy", (f"{theirs}.{leaf}.weight",), (weight,)),
                        Rule("copy", (f"{theirs}.{leaf}.bias",), (bias,))]
    if family == "dbb":  # ConvBN after switch_to_deploy: 'conv' with a bias
        return rules + [Rule("copy", (f"{theirs}.conv.weight",), (weight,)),
                        Rule("copy", (f"{theirs}.conv.bias",), (bias,))]
    if unit.their_kind in (CONV_BN_RELU, CONV_BN):  # ACNet keeps plain conv-BN units unfused
        bn = tuple(f"{theirs}.bn.{k}" for k in BN_ENTRIES)
        return rules + [Rule("fuse_bn", (f"{theirs}.conv.weight", *bn), (weight, bias), eps=eps)]
    plain = f"{theirs}.conv.weight" if unit.their_kind == BN_RELU_CONV else f"{theirs}.weight"
    return rules + [Rule("zero_bias", (plain,), (weight, bias))]


def _their_shapes(rule: Rule, shapes: Dict[str, Tuple[int, ...]]) -> Dict[str, Tuple[int, ...]]:
    if rule.kind == "copy":
        return {rule.theirs[0]: shapes[rule.ours[0]]}
    weight = shapes[rule.ours[0]]
    if rule.kind == "zero_bias":
        return {rule.theirs[0]: weight}
    channels = (weight[0],)
    return dict(zip(rule.theirs, (weight, channels, channels, channels, channels, ())))


def _strip_stem_prefix(scheme: NamingScheme) -> NamingScheme:
    """The same scheme with ``stage0.`` dropped from the names (DBB's ``model_load_hdf5`` accepts both)."""
    def strip(name: str) -> str:
        return name[len("stage0."):] if name.startswith("stage0.") else name
    rules = tuple(Rule(r.kind, tuple(map(strip, r.theirs)), r.ours, r.eps) for r in scheme.rules)
    return NamingScheme(
        name=scheme.name + "/hdf5", description=scheme.description + ", stem without 'stage0.' (hdf5)",
        rules=rules, their_shapes={strip(k): v for k, v in scheme.their_shapes.items()},
        our_shapes=scheme.our_shapes, ignored=scheme.ignored,
        info={**scheme.info, "classifier": strip(str(scheme.info["classifier"])), "stem_prefix_dropped": True})


# --------------------------------------------------------------------------- recognising a state dict
@dataclass(frozen=True)
class Recognised:
    """A state dict recognised for an arch: ``state`` under our names, for our training-time model of
    ``block_type`` (``None``: the deploy model) with ``num_classes``; ``scheme`` is the one matched."""

    state: Dict[str, Tensor]
    block_type: Optional[str]
    num_classes: int
    scheme: NamingScheme

    @property
    def foreign(self) -> bool:
        """Written by the original code (not under our own names)."""
        return self.scheme.info["family"] != "ours"


@_cached_per_registry_state
def own_schemes(arch: str, num_classes: Optional[int] = None) -> Tuple[NamingScheme, ...]:
    """Our own names as schemes (identity maps): the training-time model of each block type, and the deploy model."""
    schemes = []
    for block_type in (*block_type_names(), None):
        try:
            with torch.device("meta"):
                model = build_model(arch, block_type or "base", deploy=block_type is None, num_classes=num_classes)
        except BlockTypeNotApplicableError:  # e.g. dilated on an arch without an odd K >= 5 conv: no such model
            continue
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        classifier = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
        what = f"the training-time {arch}/{block_type} model" if block_type else f"the deploy {arch} model"
        schemes.append(NamingScheme(
            name=f"ours/{block_type or 'deploy'}", description=what,
            rules=tuple(Rule("copy", (k,), (k,)) for k in shapes), their_shapes=shapes, our_shapes=shapes,
            info={"family": "ours", "block_type": block_type, "deploy": block_type is None,
                  "classifier": f"{classifier}.weight"}))
    return tuple(schemes)


def known_schemes(arch: str, num_classes: Optional[int] = None) -> Tuple[NamingScheme, ...]:
    """Our own schemes, then the original repositories' (:func:`original_schemes`)."""
    return own_schemes(arch, num_classes) + original_schemes(arch, num_classes)


def recognise_weights(arch: str, state: Mapping[str, Tensor], source: str = "the weights",
                      num_classes: Optional[int] = None, block_type: Optional[str] = None) -> Recognised:
    """Match ``state`` to exactly one known scheme of ``arch`` by its names, check every shape, translate.

    ``num_classes=None``: the classifier's size in ``state`` (any count works). ``block_type``: the
    block type the caller expects, only to phrase the error. A state dict that matches no scheme
    raises :class:`acnet.WeightsError` naming the closest scheme and what differs.
    """
    names = list(state)
    kinds = (own_schemes, original_schemes)  # our own names first: the originals' tables are not built then
    named, schemes_of = [], own_schemes
    for schemes_of in kinds:
        named = [s for s in schemes_of(arch) if s.matches_names(names)]
        if named:
            break
    if not named:
        default = known_schemes(arch)
        expected = [s for s in default if s.info["family"] == "ours" and s.info["block_type"] in (block_type, None)]
        own = " nor ".join(s.description for s in expected) if block_type else "any of our models"
        scheme, missing, unexpected = closest_scheme(names, default)
        raise WeightsError(
            f"{source} matches neither {own}, nor any file of the original ACNet / DBB code for {arch}; "
            f"closest is {scheme.description}: {describe_difference(missing, unexpected)}. Check -a/--arch and "
            "-b/--block-type (and --dataset for the number of classes)")
    if num_classes is None:
        classifier = state[str(named[0].info["classifier"])]
        num_classes = int(classifier.shape[0]) if classifier.dim() == 2 else None
    scheme = recognise(state, schemes_of(arch, num_classes), source)
    if scheme is None:  # pragma: no cover - the names matched above, the class count changes no name
        raise WeightsError(f"{source}: no naming scheme of {arch} fits")
    classes = num_classes if num_classes is not None else get_arch_spec(arch).num_classes
    return Recognised(scheme.to_ours(state), scheme.info["block_type"], classes, scheme)
