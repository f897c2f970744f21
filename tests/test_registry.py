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
from acnet.block import ReparamBlock
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
    assert block_type_names() == ("base", "acb", "dbb", "orepa", "repvgg", "mobileone", "ecb", "dilated")
    assert constructor.BLOCK_TYPES == block_type_names()
    assert not hasattr(convert_module, "BLOCK_CLASSES")  # no module-level copy: read live
    pluggable = convert_module.pluggable_block_classes()
    assert tuple(pluggable) == block_type_names()[1:]  # base has nothing to plug in
    assert all(pluggable[n] is BLOCK_REGISTRY[n].block_class for n in pluggable)
    choices = next(a.choices for a in build_parser()._actions if a.dest == "block_type")
    assert tuple(choices) == block_type_names()
    assert show_log.block_types() == block_type_names()  # what show_log groups runs by
    assert get_block_type("OREPA").block_class.__name__ == "OREPABlock"
    with pytest.raises(ValueError, match="valid block types: base, acb, dbb, orepa, repvgg, mobileone, ecb, dilated"):
        get_block_type("nosuch")


def test_recipe_options_come_from_the_registry():
    recipe = get_recipe("src56")
    assert block_kwargs("acb", recipe) == {"gamma_init": recipe.gamma_init}
    assert block_kwargs("dbb", recipe) == {} and block_kwargs("orepa", recipe) == {}  # the papers' own inits


def test_signatures_are_unambiguous_and_deploy_names_are_the_originals():
    signatures = [spec.signature for spec in BLOCK_REGISTRY.values()]
    assert len(set(signatures)) == len(signatures)
    assert {spec.deploy_conv_name for spec in BLOCK_REGISTRY.values()} == {"fused_conv", "dbb_reparam",
                                                                          "orepa_reparam", "rbr_reparam",
                                                                          "reparam_conv", "ecb_reparam",
                                                                          "lkb_reparam"}
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


TORCH_FREE = """
import sys
sys.modules["torch"] = None  # any import of torch now fails
import acnet
import acnet.registry as registry
print(registry.block_type_names())
print([(t.name, t.plain, t.paper, bool(t.description)) for t in registry.BLOCK_REGISTRY.values()])
registry.register_block_type(registry.BlockType("acb2", "acnet.acb:ACBlock"))  # registered by reference: not imported
print(sorted(name for name in sys.modules if name.split(".")[0] == "acnet"))
try:
    registry.get_block_type("acb2").block_class
except ValueError as exc:
    print("first use:", exc)
"""


def test_the_registry_is_read_without_torch():
    """`do_acnet.py -h` lists the block types: the registry (and `import acnet`) must not import torch."""
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run([sys.executable, "-c", TORCH_FREE], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == str(block_type_names())
    assert lines[1] == str([(t.name, t.plain, t.paper, bool(t.description)) for t in BLOCK_REGISTRY.values()])
    assert lines[2] == "['acnet', 'acnet.registry']"
    assert lines[3].startswith("first use: block type 'acb2': cannot import its block class 'acnet.acb:ACBlock'")


def test_a_block_class_given_by_reference_is_imported_and_checked_on_first_use():
    from acnet.acb import ACBlock

    spec = register_block_type(BlockType("acb2", "acnet.acb:ACBlock", paper="ACNet"))
    try:
        assert spec.block_ref == "acnet.acb:ACBlock" and spec.block_class is ACBlock
        assert spec.signature == ACBlock.signature and spec.recipe_options == ("gamma_init",)
        assert isinstance(convert_to_acnet(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "acb2")[0], ACBlock)
    finally:
        unregister_block_type("acb2")
    with pytest.raises(ValueError, match="'acnet.acb:ACB:x' is not a 'package.module:ClassName' reference"):
        register_block_type(BlockType("bad", "acnet.acb:ACB:x"))
    for ref, error, message in (("acnet.acb:NoSuchBlock", ValueError, "cannot import its block class"),
                                ("acnet.no_such_module:ACBlock", ValueError, "cannot import its block class"),
                                ("torch.nn:Conv2d", TypeError, "is not a ReparamBlock")):
        spec = register_block_type(BlockType("bad", ref))  # the form is checked now, the class on first use
        try:
            with pytest.raises(error, match=f"block type 'bad': .*{message}"):
                spec.block_class
        finally:
            unregister_block_type("bad")


def test_every_public_name_of_acnet_resolves_to_its_module():
    import importlib
    import pkgutil
    import types

    import acnet

    for name in acnet.__all__:
        value = getattr(acnet, name)
        if isinstance(value, types.ModuleType):
            assert value is importlib.import_module(f"acnet.{name}")
        else:
            home = [m.name for m in pkgutil.iter_modules(acnet.__path__)
                    if getattr(importlib.import_module(f"acnet.{m.name}"), name, None) is value]
            assert home, name
    assert set(acnet.__all__) <= set(dir(acnet))
    assert acnet.pairs.find_conv_bn_pairs is acnet.find_conv_bn_pairs  # submodules are attributes too
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        acnet.no_such_name
