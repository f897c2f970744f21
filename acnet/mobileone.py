"""MobileOne (Vasu et al., CVPR 2023): ``k`` over-parameterized KxK conv-BN branches, a 1x1 "scale" conv-BN
and an identity BN, fused into one KxK conv; for depthwise and pointwise convs alike.

Branches (each ends in a norm; their sum, then ``nonlinear``, is the output):

* ``rbr_conv.0`` ... ``rbr_conv.{k-1}``: ``k`` KxK conv (``conv``) -> BN (``bn``) branches of the block's
  geometry (``num_conv_branches``, the paper's over-parameterization factor ``k``: 1 by default, as
  MobileOne-S1..S4; MobileOne-S0 uses 4);
* ``rbr_scale``: 1x1 conv -> BN with the block's stride on the centre tap, only where the kernel is larger
  than 1x1 (the paper's rule; a 1x1 block has none);
* ``rbr_skip``: a BN of the input, only where ``in_channels == out_channels`` and stride 1.

Fusion: ``k = sum_i s_i * k_i + place(s_1 * k_1) + place(s_id * I)``, ``b = sum of the shifts``, exactly as
:class:`acnet.repvgg.RepVGGBlock` (whose module docstring gives the centre alignment, the transposed
form and the norm kinds; this block shares its implementation, :class:`acnet.repvgg.CentreBranchBlock`).
The frozen form: ``rbr_conv.0.bn`` is the frozen pretrained BN, every other norm a learnable scale and
shift; ``keep_weights``: ``rbr_conv.0`` takes the pretrained pair, every other branch starts at zero.

State-dict names are the original's (``mobileone.py`` of apple/ml-mobileone, commit b7f4e6d4):
``rbr_conv.<i>.conv``, ``rbr_conv.<i>.bn``, ``rbr_scale.conv``, ``rbr_scale.bn``, ``rbr_skip``; deploy form
``reparam_conv``. A state dict of the original's ``MobileOneBlock`` (``use_se=False``) loads as it is; the
original applies a ReLU after the sum, ours ``nonlinear`` (default: none). The original pads its KxK
branches by ``padding`` and its 1x1 branch by 0, which reads the centre tap only for ``padding = K // 2``
(its only use); ours reads the centre tap for every padding.
"""
from __future__ import annotations

from typing import List, Mapping, Optional, Tuple

from torch import Tensor, nn

from .block import IntOrTuple
from .repvgg import CentreBranchBlock

__all__ = ["MobileOneBlock", "MOBILEONE_BRANCHES"]

#: The paper's over-parameterization factor ``k`` (``num_conv_branches``) per MobileOne variant.
MOBILEONE_BRANCHES = {"s0": 4, "s1": 1, "s2": 1, "s3": 1, "s4": 1}


class MobileOneBlock(CentreBranchBlock):
    """MobileOne block, state-dict compatible with the original ``MobileOneBlock``; deploy form ``reparam_conv``.

    ``num_conv_branches``: the number ``k`` of KxK conv-norm branches (``rbr_conv``; default 1). ``padding``
    (default ``d * ((K - 1) // 2)``), any ``dilation``, ``groups`` (depthwise and pointwise blocks are the
    paper's), ``padding_mode``; ``nonlinear`` (default identity) is applied after the sum and kept by the
    deploy form; ``dim`` / ``norm`` / ``transposed`` / ``output_padding`` / ``bias``: the forms of
    :class:`~acnet.repvgg.RepVGGBlock`.
    """

    deploy_conv_name = "reparam_conv"
    signature = "rbr_conv.0.conv.weight"
    scale_name = "rbr_scale"
    identity_name = "rbr_skip"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple,
        stride: IntOrTuple = 1,
        padding: Optional[IntOrTuple] = None,
        dilation: IntOrTuple = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        deploy: bool = False,
        nonlinear: Optional[nn.Module] = None,
        num_conv_branches: int = 1,
        *,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
        dim: int = 2,
        norm: str = "batch",
        transposed: bool = False,
        output_padding: IntOrTuple = 0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self._build(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode,
                    deploy, nonlinear, branches=num_conv_branches, bn_eps=bn_eps,
                    bn_momentum=bn_momentum, dim=dim, norm=norm, transposed=transposed,
                    output_padding=output_padding, bias=bias)
        self.num_conv_branches = num_conv_branches

    @property
    def inference_mode(self) -> bool:
        """The original's name of :attr:`deployed`."""
        return self.deployed

    def _set_kxk(self, units: List[nn.Sequential]) -> None:
        self.rbr_conv = nn.ModuleList(units)

    def _kxk_units(self) -> Tuple[nn.Sequential, ...]:
        return tuple(self.rbr_conv)

    def _kxk_names(self) -> Tuple[str, ...]:
        return ("rbr_conv",)

    @classmethod
    def _main_conv_key(cls) -> str:
        return "rbr_conv.0.conv.weight"

    @classmethod
    def _stored_parts(cls, state: Mapping[str, Tensor]) -> Tuple[str, Optional[str]]:
        for other in ("rbr_scale.bn", "rbr_conv.1.bn", "rbr_skip"):
            if f"{other}.weight" in state:
                return "rbr_conv.0.bn", other
        return "rbr_conv.0.bn", None

    @classmethod
    def stored_options(cls, state: Mapping[str, Tensor], in_channels: int) -> dict:
        options = super().stored_options(state, in_channels)
        branches = 0
        while f"rbr_conv.{branches}.conv.weight" in state:
            branches += 1
        if branches > 1:
            options["num_conv_branches"] = branches
        return options
