"""The one registry of block types: every consumer reads it, and a new block is added in one place."""
from __future__ import annotations

from typing import Tuple

import pytest
import torch
from torch import Tensor, nn

import constructor
import show_log
from acnet import BLOCK_REGISTRY, BlockType, acnet_fuse_and_load, acnet_switch_to_deploy, convert_to_acnet
from acnet import convert as convert_module
from acnet import fuse_load
from acnet import transforms
from acnet.base import ReparamBlock
from acnet.registry import block_type_names, get_block_type, register_block_type, unregister_block_type
from do_acnet import block_kwargs, build_parser
from train_configs import get_recipe


class TwoKernelBlock(ReparamBlock):
    """A block the project does not ship: ``bn(conv(x; a + b))`` with two KxK kernels; it declares what the
    framework needs as class attributes (the block contract), nothing is registered beside its name."""

    deploy_conv_name = "fused_conv"
    signature = "kernel_a"

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 padding_mode="zeros", deploy=False, *, bn_eps=1e-5, bn_momentum=0.1):
        super().__init__()
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        shape = (out_channels, in_channels // groups, self.kernel_size, self.kernel_size)
        self.kernel_a = nn.Parameter(torch.randn(shape) * 0.1)
        self.kernel_b = nn.Parameter(torch.randn(shape) * 0.1)
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum)

    def forward(self, x: Tensor) -> Tensor:
        if self.deployed:
            return self.fused_conv(x)
        return self.bn(nn.functional.conv2d(x, self.kernel_a + self.kernel_b, None, self.stride, self.padding,
                                            self.dilation, self.groups))

    def get_equivalent_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        return transforms.fuse_bn(self.kernel_a + self.kernel_b, self.bn)

    def switch_to_deploy(self) -> None:
        if not self.deployed:
            fused = self.make_deploy_conv()
            del self.kernel_a, self.kernel_b, self.bn
            self.fused_conv = fused

    def single_init(self) -> None:
        with torch.no_grad():
            self.kernel_b.zero_()

    def main_branch(self):
        return self.kernel_a, self.bn


@pytest.fixture
def two_kernel():
    spec = register_block_type(BlockType("twok", TwoKernelBlock))
    yield spec
    unregister_block_type("twok")


def test_every_consumer_lists_the_registered_block_types():
    assert block_type_names()[:4] == ("base", "acb", "dbb", "orepa")
    assert {"ecb", "dilated"} <= set(block_type_names())
    assert constructor.BLOCK_TYPES == block_type_names()
    assert not hasattr(convert_module, "BLOCK_CLASSES")  # no module-level copy: read live
    pluggable = convert_module.pluggable_block_classes()
    assert tuple(pluggable) == block_type_names()[1:]  # base has nothing to plug in
    assert all(pluggable[n] is BLOCK_REGISTRY[n].block_class for n in pluggable)
    choices = next(a.choices for a in build_parser()._actions if a.dest == "block_type")
    assert tuple(choices) == block_type_names()
    assert show_log.BLOCK_TYPES == block_type_names()  # show_log is standard-library only: kept equal here
    assert get_block_type("OREPA").block_class.__name__ == "OREPABlock"
    with pytest.raises(ValueError, match="valid block types: base, acb, dbb, orepa, "):
        get_block_type("nosuchblock")


def test_recipe_options_come_from_the_registry():
    recipe = get_recipe("src56")
    assert block_kwargs("acb", recipe) == {"gamma_init": recipe.gamma_init}
    assert block_kwargs("dbb", recipe) == {} and block_kwargs("orepa", recipe) == {}  # the papers' own inits


def test_signatures_are_unambiguous_and_deploy_names_are_the_originals():
    signatures = [spec.signature for spec in BLOCK_REGISTRY.values()]
    assert len(set(signatures)) == len(signatures)
    assert {spec.deploy_conv_name for spec in BLOCK_REGISTRY.values()} >= {"fused_conv", "dbb_reparam",
                                                                          "orepa_reparam"}
    # ECB: ECBSR's deployed PlainSR unit calls it conv3x3 (our training-form name), so ours is ecb_reparam;
    # dilated: RepLKNet's lkb_reparam (UniRepLKNet reuses lk_origin, the training-form name)
    assert BLOCK_REGISTRY["ecb"].deploy_conv_name == "ecb_reparam"
    assert BLOCK_REGISTRY["dilated"].deploy_conv_name == "lkb_reparam"
    deploy_names = [spec.deploy_conv_name for spec in BLOCK_REGISTRY.values()]
    assert len(set(deploy_names)) == len(deploy_names) - 1  # base and acb share fused_conv
    for name, spec in BLOCK_REGISTRY.items():  # each stored block is recognised as its own kind
        if spec.plain:
            continue
        k = 3 if spec.block_class.unsupported(dim=2, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1),
                                              dilation=(1, 1), groups=1, padding_mode="zeros", norm="batch") is None else 7
        block = spec.block_class(4, 4, k, padding=k // 2)
        kinds = [kind for key, kind in fuse_load._block_signatures() if key in block.state_dict()]
        assert kinds[0] == name, (name, kinds)


def test_a_block_registered_once_is_available_everywhere(two_kernel):
    parser = build_parser()
    assert parser.parse_args(["-a", "src56", "-b", "twok"]).block_type == "twok"
    model = constructor.build_model("cfqkbnc", "twok")
    assert sum(isinstance(m, TwoKernelBlock) for m in model.modules()) == 3

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
    base = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
    trained = convert_to_acnet(net, "twok")
    assert isinstance(trained[0], TwoKernelBlock) and isinstance(trained[1], nn.Identity)
    trained.train()(torch.randn(8, 3, 6, 6))
    trained.eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = trained(x)
        torch.testing.assert_close(acnet_fuse_and_load(base, trained.state_dict())(x), expected)
        torch.testing.assert_close(acnet_switch_to_deploy(trained)(x), expected)


def test_registry_reads_the_block_class_attributes(two_kernel):
    assert two_kernel.signature == "kernel_a" and two_kernel.deploy_conv_name == "fused_conv"
    assert two_kernel.recipe_options == () and two_kernel.stored_options({}, 3) == {}
    for spec in BLOCK_REGISTRY.values():
        assert spec.signature == spec.block_class.signature and spec.recipe_options == spec.block_class.recipe_options
    assert get_block_type("acb").recipe_options == ("gamma_init",)
    with pytest.raises(ValueError, match="signature must name a state-dict key"):
        register_block_type(BlockType("nosig", type("NoSignature", (TwoKernelBlock,), {"signature": ""})))


def test_a_user_block_without_dim_and_norm_arguments_converts_only_2d_batchnorm_pairs(two_kernel):
    from acnet import conversion_report

    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv1d(4, 4, 3), nn.BatchNorm1d(4))
    rows = conversion_report(net, "twok").rows
    assert [r.converted for r in rows] == [True, False]
    assert rows[1].reason == "TwoKernelBlock takes no dim/norm arguments"


def test_keep_weights_uses_the_registered_main_branch(two_kernel):
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)).eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        expected = net(x)
        converted = convert_to_acnet(net, "twok", keep_weights=True).eval()
        torch.testing.assert_close(converted(x), expected)


def test_register_block_type_refuses_duplicates_and_non_blocks(two_kernel):
    assert block_type_names()[-1] == "twok"
    with pytest.raises(ValueError, match="already registered"):
        register_block_type(two_kernel)
    assert register_block_type(two_kernel, replace=True) is two_kernel
    with pytest.raises(TypeError, match="is not a ReparamBlock"):
        register_block_type(BlockType("conv", nn.Conv2d))
    with pytest.raises(ValueError, match="lower-case"):
        register_block_type(BlockType("TwoK", TwoKernelBlock))
    assert "conv" not in BLOCK_REGISTRY and "TwoK" not in BLOCK_REGISTRY


def test_unregister_block_type_removes_the_name():
    spec = register_block_type(BlockType("twok2", TwoKernelBlock))
    assert unregister_block_type("TWOK2") is spec
    assert "twok2" not in block_type_names()
    with pytest.raises(ValueError, match="unknown block type"):
        unregister_block_type("twok2")
