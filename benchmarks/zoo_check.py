"""Model-zoo check: acnet's blocks on models it was not written for (torchvision, timm) and on BN-free nets.

For each model (built untrained: ``weights=None`` / ``pretrained=False``, 10 classes) and block type:
``convert_to_acnet(model, block)`` with no other option (every conv gets the form of what it feeds;
the row FAILs when any option -- ``bn_free=False/True``, ``kernel_sizes`` -- would convert a conv the
default keeps), one SGD step (gradient norm clipped to 1) in training mode on a small random batch, then in eval mode both
``acnet_switch_to_deploy`` (of a copy) and ``acnet_fuse_and_load`` into a freshly built model of the
same name must equal the trained model (float32, relative difference <= 1e-5 of the output's
scale; for a model whose own float32 output is further than that from its float64 output,
the check is made in float64 within 1e-7: "ok (f64)"; "ill-cond": even the float64 output moves by
as much for a 1e-13 change of the input, so outputs cannot be compared). Each (model, block) runs in a worker subprocess (``benchmarks/isolated.py``): a crash or a hang
is that row's failure. For timm models, timm's own ``reparameterize_model`` must also give the trained
model's outputs on the output of ``acnet_switch_to_deploy`` (the stock module tree). Models without a
conv are listed as skipped, with the reason.

Beyond classification: torchvision detectors (``tvdet:``) built as torchvision builds them for
pretrained weights (backbone ``norm_layer=FrozenBatchNorm2d``, ``trainable_layers=3``; built here with
no weights at all; RetinaNet v2 and SSD300 by their builders) -- compared: the backbone features and
every head (RPN / RetinaNet / FCOS / SSD heads on those features, the box, mask and keypoint heads and
predictors, ConvTranspose2d included, on a fixed random RoI batch) --, video models (``tvvideo:``: Conv3d +
BatchNorm3d, input 2x3x4x16x16), and nets written here (``own:``): an EDSR-like super-resolution net
(conv + bias, ReLU, PixelShuffle, no BN) and 1-D audio nets with and without BatchNorm1d.

    python benchmarks/zoo_check.py                        # the full zoo, acb and dbb (long: hours on 2 cores)
    python benchmarks/zoo_check.py --models tv:resnet18 timm:efficientnet_b0 --blocks dbb

Model names: ``tv:NAME`` (torchvision.models), ``tvseg:NAME`` (torchvision.models.segmentation),
``tvdet:NAME`` (torchvision.models.detection, frozen-BN backbone), ``tvvideo:NAME``, ``timm:NAME``, ``own:NAME``. Prints one row per (model, block): blocks plugged in, ok / FAIL / no blocks, the larger
relative difference of the two checks, seconds. Exit status 1 when a row failed.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.isolated import run_isolated  # noqa: E402

TOLERANCE = 1e-5
#: For models whose float32 output is itself further than TOLERANCE from float64 (ill-conditioned).
TOLERANCE_FLOAT64 = 1e-7
NUM_CLASSES = 10
BLOCKS = ("acb", "dbb")
ALL_BLOCKS = ("acb", "dbb", "orepa", "repvgg", "mobileone", "ecb", "dilated")
CASE_TIMEOUT_S = 900.0
#: Larger inputs where a model needs more than 64x64 (inception_v3: 75; maxvit_t: its 7x7 windows at 224; SSD300: its
#: last extra layers need about 270).
INPUT_SIZE = {"tv:inception_v3": 96, "tv:maxvit_t": 224, "tvdet:ssd300_vgg16": 300}
#: The models the test suite checks (tests/test_zoo.py): one of each family's structures, all small.
CI_MODELS = (
    "tv:resnet18", "tv:mobilenet_v3_small", "tv:shufflenet_v2_x0_5", "tv:regnet_y_400mf",
    "tvseg:lraspp_mobilenet_v3_large", "timm:efficientnet_b0", "timm:regnety_002",
)
#: The new families' cases the test suite checks, one block type each (each model's cheapest informative one).
CI_EXTRA_CASES = (
    ("tvdet:fasterrcnn_mobilenet_v3_large_fpn", "acb"), ("tvvideo:r2plus1d_18", "acb"), ("own:edsr", "dbb"),
    ("own:audio", "orepa"), ("own:audio_bn", "dbb"),
    # ECB: the BN-free SR net it was made for; dilated: timm's ConvNeXt (7x7 depthwise convs, LayerNorm after)
    ("own:edsr", "ecb"), ("timm:convnext_atto", "dilated"),
)
#: The RepVGG / MobileOne rows the test suite checks: a residual net, an inverted-residual net (depthwise 3x3 and
#: pointwise 1x1 convs: MobileOne's two kinds of blocks, identity branches where in == out and stride 1) and a
#: timm model (squeeze-excite, hard-swish, BatchNormAct2d), each with each of the two types.
CI_FAMILY_CASES = tuple((model, block) for block in ("repvgg", "mobileone")
                        for model in ("tv:resnet18", "tv:mobilenet_v2", "timm:mobilenetv3_small_050"))
#: Detectors whose pretrained builds freeze the backbone's BatchNorms (torchvision 0.29).
DETECTION_MODELS = ("fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn",
                    "retinanet_resnet50_fpn", "fcos_resnet50_fpn", "fasterrcnn_mobilenet_v3_large_fpn",
                    "fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn_v2", "ssd300_vgg16")
VIDEO_MODELS = ("r3d_18", "mc3_18", "r2plus1d_18")
OWN_MODELS = ("edsr", "audio", "audio_bn")
TIMM_MODELS = (
    "efficientnet_b0", "tf_efficientnetv2_b0", "efficientnet_lite0", "mobilenetv2_100", "mobilenetv3_large_100",
    "mobilenetv3_small_050", "mixnet_s", "fbnetc_100", "spnasnet_100", "semnasnet_050", "lcnet_050",
    "ghostnet_100", "rexnet_100", "regnetx_002", "regnety_002", "regnetz_b16", "cspdarknet53", "cspresnet50",
    "cs3darknet_m", "darknet53", "resnet18", "resnet50d", "resnext26ts", "seresnext26d_32x4d", "dla34",
    "hrnet_w18_small", "gernet_s", "repvgg_a0", "selecsls42b", "ese_vovnet19b_dw", "dpn68", "densenet121",
    "convnext_atto", "mobileone_s0", "fastvit_t8",
)
#: Larger models are listed as skipped: their CPU check needs more memory than a CI machine has.
MAX_PARAMS = 200_000_000


def all_models() -> List[str]:
    """Every torchvision classification and segmentation builder, :data:`TIMM_MODELS`, then the detection,
    video and own models."""
    import torchvision

    names = [f"tv:{n}" for n in torchvision.models.list_models(module=torchvision.models)]
    names += [f"tvseg:{n}" for n in torchvision.models.list_models(module=torchvision.models.segmentation)]
    names += [f"timm:{n}" for n in TIMM_MODELS]
    return (names + [f"tvdet:{n}" for n in DETECTION_MODELS] + [f"tvvideo:{n}" for n in VIDEO_MODELS]
            + [f"own:{n}" for n in OWN_MODELS])


class EDSRLike(nn.Module):
    """A small EDSR-style x2 super-resolution net: no BN; conv + bias, ReLU, scaled residual blocks,
    PixelShuffle upsampling (as EDSR / ECBSR-style restoration nets are built)."""

    def __init__(self, channels: int = 16, blocks: int = 2, scale: int = 2) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.body = nn.ModuleList(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                                                nn.Conv2d(channels, channels, 3, padding=1)) for _ in range(blocks))
        self.body_tail = nn.Conv2d(channels, channels, 3, padding=1)
        self.upsample = nn.Sequential(nn.Conv2d(channels, channels * scale * scale, 3, padding=1),
                                      nn.PixelShuffle(scale), nn.PReLU(channels))
        self.tail = nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(x)
        z = y
        for block in self.body:
            z = z + 0.1 * block(z)
        return self.tail(self.upsample(self.body_tail(z) + y))


def audio_net(batch_norm: bool, num_classes: int = NUM_CLASSES) -> nn.Module:
    """A 1-D audio / time-series classifier (M5-like): strided Conv1d stem, Conv1d (+ BatchNorm1d) + ReLU
    stages with max-pooling, global average pooling, linear head."""
    def stage(cin: int, cout: int) -> List[nn.Module]:
        layers: List[nn.Module] = [nn.Conv1d(cin, cout, 3, padding=1, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(cout))
        return layers + [nn.ReLU()]

    return nn.Sequential(nn.Conv1d(1, 16, 8, stride=4), nn.ReLU(), *stage(16, 16), nn.MaxPool1d(2),
                         *stage(16, 32), *stage(32, 32), nn.MaxPool1d(2), *stage(32, 32),
                         nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, num_classes))


def _build_detection(name: str) -> nn.Module:
    """The detector as torchvision builds it for pretrained weights (frozen BNs, 3 trainable backbone
    layers), with no weights."""
    from torchvision.models import detection, mobilenet_v3_large, resnet50
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from torchvision.ops.misc import FrozenBatchNorm2d

    if name in ("retinanet_resnet50_fpn_v2", "ssd300_vgg16"):  # BN backbone, GroupNorm heads / VGG without BN
        return getattr(detection, name)(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
    if name.startswith("fasterrcnn_mobilenet_v3_large"):
        backbone = _mobilenet_extractor(mobilenet_v3_large(weights=None, norm_layer=FrozenBatchNorm2d), True, 3)
        anchors = ((32, 64, 128, 256, 512),) * 3
        extra = {"min_size": 320, "max_size": 640, "rpn_score_thresh": 0.05} if "320" in name else {}
        return detection.FasterRCNN(backbone, NUM_CLASSES, rpn_anchor_generator=AnchorGenerator(
            anchors, ((0.5, 1.0, 2.0),) * len(anchors)), **extra)
    body = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    if name in ("retinanet_resnet50_fpn", "fcos_resnet50_fpn"):
        backbone = _resnet_fpn_extractor(body, 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
        return (detection.RetinaNet if name.startswith("retinanet") else detection.FCOS)(backbone, NUM_CLASSES)
    backbone = _resnet_fpn_extractor(body, 3)
    builders = {"fasterrcnn_resnet50_fpn": detection.FasterRCNN, "maskrcnn_resnet50_fpn": detection.MaskRCNN,
                "keypointrcnn_resnet50_fpn": detection.KeypointRCNN}
    if name not in builders:
        raise ValueError(f"unknown detection model {name!r} (one of {', '.join(DETECTION_MODELS)})")
    return builders[name](backbone, 2 if name.startswith("keypoint") else NUM_CLASSES)


def build(spec: str) -> nn.Module:
    """The untrained model ``spec`` names (no download)."""
    family, _, name = spec.partition(":")
    if family == "tvdet":
        return _build_detection(name)
    if family == "own":
        own = {"edsr": EDSRLike, "audio": lambda: audio_net(False), "audio_bn": lambda: audio_net(True)}
        if name not in own:
            raise ValueError(f"unknown own model {name!r} (one of {', '.join(OWN_MODELS)})")
        return own[name]()
    if family == "timm":
        import timm

        return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
    import torchvision

    if family == "tvseg":
        return torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
    if family == "tvvideo":
        return torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES)
    if family != "tv":
        raise ValueError(f"unknown model family in {spec!r} (use tv:, tvseg:, tvdet:, tvvideo:, timm: or own:)")
    extra: Dict[str, Any] = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES, **extra)


def example_input(spec: str) -> torch.Tensor:
    """A small batch of 2 for ``spec`` (images, clips, or waveforms)."""
    family, _, name = spec.partition(":")
    if family == "tvvideo":
        return torch.randn(2, 3, 4, 16, 16)
    if spec in ("own:audio", "own:audio_bn"):
        return torch.randn(2, 1, 512)
    if spec == "own:edsr":
        return torch.randn(2, 3, 16, 16)
    size = INPUT_SIZE.get(spec, 64)
    return torch.randn(2, 3, size, size)


def _flat(value: Any) -> List[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value.flatten()]
    if isinstance(value, dict):
        value = list(value.values())
    return [t for v in value for t in _flat(v)] if isinstance(value, (list, tuple)) else []


def _detector_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Backbone features and every head on them (RoI heads on a fixed random RoI batch), concatenated."""
    features = model.backbone(x)
    levels = list(features.values()) if isinstance(features, dict) else [features]
    parts = _flat(levels)
    if hasattr(model, "rpn"):
        parts += _flat(model.rpn.head(levels))
    if hasattr(model, "head"):  # RetinaNet, FCOS, SSD
        parts += _flat(model.head(levels))
    heads = getattr(model, "roi_heads", None)
    if heads is not None:
        rois = torch.randn(2, levels[0].shape[1], 14, 14, generator=torch.Generator().manual_seed(1))
        pooled = torch.nn.functional.adaptive_avg_pool2d(rois, 7)
        parts += _flat(heads.box_predictor(heads.box_head(pooled)))
        if getattr(heads, "mask_head", None) is not None:
            parts += _flat(heads.mask_predictor(heads.mask_head(rois)))
        if getattr(heads, "keypoint_head", None) is not None:
            parts += _flat(heads.keypoint_predictor(heads.keypoint_head(rois)))
    return torch.cat(parts)


def _output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "backbone") and hasattr(model, "transform"):
        return _detector_output(model, x)
    out = model(x)
    if isinstance(out, dict):  # torchvision segmentation models
        out = out["out"]
    return out


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def skip_reason(spec: str) -> Optional[str]:
    """Why ``spec`` is not checked (no conv to convert, too large), from its structure on the meta device."""
    from acnet.pairs import ANY_CONV_TYPES

    try:
        with torch.device("meta"):
            model = build(spec)
    except (NotImplementedError, RuntimeError):  # a builder that reads tensor values (regnet): build for real
        model = build(spec)
    if not any(isinstance(m, ANY_CONV_TYPES) for m in model.modules()):
        return "no conv (nothing to convert)"
    params = sum(p.numel() for p in model.parameters())
    if params > MAX_PARAMS:
        return f"{params / 1e6:.0f}M parameters: over the {MAX_PARAMS / 1e6:.0f}M this CPU check allows"
    return None


def check_model(case: Dict[str, Any]) -> Dict[str, Any]:
    """Worker side (one model, one block type): convert, train a step, compare deploy and fuse-and-load."""
    import warnings

    from acnet import ReparamBlock, acnet_fuse_and_load, acnet_switch_to_deploy, conversion_report, convert_to_acnet

    spec, block = case["model"], case["block"]
    torch.manual_seed(0)
    model = build(spec)

    def converted(**options: Any) -> set:
        return {r.name for r in conversion_report(model, block, **options).rows if r.converted}

    default = converted()
    options = (dict(bn_free=False), dict(bn_free=True), dict(kernel_sizes=range(1, 12)))
    missed = set().union(*(converted(**o) for o in options)) - default
    if missed:
        raise AssertionError(f"converted only with an option: {sorted(missed)[:5]}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert_to_acnet(model, block)
    blocks = sum(isinstance(m, ReparamBlock) for m in model.modules())
    x = example_input(spec)
    model.train()
    out = _output(model, x)
    (out * torch.randn_like(out)).mean().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # random nets at batch 2 have wild gradients
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.eval()
    with torch.no_grad():
        expected = _output(model, x)
        deployed = _output(acnet_switch_to_deploy(copy.deepcopy(model)), x)
        fresh = build(spec)
        fused = _output(acnet_fuse_and_load(fresh, model.state_dict()), x)
    if not torch.isfinite(expected).all():
        raise AssertionError("the trained model's eval output is not finite")
    result = {"blocks": blocks, "deploy_diff": _relative(deployed, expected), "fuse_diff": _relative(fused, expected),
              "warnings": [str(w.message)[:300] for w in caught]}
    if spec.startswith("timm:"):  # timm's own fuse on the deployed (stock) module tree
        from timm.utils.model import reparameterize_model

        with torch.no_grad():
            host = _output(reparameterize_model(acnet_switch_to_deploy(copy.deepcopy(model))), x)
        result["deploy_diff"] = max(result["deploy_diff"], _relative(host, expected))
    if max(result["deploy_diff"], result["fuse_diff"]) > TOLERANCE:
        # Is float32 itself that far off for this model? Then the exactness check is done in float64.
        with torch.no_grad():
            model64, x64 = copy.deepcopy(model).double(), x.double()
            expected64 = _output(model64, x64)
            result["float32_noise"] = _relative(expected.double(), expected64)
            result["deploy_diff64"] = _relative(_output(acnet_switch_to_deploy(copy.deepcopy(model64)), x64), expected64)
            fresh64 = acnet_fuse_and_load(build(spec).double(), model.state_dict())
            result["fuse_diff64"] = _relative(_output(fresh64, x64), expected64)
            # how far the float64 output moves for an input change at float64's rounding scale
            result["sensitivity64"] = _relative(_output(model64, x64 * (1 + 1e-13)), expected64)
    return result


def verdict(result: Dict[str, Any]) -> Tuple[str, str]:
    """``(status, detail)`` of one result row."""
    for kind in ("crash", "hang", "error"):
        if kind in result:
            return "FAIL", f"{kind}: {result[kind]}"
    diff = max(result["deploy_diff"], result["fuse_diff"])
    if diff > TOLERANCE:
        detail = f"float32: deploy {result['deploy_diff']:.1e}, fuse-and-load {result['fuse_diff']:.1e} > {TOLERANCE:g}"
        noise = result.get("float32_noise", 0.0)
        diff64 = max(result.get("deploy_diff64", 1.0), result.get("fuse_diff64", 1.0))
        sensitivity = result.get("sensitivity64", 0.0)
        if noise > TOLERANCE and diff64 > TOLERANCE_FLOAT64 and diff64 <= 10 * sensitivity:
            return "ill-cond", (f"{detail}; float64 {diff64:.1e}, but a 1e-13 relative change of the input moves the "
                                f"trained model's float64 output by {sensitivity:.1e}: no output comparison can check it")
        if noise <= TOLERANCE or diff64 > TOLERANCE_FLOAT64:
            return "FAIL", detail + (f"; float64 {diff64:.1e}" if "fuse_diff64" in result else "")
        return "ok (f64)", (f"{detail}, but the trained model's own float32 output is {noise:.1e} off its float64 "
                            f"output; in float64 deploy and fuse-and-load are within {diff64:.1e}")
    if result["blocks"] == 0:
        return "no blocks", (result["warnings"] or ["-"])[0]
    return "ok", ""


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None, help="model names (default: the whole zoo)")
    parser.add_argument("--ci", action="store_true", help="only the models the test suite checks")
    parser.add_argument("--blocks", nargs="*", default=list(BLOCKS), choices=ALL_BLOCKS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the worker")
    args = parser.parse_args(argv)
    specs = list(CI_MODELS) + [m for m, _ in CI_EXTRA_CASES] if args.ci else (args.models or all_models())
    if args.ci:  # and the new families' rows, each with its own block type
        specs += [(m, b) for m, b in CI_FAMILY_CASES]

    print(f"torch {torch.__version__}; one SGD step at batch 2, 64x64 input (clips 4x16x16, waveforms 512); ok = deploy and fuse-and-load "
          f"equal the trained model within {TOLERANCE:g} (relative), float32; 'ok (f64)': float32 itself is further "
          f"off for that model, checked in float64 within {TOLERANCE_FLOAT64:g}", flush=True)
    header = f"{'model':<38} {'block':<9} {'#blocks':>7} {'status':<9} {'rel diff':>9} {'seconds':>7}  detail"
    print(header)
    print("-" * len(header), flush=True)
    failed = 0
    for spec in specs:
        blocks = list(args.blocks)
        if isinstance(spec, tuple):
            spec, blocks = spec[0], [spec[1]]
        reason = skip_reason(spec)
        if reason is not None:
            print(f"{spec:<38} {'-':<9} {'-':>7} {'skipped':<9} {'-':>9} {'-':>7}  {reason}", flush=True)
            continue
        cases = [{"model": spec, "block": block} for block in blocks]
        for case, result in zip(cases, run_isolated("benchmarks.zoo_check:check_model", cases, CASE_TIMEOUT_S, args.threads)):
            status, detail = verdict(result)
            failed += status == "FAIL"
            diff = f"{max(result['deploy_diff'], result['fuse_diff']):9.1e}" if "fuse_diff" in result else f"{'-':>9}"
            count = result.get("blocks", "-")
            print(f"{spec:<38} {case['block']:<9} {count:>7} {status:<9} {diff} {result.get('seconds', 0.0):7.1f}  "
                  f"{detail}", flush=True)
    print("-" * len(header))
    print(f"{failed} failed row(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
