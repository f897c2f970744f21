"""acnet: structural re-parameterization blocks (ACB, DBB, OREPA, RepVGG, MobileOne, ECB, dilated large-kernel) and
their exact fusion into one conv.

Depends on torch only (h5py for the hdf5 weight files). ``import acnet`` itself imports neither: each
public name below is imported from its module on first use (a new public name is one line of ``_EXPORTS``).

Blocks: :class:`ACBlock` (alias :class:`AsymConvBlock`), :class:`DiverseBranchBlock`, :class:`OREPABlock`,
:class:`RepVGGBlock`, :class:`MobileOneBlock`, :class:`ECBlock`, :class:`DilatedReparamBlock`,
:class:`ConvBN`, all :class:`ReparamBlock` s (in eval mode each equals one conv with bias); the one
registry of block types: :data:`BLOCK_REGISTRY` / :func:`get_block_type` (module :mod:`acnet.registry`). Whole models:
:func:`convert_to_acnet` plugs blocks into any model (every N-D conv and transposed conv a block has a
form for; the form per conv from what it feeds: BatchNorm, frozen BatchNorm, or anything else, BN-free),
:func:`conversion_report` says beforehand what it would do and which option would change it,
:func:`acnet_switch_to_deploy` gives back the stock module tree (plain convs, the stock norms), :func:`acnet_fuse_and_load`
loads training-time weights into the unmodified baseline model. Weights: :func:`save_hdf5` / :func:`load_hdf5` (the original hdf5 format),
:func:`load_state_dict_file` (hdf5 or torch checkpoint, loaded safely), :func:`check_finite_weights`
(refuses NaN / inf), :class:`WeightsError`.
The fusion maths: module :mod:`acnet.transforms`.
Deployment: :func:`export_onnx` (checked ONNX export; needs the ``deploy`` extra), :func:`prepare_qat` /
:func:`convert_qat` (int8 QAT on the equivalent kernel, module :mod:`acnet.quant`).
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Dict, List

__version__ = "0.1.0"

#: Each public name -> the submodule that defines it. ``import acnet`` imports none of them (nor torch):
#: a name is imported from its module on first access (PEP 562), so ``import acnet.registry`` and
#: ``acnet.registry.block_type_names()`` stay torch-free while ``from acnet import convert_to_acnet`` works.
_EXPORTS: Dict[str, str] = {
    "ReparamBlock": "block",
    "ConvBN": "block",
    "ACBlock": "acb",
    "AsymConvBlock": "acb",
    "DiverseBranchBlock": "dbb",
    "OREPABlock": "orepa",
    "ECBlock": "ecb",
    "DilatedReparamBlock": "dilated",
    "RepVGGBlock": "repvgg",
    "MobileOneBlock": "mobileone",
    "BLOCK_REGISTRY": "registry",
    "BlockType": "registry",
    "get_block_type": "registry",
    "acnet_switch_to_deploy": "convert",
    "convert_to_acnet": "convert",
    "FoldedNorm": "convert",
    "FoldedNormAct": "convert",
    "acnet_fuse_and_load": "fuse_load",
    "find_conv_bn_pairs": "pairs",
    "conversion_report": "report",
    "format_report": "report",
    "ConversionReport": "report",
    "ConvReportRow": "report",
    "NORM_KINDS": "norms",
    "FrozenBatchNorm": "norms",
    "ChannelAffine": "norms",
    "save_hdf5": "hdf5",
    "load_hdf5": "hdf5",
    "load_state_dict_file": "weights",
    "WeightsError": "weights",
    "NonFiniteWeightsError": "weights",
    "check_finite_weights": "weights",
    "export_onnx": "export",
    "ExportError": "export",
    "MissingExtraError": "export",
    "prepare_qat": "quant",
    "convert_qat": "quant",
}
#: Public submodules offered as attributes too (``acnet.transforms``: the fusion maths).
_SUBMODULES = ("transforms",)

__all__ = [*_EXPORTS, *_SUBMODULES]


def __getattr__(name: str) -> Any:
    """A public name, imported from its submodule on first access (then cached in this module); any
    submodule of the package by its name."""
    module_name = _EXPORTS.get(name)
    if module_name is not None:
        value = getattr(importlib.import_module(f"{__name__}.{module_name}"), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES or (not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}")):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
