"""Whole-model conversion of every conv a user has: Conv1d/2d/3d after BatchNorm, SyncBatchNorm, frozen
BatchNorm (torchvision's FrozenBatchNorm2d, acnet's N-D one), or no norm (``bn_free=True``).

For each (dimension, norm kind, block type): keep_weights gives the pretrained outputs at step 0, two
SGD steps move the model, and both acnet_fuse_and_load into a fresh instance of the unmodified model
and acnet_switch_to_deploy give the trained model's outputs.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from acnet import (
    ACBlock,
    DiverseBranchBlock,
    FrozenBatchNorm,
    ReparamBlock,
    acnet_fuse_and_load,
    acnet_switch_to_deploy,
    convert_to_acnet,
    find_conv_bn_pairs,
)
from acnet.convert import ConvBNPair
from acnet.pairs import norm_kind
from helpers import randomize_norm_state_, relative_difference

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BATCH_NORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def small_net(dim: int, kind: str) -> nn.Module:
    """conv-norm-ReLU twice, then a strided conv-norm: 3 convs of the form asked."""
    conv = CONVS[dim]
    norm = {"batch": BATCH_NORMS[dim], "sync": nn.SyncBatchNorm, "none": None,
            "frozen": FrozenBatchNorm2d if dim == 2 else FrozenBatchNorm}[kind]
    layers = []
    for cin, cout, stride in ((3, 8, 1), (8, 8, 1), (8, 8, 2)):
        layers.append(conv(cin, cout, 3, stride=stride, padding=1, bias=kind == "none"))
        if norm is not None:
            layers.append(norm(cout))
        layers.append(nn.ReLU())
    torch.manual_seed(dim)
    return randomize_norm_state_(nn.Sequential(*layers[:-1]), dim)


CASES = [(dim, kind, block) for dim in (1, 2, 3) for kind in ("batch", "frozen", "none")
         for block in ("acb", "dbb", "orepa") if not (dim == 1 and block == "acb")]


@pytest.mark.parametrize("dim,kind,block_type", CASES)
def test_keep_weights_then_training_folds_into_the_unmodified_model(dim, kind, block_type):
    model = small_net(dim, kind).eval()
    x = torch.randn(2, 3, *([7] * dim), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pretrained = model(x)
    converted = convert_to_acnet(copy.deepcopy(model), block_type, keep_weights=True, bn_free=kind == "none")
    blocks = [m for m in converted.modules() if isinstance(m, ReparamBlock)]
    assert len(blocks) == 3 and all(b.dim == dim and b.norm == ("batch" if kind == "batch" else kind) for b in blocks)
    with torch.no_grad():
        assert relative_difference(converted.eval()(x), pretrained) <= 1e-5  # step 0: the pretrained function

    optimizer = torch.optim.SGD(converted.parameters(), lr=0.05)
    converted.train()
    batch = 4 if kind == "batch" else 1  # frozen and BN-free blocks use no batch statistics: batch 1 trains
    for step in range(2):
        images = torch.randn(batch, 3, *([7] * dim), generator=torch.Generator().manual_seed(step + 1))
        loss = converted(images).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    converted.eval()
    with torch.no_grad():
        trained = converted(x)
        assert relative_difference(trained, pretrained) > 1e-3  # training changed the function
        fresh = acnet_fuse_and_load(copy.deepcopy(model), converted.state_dict())
        assert type(fresh) is nn.Sequential and not any(isinstance(m, ReparamBlock) for m in fresh.modules())
        assert relative_difference(fresh(x), trained) <= 1e-4
        assert relative_difference(acnet_switch_to_deploy(copy.deepcopy(converted))(x), trained) <= 1e-4


@pytest.mark.parametrize("dim,kind", [(1, "batch"), (2, "frozen"), (3, "none")])
def test_keep_weights_is_exact_in_float64(dim, kind):
    model = small_net(dim, kind).double().eval()
    x = torch.randn(2, 3, *([6] * dim), dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        converted = convert_to_acnet(copy.deepcopy(model), "dbb", keep_weights=True, bn_free=kind == "none").eval()
        assert (converted(x) - expected).abs().max().item() <= 1e-10
        fresh = acnet_fuse_and_load(copy.deepcopy(model), converted.state_dict())
        assert (fresh(x) - expected).abs().max().item() <= 1e-10


def test_sync_batchnorm_pairs_convert_and_keep_the_function():
    model = small_net(2, "sync").eval()
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        expected = model(x)
    converted = convert_to_acnet(copy.deepcopy(model), "acb", keep_weights=True).eval()
    assert sum(isinstance(m, ACBlock) for m in converted.modules()) == 3
    with torch.no_grad():
        assert relative_difference(converted(x), expected) <= 1e-5


# --------------------------------------------------------------------------------------------
# pair finding
# --------------------------------------------------------------------------------------------
def test_frozen_bn_resnet_converts_every_3x3_conv_and_folds_back():
    def frozen_resnet():
        torch.manual_seed(0)
        return randomize_norm_state_(torchvision.models.resnet18(num_classes=10, norm_layer=FrozenBatchNorm2d), 3).eval()

    model = frozen_resnet()
    assert norm_kind(model.bn1) == "frozen"
    pairs = find_conv_bn_pairs(model)
    assert len(pairs) == 20 and ConvBNPair("layer1.0.conv1", "layer1.0.bn1") in pairs  # every conv has its norm
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    convert_to_acnet(model, "dbb", keep_weights=True)
    assert sum(isinstance(m, DiverseBranchBlock) for m in model.modules()) == 20  # 7x7 stem and 1x1s included
    with torch.no_grad():
        assert relative_difference(model.eval()(x), expected) <= 1e-5
    model.train()
    model(x).sum().backward()  # batch of one: no batch statistics anywhere
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(1e-3 * p.grad)
        trained = model.eval()(x)
        assert relative_difference(acnet_fuse_and_load(frozen_resnet(), model.state_dict())(x), trained) <= 1e-4


class FeedsAnInputNorm(nn.Module):
    """``conv`` feeds an add, not a norm; ``bn`` normalises the input: a BN-free conv, no pair."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(self.bn(x))
        z = self.shared(y)
        return self.bn2(z) + z  # shared feeds a norm and something else: no pair, BN-free (bn2 stays)


def test_bn_free_pairs_by_dataflow():
    model = FeedsAnInputNorm()
    assert find_conv_bn_pairs(model) == []
    assert find_conv_bn_pairs(model, bn_free=True) == [ConvBNPair("conv", None), ConvBNPair("shared", None)]
    with pytest.warns(UserWarning, match="no conv of FeedsAnInputNorm was replaced"):
        convert_to_acnet(copy.deepcopy(model), "acb", bn_free=False)
    converted = convert_to_acnet(model, "acb")
    assert isinstance(converted.conv, ACBlock) and converted.conv.norm == "none"
    assert isinstance(converted.shared, ACBlock) and converted.shared.norm == "none"
    assert type(converted.bn) is type(converted.bn2) is nn.BatchNorm2d


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 4, 3, padding=1),
                                  nn.BatchNorm1d(4))

    def forward(self, x):
        y = self.body(x)
        return y * 2 if y.sum() > 0 else y


def test_bn_free_pairs_by_registration_order_when_tracing_fails():
    pairs = find_conv_bn_pairs(Untraceable(), bn_free=True)
    assert pairs == [ConvBNPair("body.0", None), ConvBNPair("body.2", "body.3")]
    assert find_conv_bn_pairs(Untraceable()) == [ConvBNPair("body.2", "body.3")]


def test_bn_free_false_converts_only_the_pairs_as_before():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_to_acnet(model, "acb", bn_free=False)
    assert type(model[0]) is nn.Conv2d and isinstance(model[2], ACBlock) and model[2].norm == "batch"


def test_non_cubic_video_kernels_convert_where_the_block_allows():
    """r2plus1d's (1,3,3) spatial and (3,1,1) temporal convs: DBB takes both, ACB the (1,3,3) only."""
    model = nn.Sequential(nn.Conv3d(3, 6, (1, 3, 3), padding=(0, 1, 1), bias=False), nn.BatchNorm3d(6), nn.ReLU(),
                          nn.Conv3d(6, 6, (3, 1, 1), padding=(1, 0, 0), bias=False), nn.BatchNorm3d(6))
    randomize_norm_state_(model, 5).eval()
    x = torch.randn(1, 3, 4, 6, 6)
    with torch.no_grad():
        expected = model(x)
    for block_type, converted_convs in (("dbb", [0, 3]), ("acb", [0])):
        converted = convert_to_acnet(copy.deepcopy(model), block_type, keep_weights=True).eval()
        assert [i for i, m in enumerate(converted) if isinstance(m, ReparamBlock)] == converted_convs
        with torch.no_grad():
            assert relative_difference(converted(x), expected) <= 1e-5


def test_acb_refuses_1d_convs_with_its_reason():
    model = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.BatchNorm1d(4))
    with pytest.warns(UserWarning, match="ACB on a 1-D conv"):
        convert_to_acnet(model, "acb")
    assert type(model[0]) is nn.Conv1d


class Conv3DSimple(nn.Conv3d):
    """As torchvision's video models define it: a Conv3d subclass that only fixes the constructor."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, (3, 3, 3), padding=1, bias=False)


class ScaledConv(nn.Conv2d):
    def forward(self, x):
        return 2 * super().forward(x)


def test_conv_subclasses_convert_only_when_they_compute_what_the_conv_computes():
    video = nn.Sequential(Conv3DSimple(3, 4), nn.BatchNorm3d(4))
    assert find_conv_bn_pairs(video) == [ConvBNPair("0", "1")]
    scaled = nn.Sequential(ScaledConv(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    with pytest.warns(UserWarning, match="ScaledConv is not a plain nn.Conv1d/2d/3d"):
        convert_to_acnet(scaled, "dbb")
    assert type(scaled[0]) is ScaledConv
    randomize_norm_state_(video, 1).eval()
    x = torch.randn(1, 3, 4, 5, 5)
    with torch.no_grad():
        expected = video(x)
        converted = convert_to_acnet(copy.deepcopy(video), "acb", keep_weights=True).eval()
        assert isinstance(converted[0], ACBlock) and relative_difference(converted(x), expected) <= 1e-5


def test_fuse_and_load_takes_naming_schemes_explicitly():
    """A state dict in a foreign naming scheme is translated with naming_schemes=; without it, it is not."""
    from acnet.schemes import NamingScheme, Rule

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
    trained = convert_to_acnet(copy.deepcopy(model), "acb")
    ours = {k: tuple(v.shape) for k, v in trained.state_dict().items()}
    renamed = NamingScheme("renamed", "a test's names", tuple(Rule("copy", (f"stage.{k}",), (k,)) for k in ours),
                           {f"stage.{k}": shape for k, shape in ours.items()}, ours)
    foreign = {f"stage.{k}": v for k, v in trained.state_dict().items()}
    with pytest.raises(Exception, match="unexpected keys"):
        acnet_fuse_and_load(copy.deepcopy(model), foreign)
    fresh = acnet_fuse_and_load(copy.deepcopy(model), foreign, naming_schemes=[renamed])
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert relative_difference(fresh(x), trained.eval()(x)) <= 1e-5
