"""acnet: structural re-parameterization blocks (ACB, DBB, OREPA, ECB, dilated large-kernel) and their exact fusion into one conv.

Depends on torch only (h5py for the hdf5 weight files).

Blocks: :class:`ACBlock` (alias :class:`AsymConvBlock`), :class:`DiverseBranchBlock`, :class:`OREPABlock`,
:class:`ECBlock`, :class:`DilatedReparamBlock`,
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

from . import transforms
from .acb import ACBlock, AsymConvBlock
from .base import ConvBN, ReparamBlock
from .convert import FoldedNorm, FoldedNormAct, acnet_switch_to_deploy, convert_to_acnet
from .fuse_load import acnet_fuse_and_load
from .pairs import find_conv_bn_pairs
from .report import ConversionReport, ConvReportRow, conversion_report, format_report
from .dbb import DiverseBranchBlock
from .dilated import DilatedReparamBlock
from .ecb import ECBlock
from .orepa import OREPABlock
from .registry import BLOCK_REGISTRY, BlockType, get_block_type
from .export import ExportError, MissingExtraError, export_onnx
from .hdf5 import load_hdf5, save_hdf5
from .norms import NORM_KINDS, ChannelAffine, FrozenBatchNorm
from .quant import convert_qat, prepare_qat
from .weights import NonFiniteWeightsError, WeightsError, check_finite_weights, load_state_dict_file

__version__ = "0.1.0"

__all__ = [
    "ReparamBlock",
    "ConvBN",
    "ACBlock",
    "AsymConvBlock",
    "DiverseBranchBlock",
    "OREPABlock",
    "ECBlock",
    "DilatedReparamBlock",
    "BLOCK_REGISTRY",
    "BlockType",
    "get_block_type",
    "acnet_switch_to_deploy",
    "convert_to_acnet",
    "FoldedNorm",
    "FoldedNormAct",
    "acnet_fuse_and_load",
    "find_conv_bn_pairs",
    "conversion_report",
    "format_report",
    "ConversionReport",
    "ConvReportRow",
    "NORM_KINDS",
    "FrozenBatchNorm",
    "ChannelAffine",
    "save_hdf5",
    "load_hdf5",
    "load_state_dict_file",
    "WeightsError",
    "NonFiniteWeightsError",
    "check_finite_weights",
    "transforms",
    "export_onnx",
    "ExportError",
    "MissingExtraError",
    "prepare_qat",
    "convert_qat",
]
