"""Model-zoo check: acnet's blocks on models it was not written for (torchvision, timm).

For each model (built untrained: ``weights=None`` / ``pretrained=False``, 10 classes) and block type:
``convert_to_acnet``, one SGD step (gradient norm clipped to 1) in training mode on a small random batch, then in eval mode both
``acnet_switch_to_deploy`` (of a copy) and ``acnet_fuse_and_load`` into a freshly built model of the
same name must equal the trained model (float32, relative difference <= 1e-5 of the output's
scale; for a model whose own float32 output is further than that from its float64 output,
the check is made in float64 within 1e-7: "ok (f64)"; "ill-cond": even the float64 output moves by
as much for a 1e-13 change of the input, so outputs cannot be compared). Each (model, block) runs in a worker subprocess (``tests/isolated.py``): a crash or a hang
is that row's failure. Models without a BatchNorm2d are listed as skipped, with the reason.

    python benchmarks/zoo_check.py                        # the full zoo, acb and dbb (long: ~1 h on 2 cores)
    python benchmarks/zoo_check.py --models tv:resnet18 timm:efficientnet_b0 --blocks dbb

Model names: ``tv:NAME`` (torchvision.models), ``tvseg:NAME`` (torchvision.models.segmentation),
``timm:NAME``. Prints one row per (model, block): blocks plugged in, ok / FAIL / no blocks, the larger
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
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from isolated import run_isolated  # noqa: E402

TOLERANCE = 1e-5
#: For models whose float32 output is itself further than TOLERANCE from float64 (ill-conditioned).
TOLERANCE_FLOAT64 = 1e-7
NUM_CLASSES = 10
BLOCKS = ("acb", "dbb")
CASE_TIMEOUT_S = 900.0
#: Larger inputs where a model needs more than 64x64 (inception_v3: 75; maxvit_t: its 7x7 windows at 224).
INPUT_SIZE = {"tv:inception_v3": 96, "tv:maxvit_t": 224}
#: The models the test suite checks (tests/test_zoo.py): one of each family's structures, all small.
CI_MODELS = (
    "tv:resnet18", "tv:mobilenet_v3_small", "tv:shufflenet_v2_x0_5", "tv:regnet_y_400mf",
    "tvseg:lraspp_mobilenet_v3_large", "timm:efficientnet_b0", "timm:regnety_002",
)
TIMM_MODELS = (
    "efficientnet_b0", "tf_efficientnetv2_b0", "efficientnet_lite0", "mobilenetv2_100", "mobilenetv3_large_100",
    "mobilenetv3_small_050", "mixnet_s", "fbnetc_100", "spnasnet_100", "semnasnet_050", "lcnet_050",
    "ghostnet_100", "rexnet_100", "regnetx_002", "regnety_002", "regnetz_b16", "cspdarknet53", "cspresnet50",
    "cs3darknet_m", "darknet53", "resnet18", "resnet50d", "resnext26ts", "seresnext26d_32x4d", "dla34",
    "hrnet_w18_small", "gernet_s", "repvgg_a0", "selecsls42b", "ese_vovnet19b_dw", "dpn68", "densenet121",
    "convnext_atto",
)
#: Larger models are listed as skipped: their CPU check needs more memory than a CI machine has.
MAX_PARAMS = 200_000_000


def all_models() -> List[str]:
    """Every torchvision classification and segmentation builder, then :data:`TIMM_MODELS`."""
    import torchvision

    names = [f"tv:{n}" for n in torchvision.models.list_models(module=torchvision.models)]
    names += [f"tvseg:{n}" for n in torchvision.models.list_models(module=torchvision.models.segmentation)]
    return names + [f"timm:{n}" for n in TIMM_MODELS]


def build(spec: str) -> nn.Module:
    """The untrained model ``spec`` names (no download)."""
    family, _, name = spec.partition(":")
    if family == "timm":
        import timm

        return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
    import torchvision

    if family == "tvseg":
        return torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
    if family != "tv":
        raise ValueError(f"unknown model family in {spec!r} (use tv:, tvseg: or timm:)")
    extra: Dict[str, Any] = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES, **extra)


def _output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if isinstance(out, dict):  # torchvision segmentation models
        out = out["out"]
    return out


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def skip_reason(spec: str) -> Optional[str]:
    """Why ``spec`` is not checked (no BatchNorm2d, too large), from its structure on the meta device."""
    try:
        with torch.device("meta"):
            model = build(spec)
    except (NotImplementedError, RuntimeError):  # a builder that reads tensor values (regnet): build for real
        model = build(spec)
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        return "no BatchNorm2d (nothing to convert)"
    params = sum(p.numel() for p in model.parameters())
    if params > MAX_PARAMS:
        return f"{params / 1e6:.0f}M parameters: over the {MAX_PARAMS / 1e6:.0f}M this CPU check allows"
    return None


def check_model(case: Dict[str, Any]) -> Dict[str, Any]:
    """Worker side (one model, one block type): convert, train a step, compare deploy and fuse-and-load."""
    import warnings

    from acnet import ReparamBlock, acnet_fuse_and_load, acnet_switch_to_deploy, convert_to_acnet

    spec, block = case["model"], case["block"]
    torch.manual_seed(0)
    model = build(spec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert_to_acnet(model, block)
    blocks = sum(isinstance(m, ReparamBlock) for m in model.modules())
    size = INPUT_SIZE.get(spec, 64)
    x = torch.randn(2, 3, size, size)
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
    parser.add_argument("--blocks", nargs="*", default=list(BLOCKS), choices=BLOCKS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the worker")
    args = parser.parse_args(argv)
    specs = list(CI_MODELS) if args.ci else (args.models or all_models())

    print(f"torch {torch.__version__}; one SGD step at batch 2, 64x64 input; ok = deploy and fuse-and-load "
          f"equal the trained model within {TOLERANCE:g} (relative), float32; 'ok (f64)': float32 itself is further "
          f"off for that model, checked in float64 within {TOLERANCE_FLOAT64:g}", flush=True)
    header = f"{'model':<38} {'block':<5} {'#blocks':>7} {'status':<9} {'rel diff':>9} {'seconds':>7}  detail"
    print(header)
    print("-" * len(header), flush=True)
    failed = 0
    for spec in specs:
        reason = skip_reason(spec)
        if reason is not None:
            print(f"{spec:<38} {'-':<5} {'-':>7} {'skipped':<9} {'-':>9} {'-':>7}  {reason}", flush=True)
            continue
        cases = [{"model": spec, "block": block} for block in args.blocks]
        for case, result in zip(cases, run_isolated("benchmarks.zoo_check:check_model", cases, CASE_TIMEOUT_S, args.threads)):
            status, detail = verdict(result)
            failed += status == "FAIL"
            diff = f"{max(result['deploy_diff'], result['fuse_diff']):9.1e}" if "fuse_diff" in result else f"{'-':>9}"
            blocks = result.get("blocks", "-")
            print(f"{spec:<38} {case['block']:<5} {blocks:>7} {status:<9} {diff} {result.get('seconds', 0.0):7.1f}  "
                  f"{detail}", flush=True)
    print("-" * len(header))
    print(f"{failed} failed row(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
