"""Whole-model API: convert_to_acnet, acnet_switch_to_deploy, acnet_fuse_and_load (incl. torchvision resnet18)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import acnet
from acnet import (
    ACBlock,
    DiverseBranchBlock,
    ReparamBlock,
    WeightsError,
    acnet_fuse_and_load,
    acnet_switch_to_deploy,
    convert_to_acnet,
    save_hdf5,
)
from acnet.convert import ConvBNPair, FoldedNorm, find_conv_bn_pairs
from helpers import randomize_state_, relative_difference

BLOCK_CLASS = {"acb": ACBlock, "dbb": DiverseBranchBlock}


pytestmark = pytest.mark.usefixtures("single_torch_thread")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def count(model: nn.Module, cls: type) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


# --------------------------------------------------------------------------------------------
# package surface
# --------------------------------------------------------------------------------------------
def test_public_api_is_exported():
    for name in acnet.__all__:
        assert hasattr(acnet, name), name
    assert issubclass(WeightsError, RuntimeError)
    assert acnet.AsymConvBlock is ACBlock
    assert callable(acnet.transforms.fuse_bn)


# --------------------------------------------------------------------------------------------
# convert_to_acnet on torchvision's resnet18
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_type", ["acb", "dbb"])
def test_resnet18_conversion_replaces_every_conv_the_block_has_a_form_for(block_type):
    model = torchvision.models.resnet18(num_classes=10)
    model.layer2[0].bn1.eps, model.layer2[0].bn1.momentum = 1e-3, 0.05
    convert_to_acnet(model, block_type)
    block_class = BLOCK_CLASS[block_type]
    assert isinstance(model.conv1, block_class) and model.conv1.kernel_size == 7  # the 7x7 stem too
    assert isinstance(model.bn1, FoldedNorm) and isinstance(model.bn1, nn.Identity)
    if block_type == "acb":  # ACB has no 1x1 form: the downsample convs stay
        assert count(model, block_class) == 17
        assert type(model.layer2[0].downsample[0]) is nn.Conv2d
        assert isinstance(model.layer2[0].downsample[1], nn.BatchNorm2d)
    else:  # DBB has one: every conv converts
        assert count(model, block_class) == 20 and isinstance(model.layer2[0].downsample[0], block_class)
    for block in model.modules():
        if isinstance(block, BasicBlock := torchvision.models.resnet.BasicBlock):
            assert isinstance(block.conv1, block_class) and isinstance(block.bn1, FoldedNorm)
            assert isinstance(block.conv2, block_class) and isinstance(block.bn2, FoldedNorm)
    carried = [m for m in model.layer2[0].conv1.modules() if isinstance(m, nn.BatchNorm2d)]
    assert carried and all(bn.eps == 1e-3 and bn.momentum == 0.05 for bn in carried)
    other = [m for m in model.layer1[0].conv1.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bn.eps == 1e-5 and bn.momentum == 0.1 for bn in other)
    block = model.layer2[0].conv1
    assert (block.in_channels, block.out_channels, block.kernel_size, block.stride, block.padding) == (64, 128, 3, 2, 1)
    assert model.training


def test_block_kwargs_reach_the_blocks():
    model = convert_to_acnet(torchvision.models.resnet18(num_classes=10), "acb", gamma_init=1 / 3)
    assert all(
        torch.allclose(bn.weight, torch.full_like(bn.weight, 1 / 3))
        for m in model.modules() if isinstance(m, ACBlock) for bn in (m.square_bn, m.ver_bn, m.hor_bn)
    )


@pytest.mark.parametrize("block_type", ["acb", "dbb"])
def test_plug_in_round_trip_on_torchvision_resnet18(block_type):
    """convert -> a few SGD steps -> fuse into a FRESH resnet18 -> same eval outputs (float32)."""
    torch.manual_seed(0)
    model = convert_to_acnet(torchvision.models.resnet18(num_classes=10), block_type)
    initial = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for _ in range(2):
        images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    changed = [k for k, v in initial.items() if not torch.equal(v, model.state_dict()[k])]
    assert len(changed) > 0.9 * len(initial)  # every branch's weights, affine parameters and statistics moved
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
    assert expected.isfinite().all() and expected.abs().max() > 0

    base = torchvision.models.resnet18(num_classes=10).train()
    assert acnet_fuse_and_load(base, model.state_dict()) is base
    assert type(base) is torchvision.models.ResNet and not base.training and count(base, ReparamBlock) == 0
    with torch.no_grad():
        assert relative_difference(base(images), expected) <= 1e-5

    if block_type == "acb":  # (DBB's deploy path is covered, faster, by the property test below)
        acnet_switch_to_deploy(model)
        assert count(model, ReparamBlock) == 0 and not model.training
        # the stock structure again: a bias-free conv and a BN holding the fused shift
        assert type(model.layer1[0].conv1) is nn.Conv2d and model.layer1[0].conv1.bias is None
        assert type(model.layer1[0].bn1) is nn.BatchNorm2d and type(model.bn1) is nn.BatchNorm2d
        assert list(model.state_dict()) == list(torchvision.models.resnet18(num_classes=10).state_dict())
        with torch.no_grad():
            assert relative_difference(model(images), expected) <= 1e-5


@pytest.mark.parametrize("file_format", ["ddp-checkpoint", "hdf5"])
def test_fuse_and_load_from_files(file_format, tmp_path):
    trained = _trained_pair_model("dbb")
    state = trained.state_dict()
    if file_format == "hdf5":
        path = tmp_path / "finish.hdf5"
        save_hdf5(state, path)
    else:
        path = tmp_path / "checkpoint.pth"
        torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    base = acnet_fuse_and_load(_base_pair_model(), path)
    images = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        assert (base(images) - trained(images)).abs().max().item() <= 1e-10


# --------------------------------------------------------------------------------------------
# property: keep_weights conversion, training, fuse-and-load and deploy all agree (float64)
# --------------------------------------------------------------------------------------------
@st.composite
def conv_bn_nets(draw):
    """Small Sequential(conv, BN, ReLU, conv, BN) over a random conv geometry space."""
    channels = draw(st.sampled_from([2, 4]))
    layers = []
    in_channels = 3
    for _ in range(2):
        k = draw(st.sampled_from([3, 5]))
        dilation = draw(st.sampled_from([1, 2]))
        centre = dilation * (k // 2)
        padding = draw(st.sampled_from([centre, centre + 1, centre - 1]))
        depthwise = in_channels == channels and draw(st.booleans())
        conv = nn.Conv2d(
            in_channels, channels, k,
            stride=draw(st.sampled_from([1, 2])),
            padding=padding,
            dilation=dilation,
            groups=channels if depthwise else 1,
            bias=draw(st.booleans()),
            padding_mode=draw(st.sampled_from(["zeros", "zeros", "reflect", "circular"])),
        )
        bn = nn.BatchNorm2d(channels, eps=draw(st.sampled_from([1e-5, 1e-3, 0.1, 2.0])), affine=draw(st.booleans()))
        layers += [conv, bn, nn.ReLU()]
        in_channels = channels
    return nn.Sequential(*layers[:-1]).double()


@pytest.mark.parametrize("block_type", ["acb", "dbb"])
@given(net=conv_bn_nets(), seed=st.integers(0, 2**16))
def test_conversion_training_fusion_and_deploy_agree(block_type, net, seed):
    randomize_state_(net, seed).eval()
    images = torch.randn(2, 3, 11, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        reference = net(images)

    converted = convert_to_acnet(copy.deepcopy(net), block_type, keep_weights=True).eval()
    with torch.no_grad():
        assert (converted(images) - reference).abs().max().item() <= 1e-10  # starts as the same function
    if block_type == "acb":
        assert count(converted, ACBlock) == 2  # ACB represents every odd-K geometry drawn here

    randomize_state_(converted, seed + 1)  # "training"
    with torch.no_grad():
        trained = converted(images)
    base = acnet_fuse_and_load(copy.deepcopy(net), converted.state_dict())
    with torch.no_grad():
        assert (base(images) - trained).abs().max().item() <= 1e-10
    acnet_switch_to_deploy(converted)
    assert count(converted, ReparamBlock) == 0
    with torch.no_grad():
        assert (converted(images) - trained).abs().max().item() <= 1e-10


# --------------------------------------------------------------------------------------------
# which pairs are found
# --------------------------------------------------------------------------------------------
class ConvFeedsTwoConsumers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class RegisteredButNotWired(nn.Module):
    """conv registered right before bn, but bn normalises the INPUT: no conv-BN pair."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.conv(self.bn(x))


class Untraceable(nn.Module):
    """Data-dependent control flow defeats torch.fx: pairs come from registration order."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.body(x)
        if y.sum() > 0:
            y = y * 2
        return self.bn2(self.conv2(y))


def test_conv_with_a_second_consumer_takes_the_bn_free_form_and_the_bn_stays():
    kept = convert_to_acnet(ConvFeedsTwoConsumers(), "acb", bn_free=False)
    assert type(kept.conv) is nn.Conv2d and isinstance(kept.bn, nn.BatchNorm2d)
    stock = randomize_state_(ConvFeedsTwoConsumers().double(), 0)
    model = convert_to_acnet(copy.deepcopy(stock), "acb")
    assert isinstance(model.conv, ACBlock) and model.conv.norm == "none" and type(model.bn) is nn.BatchNorm2d
    randomize_state_(model, 1).eval()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        trained = model(x)
        assert (acnet_fuse_and_load(stock, model.state_dict())(x) - trained).abs().max().item() <= 1e-10


def test_registration_order_alone_does_not_make_a_pair_when_the_model_traces():
    assert find_conv_bn_pairs(RegisteredButNotWired()) == []


def test_untraceable_model_falls_back_to_registration_order():
    model = randomize_state_(Untraceable().double(), 0).eval()
    assert find_conv_bn_pairs(model) == [ConvBNPair("body.0", "body.1"), ConvBNPair("conv2", "bn2")]
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        reference = model(images)
    converted = convert_to_acnet(copy.deepcopy(model), "dbb", keep_weights=True).eval()
    assert isinstance(converted.body[0], DiverseBranchBlock) and isinstance(converted.conv2, DiverseBranchBlock)
    with torch.no_grad():
        assert (converted(images) - reference).abs().max().item() <= 1e-10
    randomize_state_(converted, 1)
    with torch.no_grad():
        trained = converted(images)
        base = acnet_fuse_and_load(copy.deepcopy(model), converted.state_dict())
        assert (base(images) - trained).abs().max().item() <= 1e-10


def _mixed_convs() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, (1, 3), padding=(0, 1)), nn.BatchNorm2d(4),  # one axis > 1: ACB has no form
        nn.Conv2d(4, 4, 3, padding=(1, 2)), nn.BatchNorm2d(4),  # padding differing per axis: ACB represents it
        nn.Conv2d(4, 4, 7, padding=3), nn.BatchNorm2d(4),  # 7x7: converts by default
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4),  # 1x1: ACB has no form
        nn.Conv2d(4, 4, 4, padding=2), nn.BatchNorm2d(4),  # even kernel: ACB represents it (1-D branches on row 1)
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False),  # BN-free form, BN stays
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),  # no BN at all: BN-free form
        nn.Conv2d(4, 4, 3, padding="same"), nn.BatchNorm2d(4),  # BN form
    ).eval()


def test_ineligible_convs_are_left_alone():
    model = _mixed_convs()
    before = [type(m) for m in model]
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        expected = model(x)
    convert_to_acnet(model, "acb", keep_weights=True)
    after = [type(m) for m in model]
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a is not b]
    assert changed == [2, 3, 4, 5, 8, 9, 10, 12, 14, 15]
    assert isinstance(model[14], ACBlock) and model[14].padding == 1 and model[2].padding == (1, 2)
    assert model[8].kernel_size == 4
    assert model[10].norm == "none" and type(model[11]) is nn.BatchNorm2d and model[12].norm == "none"
    with torch.no_grad():
        assert relative_difference(model.eval()(x), expected) <= 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = convert_to_acnet(_mixed_convs(), "dbb")
        kept = convert_to_acnet(_mixed_convs(), "dbb", kernel_sizes=range(2, 7), bn_free=False)  # the overrides
    blocks = {i for i, m in enumerate(default) if isinstance(m, ReparamBlock)}
    # DBB converts the 7x7, the 1x1, the conv before a BN without statistics and the one before a ReLU by
    # default; the overrides keep exactly those
    assert {4, 6, 10, 12} <= blocks and blocks - {i for i, m in enumerate(kept) if isinstance(m, ReparamBlock)} == {
        4, 6, 10, 12}


@pytest.mark.parametrize("block_type", ["acb", "dbb"])
def test_every_conv_of_the_mixed_model_folds_back_into_it(block_type):
    """BN-free forms before a BN without statistics (it stays) and before a ReLU fold back exactly too."""
    stock = _mixed_convs().double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = randomize_state_(convert_to_acnet(copy.deepcopy(stock), block_type), 1).eval()
    assert trained[10].norm == "none" and type(trained[11]) is nn.BatchNorm2d
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        expected = trained(x)
        assert (acnet_fuse_and_load(copy.deepcopy(stock), trained.state_dict())(x) - expected).abs().max() <= 1e-10
        assert (acnet_switch_to_deploy(copy.deepcopy(trained))(x) - expected).abs().max() <= 1e-10


def test_kernel_sizes_is_configurable():
    model = convert_to_acnet(torchvision.models.resnet18(num_classes=10), "acb", kernel_sizes=[7])
    assert isinstance(model.conv1, ACBlock) and model.conv1.kernel_size == 7
    assert count(model, ACBlock) == 1


def test_dbb_converts_padding_0_exactly():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=0), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1),
                          nn.BatchNorm2d(4)).eval()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        expected = model(x)
    convert_to_acnet(model, "dbb", keep_weights=True)
    assert isinstance(model[0], DiverseBranchBlock) and model[0].padding == 0
    assert isinstance(model[2], DiverseBranchBlock)
    with torch.no_grad():
        assert relative_difference(model.eval()(x), expected) <= 1e-5


def test_conversion_keeps_dtype_and_frozen_state():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).double()
    model[0].weight.requires_grad_(False)
    convert_to_acnet(model, "acb")
    assert all(p.dtype == torch.float64 and not p.requires_grad for p in model[0].parameters())


def test_converting_twice_changes_nothing():
    model = convert_to_acnet(torchvision.models.resnet18(num_classes=10), "acb")
    keys = list(model.state_dict())
    convert_to_acnet(model, "acb")
    assert list(model.state_dict()) == keys
    convert_to_acnet(model, "dbb")  # DBB takes only what ACB could not: the 1x1 downsample convs
    assert count(model, DiverseBranchBlock) == 3 and count(model, ACBlock) == 17


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(block_type="vgg"), "unknown block_type 'vgg'; valid block types: 'acb', 'dbb', 'orepa', 'repvgg', 'mobileone'"),
        (dict(block_type="acb", padding=2), "padding cannot be given"),
        (dict(block_type="dbb", nonlinear=nn.ReLU()), "'nonlinear' is not supported"),
        (dict(block_type="acb", kernel_sizes=[]), "kernel_sizes is empty"),
        (dict(block_type="acb", kernel_sizes="three"), "kernel_sizes must be an iterable of ints"),
        (dict(block_type="acb", keep_weights=True, use_affine=False), "keep_weights=True needs affine BNs"),
        (dict(block_type="acb", gama_init=0.3), "ACBlock has no option 'gama_init'; its options: "),
        (dict(block_type="acb", use_affine=False, gamma_init=0.3), "invalid options for ACBlock: ACBlock: reduce_gamma"),
        (dict(block_type="dbb", internal_channels_1x1_3x3=0), "invalid options for DiverseBranchBlock: "),
    ],
)
def test_bad_arguments_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        convert_to_acnet(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)), **kwargs)


# --------------------------------------------------------------------------------------------
# acnet_switch_to_deploy
# --------------------------------------------------------------------------------------------
def test_switch_to_deploy_keeps_sharing_nonlinear_and_root_blocks():
    torch.manual_seed(0)
    shared = ACBlock(4, 4, 3, padding=1)
    model = nn.Sequential(shared, nn.ReLU(), shared, DiverseBranchBlock(4, 4, 3, padding=1, nonlinear=nn.PReLU(4)))
    randomize_state_(model, 0).train()
    images = torch.randn(2, 4, 6, 6)
    model.eval()
    with torch.no_grad():
        expected = model(images)
    model.train()
    acnet_switch_to_deploy(model)
    assert not model.training
    assert model[0] is model[2] and type(model[0]) is nn.Conv2d
    assert isinstance(model[3], nn.Sequential) and type(model[3][0]) is nn.Conv2d and isinstance(model[3][1], nn.PReLU)
    with torch.no_grad():
        assert relative_difference(model(images), expected) <= 1e-5

    block = randomize_state_(ACBlock(4, 4, 3, padding=1), 1).eval()
    with torch.no_grad():
        expected = block(images)
    assert acnet_switch_to_deploy(block) is block and block.deployed
    with torch.no_grad():
        assert relative_difference(block(images), expected) <= 1e-5


# --------------------------------------------------------------------------------------------
# acnet_fuse_and_load: other targets and the documented errors
# --------------------------------------------------------------------------------------------
def _trained_pair_model(block_type: str = "acb") -> nn.Module:
    base = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    return randomize_state_(convert_to_acnet(base.double(), block_type), 3).eval()


def _base_pair_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).double()


def test_fuse_into_a_deploy_style_conv_with_bias():
    trained = _trained_pair_model("dbb")
    target = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Identity(), nn.ReLU(), nn.Conv2d(4, 2, 1)).double()
    acnet_fuse_and_load(target, trained.state_dict())
    images = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        assert (target(images) - trained(images)).abs().max().item() <= 1e-10


def test_block_followed_by_a_kept_bn_folds_the_bias_into_its_mean():
    trained = randomize_state_(nn.Sequential(ACBlock(3, 4, 3, padding=1), nn.BatchNorm2d(4)).double(), 5).eval()
    target = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)).double()
    acnet_fuse_and_load(target, trained.state_dict())
    images = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        assert (target(images) - trained(images)).abs().max().item() <= 1e-10


def test_deployed_blocks_and_old_files_without_bn_counters_load():
    trained = _trained_pair_model("acb")
    images = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        expected = trained(images)
    trained[0].switch_to_deploy()  # a lone block's own deploy form: fused_conv
    state = {k: v for k, v in trained.state_dict().items() if not k.endswith("num_batches_tracked")}
    target = acnet_fuse_and_load(_base_pair_model(), state)
    with torch.no_grad():
        assert (target(images) - expected).abs().max().item() <= 1e-10


def test_non_affine_baseline_bn_carries_the_bias():
    trained = randomize_state_(nn.Sequential(ACBlock(3, 4, 3, padding=1), nn.Identity()).double(), 2).eval()
    target = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, affine=False)).double()
    acnet_fuse_and_load(target, trained.state_dict())
    images = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        assert (target(images) - trained(images)).abs().max().item() <= 1e-10


def test_kernel_stored_in_a_wrapper_of_one_conv_loads_as_it_is():
    wrapper = nn.Module()
    wrapper.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    trained = nn.Sequential(nn.BatchNorm2d(3), wrapper)
    target = acnet_fuse_and_load(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)), trained.state_dict())
    assert torch.equal(target[1].weight, wrapper.conv.weight) and torch.equal(target[1].bias, torch.zeros(4))


@pytest.mark.parametrize("block_type", ["acb", "dbb"])
def test_constructor_training_weights_fuse_into_its_deploy_model(block_type):
    import constructor  # the framework's architectures (repository root on pythonpath)

    trained = randomize_state_(constructor.build_model("cfqkbnc", block_type), 7).eval()
    deploy = acnet_fuse_and_load(constructor.build_model("cfqkbnc", "base", deploy=True), trained.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_difference(deploy(images), trained(images)) <= 1e-5


class VersionCheckingNet(nn.Sequential):
    """Like torchvision's MNASNet: refuses a state dict without its module version metadata."""

    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version") != 2:
            raise ValueError("version should be set to 2")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


def test_module_version_metadata_reaches_the_baseline():
    trained = randomize_state_(convert_to_acnet(VersionCheckingNet(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)), "acb"), 0)
    target = acnet_fuse_and_load(VersionCheckingNet(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)), trained.state_dict())
    images = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert relative_difference(target(images), trained.eval()(images)) <= 1e-5


def test_conv_that_cannot_carry_the_bias_is_an_error():
    trained = randomize_state_(nn.Sequential(ACBlock(3, 4, 3, padding=1)), 0)  # a trained block: a bias
    with pytest.raises(WeightsError, match="'0' holds a block but the baseline conv has no bias and feeds no norm"):
        acnet_fuse_and_load(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False)), trained.state_dict())


def test_missing_and_unexpected_keys_are_listed_in_one_error():
    state = _trained_pair_model().state_dict()
    del state["3.weight"]
    state["head.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match=r"1 missing keys: '3\.weight' \| 1 unexpected keys: 'head\.weight'"):
        acnet_fuse_and_load(_base_pair_model(), state)


def test_many_missing_keys_show_the_first_few_and_the_count():
    other = {f"features.{i}.weight": torch.zeros(1) for i in range(12)}
    with pytest.raises(WeightsError, match=r"7 missing keys: .* and 2 more \| 12 unexpected keys: "
                       r"'features\.0\.weight', .* and 7 more\. Hint: no entry matched.*another architecture"):
        acnet_fuse_and_load(_base_pair_model(), other)


def test_block_that_does_not_fit_the_baseline_conv_is_named():
    state = _trained_pair_model().state_dict()
    wider = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1))
    with pytest.raises(WeightsError, match=r"the acb weights under '0' do not fit its conv \(in=3, out=8"):
        acnet_fuse_and_load(wider.double(), state)


def test_shape_mismatch_of_plain_entries_is_listed():
    state = _trained_pair_model().state_dict()
    state["3.weight"] = torch.zeros(5, 4, 1, 1, dtype=torch.float64)
    with pytest.raises(WeightsError, match=r"shape mismatches: 3\.weight: weights \(5, 4, 1, 1\) vs model \(2, 4, 1, 1\)"):
        acnet_fuse_and_load(_base_pair_model(), state)


def test_requested_block_type_must_match_the_weights():
    with pytest.raises(WeightsError, match="'0' holds a acb block, not the requested dbb"):
        acnet_fuse_and_load(_base_pair_model(), _trained_pair_model("acb").state_dict(), block_type="dbb")
    with pytest.raises(ValueError, match="unknown block_type 'xyz'"):
        acnet_fuse_and_load(_base_pair_model(), {}, block_type="xyz")


def test_bad_weight_files_give_weights_errors(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        acnet_fuse_and_load(_base_pair_model(), tmp_path / "nope.pth")
    (tmp_path / "broken.hdf5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    with pytest.raises(WeightsError, match="broken.hdf5"):
        acnet_fuse_and_load(_base_pair_model(), tmp_path / "broken.hdf5")


def test_failed_load_leaves_the_baseline_untouched():
    base = _base_pair_model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    state = _trained_pair_model().state_dict()
    del state["3.bias"]
    with pytest.raises(WeightsError):
        acnet_fuse_and_load(base, state)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
