"""The plug-in with no options (issue 27): every conv gets the form of what it feeds, the trained model
folds back into the stock class, the deployed model has the stock module tree and the host library's own
fuse works on it (timm ``reparameterize_model``; ultralytics ``fuse()``, the real one when installed and
a faithful reproduction of its contract always), transposed convs are found and reported, and a
torchvision Keypoint R-CNN trains with every block type.

Cases that need the block side of issue 27 (``bias=False`` BN-free blocks, ``transposed=True`` forms,
outputs in the input's memory format) are marked in their docstrings.
"""
from __future__ import annotations

import copy
import warnings
from functools import partial

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from acnet import (
    FoldedNorm,
    ReparamBlock,
    acnet_fuse_and_load,
    acnet_switch_to_deploy,
    conversion_report,
    convert_to_acnet,
)
from helpers import randomize_norm_state_, relative_difference

BLOCK_TYPES = ("acb", "dbb", "orepa")
#: The newer families, run through the cheap whole-model checks (their zoo rows: tests/test_zoo.py).
FAMILY_TYPES = ("repvgg", "mobileone")

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def quietly_convert(model: nn.Module, block_type: str, **options) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_to_acnet(model, block_type, **options)


def train_steps(model: nn.Module, inputs, steps: int = 2, lr: float = 0.05) -> None:
    """A few SGD steps on a random projection of the output (gradient norm clipped, as in zoo_check)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        out = model(inputs)
        target = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(step))
        loss = (out * target).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()


def module_types(model: nn.Module):
    return [(name, type(m)) for name, m in model.named_modules()]


class Mixed(nn.Module):
    """One conv feeding each kind of consumer: a BN, a frozen BN, a GroupNorm, an InstanceNorm, a ReLU,
    an add, and nothing (every conv with a bias except the norm pairs')."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_bn, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv_frozen, self.frozen = nn.Conv2d(8, 8, 3, padding=1, bias=False), FrozenBatchNorm2d(8)
        self.conv_gn, self.gn = nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.conv_in, self.inorm = nn.Conv2d(8, 8, 5, padding=2), nn.InstanceNorm2d(8, affine=True)
        self.conv_act = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_add = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_out = nn.Conv2d(8, 4, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv_bn(x)))
        y = torch.relu(self.frozen(self.conv_frozen(y)))
        y = self.gn(self.conv_gn(y))
        y = self.inorm(self.conv_in(y))
        y = torch.relu(self.conv_act(y))
        y = y + self.conv_add(y)
        return self.conv_out(y)


def mixed_model() -> Mixed:
    torch.manual_seed(0)
    return randomize_norm_state_(Mixed(), 2).double().eval()


EXPECTED_FORMS = {"conv_bn": "batch", "conv_frozen": "frozen", "conv_gn": "none", "conv_in": "none",
                  "conv_act": "none", "conv_add": "none", "conv_out": "none"}


@pytest.mark.parametrize("block_type", BLOCK_TYPES + FAMILY_TYPES)
def test_each_conv_gets_the_form_of_what_it_feeds_and_folds_back_into_the_stock_class(block_type):
    stock = mixed_model()
    rows = {r.name: r for r in conversion_report(stock, block_type).rows}
    assert {name: r.form for name, r in rows.items()} == EXPECTED_FORMS
    assert rows["conv_gn"].form_name == "BN-free" and rows["conv_bn"].form_name == "BN"
    model = convert_to_acnet(copy.deepcopy(stock), block_type)
    assert {name: m.norm for name, m in model.named_children() if isinstance(m, ReparamBlock)} == EXPECTED_FORMS
    assert isinstance(model.bn, FoldedNorm) and isinstance(model.frozen, FoldedNorm)
    assert type(model.gn) is nn.GroupNorm and type(model.inorm) is nn.InstanceNorm2d  # they cannot absorb a conv
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    train_steps(model, x)
    with torch.no_grad():
        trained = model(x)
        assert relative_difference(trained, stock(x)) > 1e-3  # training changed the function
        fused = acnet_fuse_and_load(mixed_model(), model.state_dict())
        assert relative_difference(fused(x), trained) <= 1e-12
        deployed = acnet_switch_to_deploy(copy.deepcopy(model))
        assert module_types(deployed) == module_types(stock)  # the stock structure, BN and frozen BN included
        assert list(deployed.state_dict()) == list(stock.state_dict())
        assert deployed.conv_bn.bias is None and deployed.conv_gn.bias is not None
        assert relative_difference(deployed(x), trained) <= 1e-12


def test_bn_free_false_and_kernel_sizes_are_overrides():
    stock = mixed_model()
    only_pairs = quietly_convert(copy.deepcopy(stock), "dbb", bn_free=False)
    assert [n for n, m in only_pairs.named_children() if isinstance(m, ReparamBlock)] == ["conv_bn", "conv_frozen"]
    papers = quietly_convert(copy.deepcopy(stock), "dbb", kernel_sizes=range(2, 7))
    assert "conv_out" not in {n for n, m in papers.named_children() if isinstance(m, ReparamBlock)}  # 7x7 kept


def test_a_conv_before_an_unverified_bn_subclass_takes_the_bn_free_form_and_the_bn_stays():
    class ScaledBN(nn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    stock = randomize_norm_state_(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ScaledBN(8)), 1).double().eval()
    model = convert_to_acnet(copy.deepcopy(stock), "dbb")
    assert isinstance(model[0], ReparamBlock) and model[0].norm == "none" and type(model[1]) is ScaledBN
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    train_steps(model, x)
    with torch.no_grad():
        assert relative_difference(acnet_fuse_and_load(copy.deepcopy(stock), model.state_dict())(x), model(x)) <= 1e-12


# --------------------------------------------------------------------------------------------
# every conv that any option would convert
# --------------------------------------------------------------------------------------------
def _converted(model: nn.Module, block_type: str, **options) -> set:
    return {r.name for r in conversion_report(model, block_type, **options).rows if r.converted}


@pytest.mark.parametrize("builder", [
    lambda: torchvision.models.resnet18(num_classes=10),
    lambda: torchvision.models.mobilenet_v2(num_classes=10),
    lambda: torchvision.models.detection.retinanet.RetinaNetHead(16, 3, 2, norm_layer=partial(nn.GroupNorm, 4)),
    lambda: torchvision.models.detection.mask_rcnn.MaskRCNNPredictor(16, 8, 3),
], ids=["resnet18", "mobilenet_v2", "retinanet_v2_head", "maskrcnn_predictor"])
@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_no_option_converts_every_conv_that_any_option_converts(builder, block_type):
    model = builder()
    default = _converted(model, block_type)
    options = [dict(bn_free=False), dict(bn_free=True), dict(kernel_sizes=range(1, 12)), dict(kernel_sizes=range(2, 7))]
    union = set().union(*(_converted(model, block_type, **o) for o in options))
    assert union <= default, f"converted only with an option: {sorted(union - default)}"
    for row in conversion_report(model, block_type).rows:
        assert row.converted or row.reason  # a kept conv always says why


def test_retinanet_v2_head_with_groupnorm_folds_back_bias_free():
    """Needs the block side (BN-free blocks with ``bias=False``): the head's bias-free convs before
    GroupNorm convert and fold back into the stock head, bias-free."""
    from torchvision.models.detection.retinanet import RetinaNetHead

    def head() -> nn.Module:
        torch.manual_seed(3)
        return RetinaNetHead(16, 3, 2, norm_layer=partial(nn.GroupNorm, 4)).double().eval()

    stock = head()
    bias_free = [n for n, m in stock.named_modules() if isinstance(m, nn.Conv2d) and m.bias is None]
    assert len(bias_free) == 8  # 4 + 4 head convs before GroupNorm
    model = convert_to_acnet(copy.deepcopy(stock), "acb")
    convs = [n for n, m in stock.named_modules() if isinstance(m, nn.Conv2d)]
    assert all(isinstance(model.get_submodule(n), ReparamBlock) for n in convs)
    features = [torch.randn(1, 16, 8, 8, dtype=torch.float64), torch.randn(1, 16, 4, 4, dtype=torch.float64)]

    def output(m: nn.Module) -> torch.Tensor:
        return torch.cat([t.flatten() for t in m(features).values()])

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(2):
        loss = output(model).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        trained = output(model)
        assert relative_difference(output(acnet_fuse_and_load(head(), model.state_dict())), trained) <= 1e-12
        deployed = acnet_switch_to_deploy(copy.deepcopy(model))
        assert module_types(deployed) == module_types(stock)
        assert all(deployed.get_submodule(n).bias is None for n in bias_free)
        assert relative_difference(output(deployed), trained) <= 1e-12


# --------------------------------------------------------------------------------------------
# transposed convs
# --------------------------------------------------------------------------------------------
class UpPath(nn.Module):
    """A U-Net up-path and a Mask R-CNN-style predictor: ConvTranspose2d(3x3, stride 2, output_padding 1)
    + BN, ConvTranspose2d(2x2, stride 2) + ReLU, ConvTranspose3d(3x3x3) feeding nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.mask = nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.up3d = nn.ConvTranspose3d(4, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.mask(torch.relu(self.bn(self.up(x)))))
        return self.up3d(y.unsqueeze(2)).squeeze(2)


def test_transposed_convs_are_listed_with_their_form_or_reason():
    model = UpPath()
    for block_type in BLOCK_TYPES + FAMILY_TYPES:
        rows = {r.name: r for r in conversion_report(model, block_type).rows}
        assert set(rows) == {"up", "mask", "up3d"} and all(r.transposed for r in rows.values())
        assert rows["up"].conv_type == "ConvTranspose2d" and rows["up3d"].conv_type == "ConvTranspose3d"
        for row in rows.values():
            assert (row.converted and row.form_name.endswith(" transposed")) or row.reason


@pytest.mark.parametrize("block_type", BLOCK_TYPES + FAMILY_TYPES)
def test_transposed_convs_train_and_fold_back_into_the_stock_class(block_type):
    """Needs the block side (``transposed=True`` forms): ACB and DBB take the odd-kernel transposed convs
    (their branches are linear and fold exactly); every conv that converts folds back exactly."""
    def stock_model() -> UpPath:
        torch.manual_seed(1)
        return randomize_norm_state_(UpPath(), 2).double().eval()

    stock = stock_model()
    model = convert_to_acnet(copy.deepcopy(stock), block_type)
    converted = {n for n, m in model.named_children() if isinstance(m, ReparamBlock)}
    if block_type in ("acb", "dbb"):
        assert {"up", "up3d"} <= converted
    assert converted, "no transposed conv converted"
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    train_steps(model, x)
    with torch.no_grad():
        trained = model(x)
        assert relative_difference(acnet_fuse_and_load(stock_model(), model.state_dict())(x), trained) <= 1e-12
        deployed = acnet_switch_to_deploy(copy.deepcopy(model))
        assert module_types(deployed) == module_types(stock)
        assert relative_difference(deployed(x), trained) <= 1e-12


# --------------------------------------------------------------------------------------------
# the host's own fuse on the deployed model
# --------------------------------------------------------------------------------------------
timm = pytest.importorskip("timm")


@pytest.mark.parametrize("name,block_type", [("repvgg_a0", "acb"), ("mobileone_s0", "dbb"), ("fastvit_t8", "orepa")])
def test_timm_reparameterize_model_works_on_the_deployed_model(name, block_type):
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    model = quietly_convert(timm.create_model(name, pretrained=False, num_classes=4), block_type)
    assert sum(isinstance(m, ReparamBlock) for m in model.modules()) > 10
    x = torch.randn(2, 3, 32, 32)
    train_steps(model, x, steps=1, lr=0.1)
    with torch.no_grad():
        trained = model(x)
        deployed = acnet_switch_to_deploy(copy.deepcopy(model))
        stock_types = module_types(timm.create_model(name, pretrained=False, num_classes=4))
        assert module_types(deployed) == stock_types  # BatchNormAct2d back where timm's fuse reads running_mean
        fused = reparameterize_model(deployed)
        assert any(hasattr(m, "reparam_conv") and m.reparam_conv is not None for m in fused.modules())
        assert relative_difference(fused(x), trained) <= 1e-5


def test_timm_reparameterize_model_deploys_our_blocks_on_the_training_form():
    """timm calls ``switch_to_deploy()`` on each child that has it: our blocks fold in place."""
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    model = quietly_convert(timm.create_model("convnext_atto", pretrained=False, num_classes=4), "dbb").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        fused = reparameterize_model(model)
        blocks = [m for m in fused.modules() if isinstance(m, ReparamBlock)]
        assert blocks and all(b.deployed for b in blocks)
        assert relative_difference(fused(x), expected) <= 1e-5


def _fuse_conv_and_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """ultralytics.utils.torch_utils.fuse_conv_and_bn (8.4): the BN folded into the conv's own weight and bias."""
    conv.weight, conv.bias = torch.nn.utils.fusion.fuse_conv_bn_weights(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    return conv.requires_grad_(False)


class UltralyticsConv(nn.Module):
    """ultralytics.nn.modules.conv.Conv (8.4): ``act(bn(conv(x)))`` with a bias-free ``conv``,
    ``forward_fuse = act(conv(x))`` after fusion."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, g: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x):
        return self.act(self.conv(x))


def ultralytics_fuse(model: nn.Module) -> nn.Module:
    """ultralytics BaseModel.fuse (8.4) for its Conv modules, as predict / val / export call it."""
    for m in model.modules():
        if isinstance(m, UltralyticsConv) and hasattr(m, "bn"):
            m.conv = _fuse_conv_and_bn(m.conv, m.bn)
            delattr(m, "bn")
            m.forward = m.forward_fuse
    return model


def yolo_like() -> nn.Module:
    torch.manual_seed(0)
    return randomize_norm_state_(nn.Sequential(
        UltralyticsConv(3, 8, 3, 2), UltralyticsConv(8, 8, 3, 1, g=8), UltralyticsConv(8, 16, 1),
        UltralyticsConv(16, 16, 5, 1, g=16), UltralyticsConv(16, 8, 3, 2)), 3).eval()


@pytest.mark.parametrize("block_type", BLOCK_TYPES + FAMILY_TYPES)
def test_ultralytics_fuse_contract_works_on_the_deployed_model(block_type):
    model = convert_to_acnet(yolo_like(), block_type)
    x = torch.randn(2, 3, 16, 16)
    train_steps(model, x)
    with torch.no_grad():
        trained = model(x)
        deployed = acnet_switch_to_deploy(copy.deepcopy(model))
        assert module_types(deployed) == module_types(yolo_like())
        fused = ultralytics_fuse(deployed)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
        assert relative_difference(fused(x), trained) <= 1e-5


def test_real_ultralytics_fuse_works_on_the_deployed_model():
    tasks = pytest.importorskip("ultralytics.nn.tasks")
    torch.manual_seed(0)
    model = tasks.DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    convert_to_acnet(model, "acb")
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        trained = model(x)[0]
        fused = acnet_switch_to_deploy(model).fuse(verbose=False)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
        assert relative_difference(fused(x)[0], trained) <= 1e-5


# --------------------------------------------------------------------------------------------
# a detector that views its head's output
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_keypoint_rcnn_trains_a_step_with_every_block_type(block_type):
    """Needs the block side (outputs in the input's memory format): torchvision's roi_heads views the
    keypoint logits (``keypoint_logits.view(N * K, H * W)``)."""
    from torchvision.models.detection import keypointrcnn_resnet50_fpn

    torch.manual_seed(0)
    model = keypointrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=2, num_keypoints=3, min_size=64, max_size=96,
        rpn_pre_nms_top_n_train=64, rpn_post_nms_top_n_train=16, rpn_batch_size_per_image=32,
        box_batch_size_per_image=16)
    quietly_convert(model, block_type)
    assert isinstance(model.roi_heads.keypoint_head[0], ReparamBlock)
    images = [torch.rand(3, 64, 80)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 50.0, 60.0]]), "labels": torch.tensor([1]),
                "keypoints": torch.tensor([[[10.0, 12.0, 1.0], [30.0, 30.0, 1.0], [45.0, 50.0, 1.0]]])}]
    model.train()
    losses = model(images, targets)
    loss = sum(losses.values())
    loss.backward()
    assert torch.isfinite(loss) and "loss_keypoint" in losses
    assert model.roi_heads.keypoint_head[0].parameters().__next__().grad is not None
