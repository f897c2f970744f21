"""Compatibility module: the block contract lives in :mod:`acnet.block`, the CPU fast path in
:mod:`acnet.fastpath`. Every name importers used from here is re-exported."""
from __future__ import annotations

from .block import PADDING_MODES, ConvBN, IntOrPair, IntOrTuple, ReparamBlock, as_square_int, as_tuple
from .fastpath import (
    NHWC_MIN_PIXELS, NHWC_STRIDED_1X1_MIN_CHANNELS, _autocast_enabled, _batch_stats, _bns_fusable, _BranchBNSum,
    as_nchw, bn_train_backward, branch_bn_sum, branch_input, conv2d, conv_nd, has_nhwc_faulty_conv, layout_of,
    nhwc_faulty, nhwc_faulty_geometry, run_conv,
)

__all__ = ["ReparamBlock", "ConvBN", "PADDING_MODES", "branch_input", "branch_bn_sum", "run_conv", "conv2d"]

_reexported = (IntOrPair, IntOrTuple, as_square_int, as_tuple, NHWC_MIN_PIXELS, NHWC_STRIDED_1X1_MIN_CHANNELS,
               _autocast_enabled, _batch_stats, _bns_fusable, _BranchBNSum, as_nchw, bn_train_backward, conv_nd,
               has_nhwc_faulty_conv, layout_of, nhwc_faulty, nhwc_faulty_geometry)
