"""How the original repositories name our architectures' modules: one layout per (arch, repository).

A layout lists an architecture's conv units as :class:`Unit` s (our module path, the original's, and
how each stores the unit) plus its other entries (classifiers, standalone BNs); an arch declares its
layouts on its :class:`constructor.registry.ArchSpec` (``original_formats``), and
:mod:`constructor.original_formats` turns them into naming schemes. Pure tables: no torch, no registry.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterator, List, Tuple

__all__ = ["Unit", "Layout", "OriginalLayout", "CONV_BN_RELU", "CONV_BN", "BN_RELU_CONV", "CONV",
           "original_layouts_of"]

#: Unit kinds (ours and the originals'): where the conv sits and whether a BN comes before it.
CONV_BN_RELU, CONV_BN, BN_RELU_CONV, CONV = "conv_bn_relu", "conv_bn", "bn_relu_conv", "conv"
@dataclass(frozen=True)
class Unit:
    """One conv unit: ``ours`` (module path, of kind ``kind``) is ``theirs`` (of kind ``their_kind``)."""

    ours: str
    kind: str
    theirs: str
    their_kind: str


Layout = Tuple[List[Unit], List[Tuple[str, str]]]  # units, (our module, their module) for other entries


# --------------------------------------------------------------------------- the architectures' tables
def _acnet_layout(arch: str) -> Layout:
    """ACNet's module names (its ``base_model/*.py``) for ``arch``."""
    if arch == "cfqkbnc":
        units = [Unit(f"conv{i}", CONV_BN_RELU, f"conv{i}", CONV_BN_RELU) for i in (1, 2, 3)]
        return units, [("fc1", "fc1"), ("fc2", "fc2")]
    if arch == "vc":
        units = [Unit(f"stem.conv{i}", CONV_BN_RELU, f"stem.conv{i}", CONV_BN_RELU) for i in range(1, 14)]
        return units, [("linear1", "linear1"), ("linear2", "linear2")]
    if arch in ("src56", "src110"):  # SRCNet: the stem conv is stage1.conv1, shortcuts stage<s>.projection
        n = (int(arch[3:]) - 2) // 6
        units = [Unit("stem", CONV_BN_RELU, "stage1.conv1", CONV_BN)]
        for s in (1, 2, 3):
            if s > 1:
                units.append(Unit(f"stage{s}.0.shortcut", CONV_BN, f"stage{s}.projection", CONV_BN))
            for b in range(n):
                units += [Unit(f"stage{s}.{b}.conv1", CONV_BN_RELU, f"stage{s}.block{b}.conv1", CONV_BN_RELU),
                          Unit(f"stage{s}.{b}.conv2", CONV_BN, f"stage{s}.block{b}.conv2", CONV_BN)]
        return units, [("fc", "linear")]
    if arch == "wrnc16plain":  # WRNCifarNet: blocks numbered from 1, shortcut 'proj', final BN 'last_bn'
        units = [Unit("stem", CONV, "conv1", CONV)]
        for s in (1, 2, 3):
            for b in range(2):
                their = f"stage{s}.block{b + 1}"
                if b == 0:
                    units.append(Unit(f"stage{s}.0.shortcut", BN_RELU_CONV, f"{their}.proj", BN_RELU_CONV))
                units += [Unit(f"stage{s}.{b}.conv{i}", BN_RELU_CONV, f"{their}.conv{i}", BN_RELU_CONV)
                          for i in (1, 2)]
        return units, [("bn", "last_bn"), ("fc", "linear")]
    if arch in ("sres18", "sres34"):  # base_model/resnet.py
        units = [Unit("conv1", CONV_BN_RELU, "conv1", CONV_BN_RELU)]
        for s, b, _ in _resnet_blocks(arch):
            units += _basic_block(f"layer{s}.{b}", f"stage{s}.{b}", s > 1 and b == 0)
        return units, [("fc", "linear")]
    if arch == "sres50":  # base_model/stagewise_resnet.py: blocks 'block<i>', shortcut 'stage<s>.projection'
        units = [Unit("conv1", CONV_BN_RELU, "conv1", CONV_BN_RELU)]
        for s, b, _ in _resnet_blocks(arch):
            if b == 0:
                units.append(Unit(f"layer{s}.0.shortcut", CONV_BN, f"stage{s}.projection", CONV_BN))
            units += _bottleneck(f"layer{s}.{b}", f"stage{s}.block{b}")
        return units, [("fc", "fc")]
    if arch == "smi1":  # base_model/mobilenetv1.py
        return _mobilenet_units("stem"), [("fc", "linear")]
    raise KeyError(arch)


def _dbb_layout(arch: str) -> Layout:
    """The DBB repository's module names (its ``resnet.py``, ``mobilenet.py``) for ``arch``."""
    if arch in ("sres18", "sres50"):
        units = [Unit("conv1", CONV_BN_RELU, "stage0.conv1", CONV_BN_RELU)]
        for s, b, _ in _resnet_blocks(arch):
            ours, theirs = f"layer{s}.{b}", f"stage{s}.{b}"
            units += (_basic_block(ours, theirs, s > 1 and b == 0) if arch == "sres18"
                      else _bottleneck(ours, theirs) + ([Unit(f"{ours}.shortcut", CONV_BN, f"{theirs}.shortcut",
                                                              CONV_BN)] if b == 0 else []))
        return units, [("fc", "linear")]
    if arch == "smi1":
        return _mobilenet_units("stem"), [("fc", "linear")]
    raise KeyError(arch)


def _resnet_blocks(arch: str) -> Iterator[Tuple[int, int, int]]:
    counts = {"sres18": (2, 2, 2, 2), "sres34": (3, 4, 6, 3), "sres50": (3, 4, 6, 3)}[arch]
    for s, n in enumerate(counts, start=1):
        for b in range(n):
            yield s, b, n


def _basic_block(ours: str, theirs: str, shortcut: bool) -> List[Unit]:
    units = [Unit(f"{ours}.conv1", CONV_BN_RELU, f"{theirs}.conv1", CONV_BN_RELU),
             Unit(f"{ours}.conv2", CONV_BN, f"{theirs}.conv2", CONV_BN)]
    if shortcut:
        units.append(Unit(f"{ours}.shortcut", CONV_BN, f"{theirs}.shortcut", CONV_BN))
    return units


def _bottleneck(ours: str, theirs: str) -> List[Unit]:
    return [Unit(f"{ours}.conv1", CONV_BN_RELU, f"{theirs}.conv1", CONV_BN_RELU),
            Unit(f"{ours}.conv2", CONV_BN_RELU, f"{theirs}.conv2", CONV_BN_RELU),
            Unit(f"{ours}.conv3", CONV_BN, f"{theirs}.conv3", CONV_BN)]


def _mobilenet_units(their_blocks: str) -> List[Unit]:
    units = [Unit("conv1", CONV_BN_RELU, "conv1", CONV_BN_RELU)]
    for i in range(13):
        units += [Unit(f"blocks.{i}.{part}", CONV_BN_RELU, f"{their_blocks}.{i}.{part}", CONV_BN_RELU)
                  for part in ("depthwise", "pointwise")]
    return units


@dataclass(frozen=True)
class OriginalLayout:
    """An arch as one original repository has it: its ``-a`` name there and its :data:`Layout`."""

    their_name: str
    layout: Callable[[], Layout]


#: The DBB repository's ``-a`` name of each architecture it shares with us.
_DBB_ARCH_NAMES = {"sres18": "ResNet-18", "sres50": "ResNet-50", "smi1": "MobileNet"}


def original_layouts_of(arch: str) -> dict[str, OriginalLayout]:
    """The layouts of a built-in arch, by repository (``acnet``: every one; ``dbb``: its three)."""
    layouts = {"acnet": OriginalLayout(arch, functools.partial(_acnet_layout, arch))}
    if arch in _DBB_ARCH_NAMES:
        layouts["dbb"] = OriginalLayout(_DBB_ARCH_NAMES[arch], functools.partial(_dbb_layout, arch))
    return layouts


