"""The conv-builder switch: one object that makes every conv-BN unit of an architecture.

An architecture receives a :class:`ConvBuilder` and asks it for units; it never learns which block
type it got. The unit kinds an architecture can ask for:

==================  ==========================================  =================================
method              computes                                    used by
==================  ==========================================  =================================
``conv_bn``         ``bn(conv(x))``                             ResNet second convs, shortcuts
``conv_bn_relu``    ``relu(bn(conv(x)))``                       Cifar-quick, VGG, ResNet, MobileNet
``bn_relu_conv``    ``conv(relu(bn(x)))`` (pre-activation)      WRN
``conv``            ``conv(x)``, no BN after it                 WRN stem
``bn``              a standalone ``BatchNorm2d``                WRN's last BN
==================  ==========================================  =================================

Which conv becomes a re-parameterizable block (the original rule): a KxK conv with 1 < K < 7.
1x1 convs and the 7x7 ImageNet stem stay plain -- except for ``mobileone``, whose paper puts its blocks
on the pointwise 1x1 convs too (:data:`KERNEL_RULES`). The conv inside each unit takes one of these forms:

================  ===================  ==============================  ===========================
conv of a unit    ``base`` training    ``acb``/``dbb``/``orepa``       deploy (any block type)
================  ===================  ==============================  ===========================
``conv_bn``       ``acnet.ConvBN``     block if 1 < K < 7, else ConvBN ``nn.Conv2d(bias=True)``
``conv``          :class:`BiasFreeConv` block if 1 < K < 7, else       ``nn.Conv2d(bias=True)``
                                       BiasFreeConv
================  ===================  ==============================  ===========================

so the deploy model of every block type has the same module tree, parameter names and shapes, and
``acnet.acnet_switch_to_deploy`` (which replaces every ``acnet.ReparamBlock`` by its fused conv)
turns any training model into exactly that tree.

Pre-activation (BN-ReLU-conv, WRN). The BN sits before a ReLU, so it cannot be folded into any
conv: it stays a ``BatchNorm2d`` named ``bn`` in every form. The conv after the ReLU has no BN of
its own in the base network (the WRN of the paper); as a block it carries its branch BNs, whose
shifts fuse into a bias. Its deploy form is therefore ``nn.Conv2d(bias=True)`` for every block
type; in ``base`` training it is a :class:`BiasFreeConv`, whose deploy form is the same conv with a
zero bias (exact). The base training network is unchanged (no extra BN, no extra bias).
"""
from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Any, Callable, Dict, Optional, Tuple

from torch import Tensor, nn

from acnet.block import NORM_ARGUMENTS, ConvBN, IntOrPair, ReparamBlock, block_option_names, takes_arguments
from acnet.errors import BlockTypeNotApplicableError
from acnet.registry import block_type_names, get_block_type

__all__ = [
    "BiasFreeConv",
    "ConvBuilder",
    "make_builder",
    "is_reparameterizable_kernel",
    "takes_kernel",
]


_REFUSED_OPTIONS = {
    "nonlinear": "architectures place their own activations (conv_bn_relu / bn_relu_conv), so every "
    "block type keeps the same deploy structure",
}


def is_reparameterizable_kernel(kernel_size: int) -> bool:
    """The original rule: a KxK conv becomes a block iff ``1 < K < 7`` (1x1 and 7x7 stay plain)."""
    return 1 < kernel_size < 7


def _with_pointwise(kernel_size: int) -> bool:
    """MobileOne's rule: its blocks replace the depthwise KxK and the pointwise 1x1 convs alike (``K < 7``)."""
    return 1 <= kernel_size < 7


def is_large_kernel(kernel_size: int) -> bool:
    """The dilated re-param rule (RepLKNet / UniRepLKNet): an odd KxK conv with ``K >= 5`` (7x7 stems too)."""
    return kernel_size >= 5 and kernel_size % 2 == 1


#: Block types whose paper puts blocks on other kernel sizes than :func:`is_reparameterizable_kernel`'s.
#: RepVGG's paper uses 3x3 blocks only; here it takes every 1 < K < 7 conv like ACB / DBB (its 1x1 branch
#: on the centre tap), so that a 5x5 architecture (Cifar-quick) has RepVGG blocks too.
KERNEL_RULES: Dict[str, Callable[[int], bool]] = {"mobileone": _with_pointwise, "dilated": is_large_kernel}
#: Block types trained BN-free (``norm="none"``) in a unit with no BN after its conv (``conv``,
#: ``bn_relu_conv``): ECB, whose paper's block has no BN; in a conv-BN unit it is followed by the unit's BN.
BN_FREE_IN_CONV_UNITS = frozenset({"ecb"})


def takes_kernel(block_type: str, kernel_size: int) -> bool:
    """Whether the builder of ``block_type`` makes a block for a KxK conv (:data:`KERNEL_RULES`, else
    :func:`is_reparameterizable_kernel`)."""
    return KERNEL_RULES.get(block_type, is_reparameterizable_kernel)(kernel_size)


class BiasFreeConv(ReparamBlock):
    """A bias-free conv with no BN after it: the ``base`` form of a pre-activation / stem conv.

    Training form: child ``conv`` (``nn.Conv2d``, ``bias=False``). Equivalent kernel and bias:
    ``(conv.weight, 0)``. It is a :class:`acnet.ReparamBlock` only so that whole-model conversion
    gives it the same deploy form as a block in its place: ``nn.Conv2d(bias=True)`` with a zero bias.
    After :meth:`switch_to_deploy` only ``fused_conv`` remains.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: IntOrPair = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=groups,
            bias=False,
            padding_mode=padding_mode,
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.fused_conv(x) if self.deployed else self.conv(x)

    def get_equivalent_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        """``(conv.weight, zeros(out_channels))``."""
        if self.deployed:
            return self.fused_conv.weight, self.fused_conv.bias
        weight = self.conv.weight
        return weight, weight.new_zeros(self.out_channels)

    def switch_to_deploy(self) -> None:
        if self.deployed:
            return
        self.fused_conv = self.make_deploy_conv()
        del self.conv


def _split_block_options(
    block_type: str, block_class: Optional[Callable[..., Any]], options: Dict[str, Any]
) -> Tuple[Dict[str, Any], Optional[float]]:
    """Validate per-block options: ``(constructor options, gamma to apply with init_gamma or None)``.

    ``gamma_init`` (initial weight of every branch BN) is accepted by every block type that has
    branches: passed to the constructor when it takes it (ACB), else applied with the block's
    ``init_gamma`` (DBB). Anything the block does not take raises one ``ValueError`` listing what
    it does take.
    """
    for name, advice in _REFUSED_OPTIONS.items():
        if name in options:
            raise ValueError(f"block option {name!r} is not accepted: {advice}")
    if not options:
        return {}, None
    if block_class is None:
        raise ValueError(
            f"block type {block_type!r} takes no block options (got {sorted(options)}); only bn_eps and "
            f"bn_momentum apply to it. Per-block options belong to {[t for t in block_type_names() if t != block_type]}."
        )
    options = dict(options)
    parameters = inspect.signature(block_class).parameters
    gamma_after = None
    if "gamma_init" in options and "gamma_init" not in parameters and hasattr(block_class, "init_gamma"):
        gamma_after = options.pop("gamma_init")
        if gamma_after is not None and not isinstance(gamma_after, (int, float)):
            raise ValueError(f"gamma_init must be a number, got {gamma_after!r}")
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return options, gamma_after
    accepted = set(block_option_names(block_class, excluding=NORM_ARGUMENTS | set(_REFUSED_OPTIONS)))
    if hasattr(block_class, "init_gamma"):
        accepted.add("gamma_init")
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"block type {block_type!r} ({block_class.__name__}) does not take option(s) {unknown}; "
            f"its options are {sorted(accepted)} (plus bn_eps, bn_momentum)"
        )
    return options, gamma_after


class ConvBuilder:
    """Makes the conv units of an architecture for one block type, in training or deploy form.

    ``block_class``: the re-parameterizable block trained in place of every KxK conv with
    1 < K < 7 (``None``: plain conv-BN everywhere, the ``base`` network). ``deploy``: build every
    unit's conv as one ``nn.Conv2d(bias=True)`` (identical for every block type). ``bn_eps`` /
    ``bn_momentum`` apply to every BN the builder makes (inside blocks too); ``block_options`` go to
    every block (e.g. ACB ``gamma_init``, DBB ``internal_channels_1x1_3x3``).
    """

    def __init__(
        self,
        block_class: Optional[Callable[..., ReparamBlock]] = None,
        *,
        deploy: bool = False,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
        block_type: Optional[str] = None,
        **block_options: Any,
    ) -> None:
        self.block_type = block_type or ("base" if block_class is None else block_class.__name__)
        options, gamma_after = _split_block_options(self.block_type, block_class, block_options)
        if not (isinstance(bn_eps, (int, float)) and bn_eps > 0):
            raise ValueError(f"bn_eps must be a positive number, got {bn_eps!r}")
        if not (isinstance(bn_momentum, (int, float)) and 0 <= bn_momentum <= 1):
            raise ValueError(f"bn_momentum must be a number in [0, 1], got {bn_momentum!r}")
        self.block_class = block_class
        self.blocks_built = 0  # blocks made so far (an arch none of whose convs fits the block type is refused)
        self.deploy = deploy
        self.bn_eps = float(bn_eps)
        self.bn_momentum = float(bn_momentum)
        self.block_options = options
        self.gamma_init = gamma_after
        if block_class is not None and takes_arguments(block_class, *NORM_ARGUMENTS):
            self.block_options.update(bn_eps=self.bn_eps, bn_momentum=self.bn_momentum)
        elif block_class is not None and (self.bn_eps, self.bn_momentum) != (1e-5, 0.1):
            raise ValueError(f"{self.block_type}: the block class takes no bn_eps / bn_momentum to set")

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.block_options.items() if k not in NORM_ARGUMENTS}
        shown.update({} if self.gamma_init is None else {"gamma_init": self.gamma_init})
        options = "".join(f", {k}={v!r}" for k, v in shown.items())
        return f"ConvBuilder({self.block_type!r}, deploy={self.deploy}{options})"

    # --- the conv of a unit ---------------------------------------------------------------------
    def _deploy_conv(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups) -> nn.Conv2d:
        return nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
            groups=groups, bias=True,
        )

    def _block(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
               bn_after: bool = True) -> Optional[nn.Module]:
        """The block for this conv, or ``None`` where the plain form is trained (the block type's kernel
        rule, :func:`takes_kernel`)."""
        if self.block_class is None or not takes_kernel(self.block_type, _square(kernel_size)):
            return None
        form = {} if bn_after or self.block_type not in BN_FREE_IN_CONV_UNITS else {"norm": "none"}
        block = self.block_class(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
            groups=groups, **self.block_options, **form,
        )
        if self.gamma_init is not None:
            block.init_gamma(self.gamma_init)
        self.blocks_built += 1
        return block

    def _unit(self, geometry: tuple, plain: Callable[[], nn.Module], bn_after: bool = True) -> nn.Module:
        """The deploy conv in deploy mode; else the block where the kernel qualifies, else ``plain()``."""
        if self.deploy:
            return self._deploy_conv(*geometry)
        block = self._block(*geometry, bn_after=bn_after)
        return plain() if block is None else block

    # --- units ----------------------------------------------------------------------------------
    def conv_bn(
        self, in_channels: int, out_channels: int, kernel_size: IntOrPair, stride: IntOrPair = 1,
        padding: IntOrPair = 0, dilation: IntOrPair = 1, groups: int = 1,
    ) -> nn.Module:
        """``bn(conv(x))``: ``ConvBN``, a block, or (deploy) ``nn.Conv2d(bias=True)``."""
        geometry = (in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        return self._unit(geometry, lambda: ConvBN(*geometry, bn_eps=self.bn_eps, bn_momentum=self.bn_momentum))

    def conv_bn_relu(
        self, in_channels: int, out_channels: int, kernel_size: IntOrPair, stride: IntOrPair = 1,
        padding: IntOrPair = 0, dilation: IntOrPair = 1, groups: int = 1,
    ) -> nn.Sequential:
        """``relu(bn(conv(x)))`` as ``Sequential(conv=<conv_bn unit>, relu=ReLU)``."""
        unit = self.conv_bn(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        return nn.Sequential(OrderedDict(conv=unit, relu=nn.ReLU(inplace=True)))

    def conv(
        self, in_channels: int, out_channels: int, kernel_size: IntOrPair, stride: IntOrPair = 1,
        padding: IntOrPair = 0, dilation: IntOrPair = 1, groups: int = 1,
    ) -> nn.Module:
        """``conv(x)`` with no BN after it: :class:`BiasFreeConv`, a block, or (deploy) ``nn.Conv2d(bias=True)``."""
        geometry = (in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        return self._unit(geometry, lambda: BiasFreeConv(*geometry), bn_after=False)

    def bn_relu_conv(
        self, in_channels: int, out_channels: int, kernel_size: IntOrPair, stride: IntOrPair = 1,
        padding: IntOrPair = 0, dilation: IntOrPair = 1, groups: int = 1,
    ) -> nn.Sequential:
        """Pre-activation ``conv(relu(bn(x)))`` as ``Sequential(bn=BatchNorm2d, relu=ReLU, conv=<conv unit>)``."""
        return nn.Sequential(
            OrderedDict(
                bn=self.bn(in_channels),
                relu=nn.ReLU(inplace=True),
                conv=self.conv(in_channels, out_channels, kernel_size, stride, padding, dilation, groups),
            )
        )

    def bn(self, num_features: int) -> nn.BatchNorm2d:
        """A standalone ``BatchNorm2d`` (same in every form) with the builder's eps and momentum."""
        return nn.BatchNorm2d(num_features, eps=self.bn_eps, momentum=self.bn_momentum)


def _square(kernel_size: IntOrPair) -> int:
    if isinstance(kernel_size, int):
        return kernel_size
    height, width = kernel_size
    if height != width:
        raise ValueError(f"kernel_size must be square, got {tuple(kernel_size)}")
    return int(height)


def kernel_rule_text(block_type: str) -> str:
    """The builder's kernel rule for ``block_type`` in words."""
    rule = KERNEL_RULES.get(block_type, is_reparameterizable_kernel)
    return {is_large_kernel: "odd K >= 5", is_reparameterizable_kernel: "1 < K < 7",
            _with_pointwise: "1 <= K < 7"}.get(rule, "its kernel rule")


def make_builder(block_type: str = "base", deploy: bool = False, **block_kwargs: Any) -> ConvBuilder:
    """The builder for a registered block type name (``acnet.registry.block_type_names()``); ``block_kwargs``: ``bn_eps``,
    ``bn_momentum`` and the block's own options. Unknown names raise one ``ValueError``."""
    if block_type not in block_type_names():
        raise ValueError(f"unknown block type {block_type!r}; valid block types: {', '.join(block_type_names())}")
    spec = get_block_type(block_type)
    return ConvBuilder(None if spec.plain else spec.block_class, deploy=deploy, block_type=block_type, **block_kwargs)
