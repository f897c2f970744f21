"""Training memory, counted exactly: bytes of the tensors autograd saves for backward, per image.

One training step (forward in training mode, loss, backward) of each block type's model is run under
``torch.autograd.graph.saved_tensors_hooks``; every tensor saved for backward is recorded once per
storage (a tensor saved by several ops, or views of one storage, count once: the memory really held),
parameters and buffers excluded. The count depends only on the shapes, so it is the same on every
machine and every run. Two steps at batches ``b`` and ``2b`` split it exactly into the part that grows
with the batch (activations, per image) and a fixed part (OREPA's kernel-sized intermediates, which do
not depend on the batch); the ratios are taken at the recipe's batch per GPU (128 on CIFAR, 32 on
ImageNet: 256 over 8 GPUs): ``per image + fixed / batch``.

Variants: ``base``, ``acb``, ``dbb``, ``orepa``, ``repvgg``, ``mobileone`` (this project's blocks; ``mobileone``
with its default k = 1, which also takes the pointwise 1x1 convs), and ``acb-orig`` / ``dbb-orig``:
the same blocks run with the original implementations' forward (each branch conv -> BN, sums of BN
outputs; the replicas of ``benchmarks/bench_blocks.py``). Target: orepa <= 1.25 x base.

    python benchmarks/bench_memory.py                     # src56, vc, sres18
    python benchmarks/bench_memory.py --archs src56 --batch 4

A second table gives the newer families block by block (ECB over the plain conv with bias and over conv+BN,
dilated re-param over a depthwise 7x7 / 13x13 conv+BN; ``--batch`` sets their batch too).
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Callable, Dict, Sequence, Tuple

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_blocks import original_acb_forward, original_dbb_forward  # noqa: E402

from acnet import ACBlock, DiverseBranchBlock  # noqa: E402
from constructor import build_model, get_arch_spec, list_archs  # noqa: E402

DEFAULT_ARCHS = ("src56", "vc", "sres18")
DEFAULT_BATCHES = {32: 4, 224: 2}  # measured at b and 2b, by input size
RECIPE_BATCHES = {32: 128, 224: 32}  # the ratios' batch per GPU, by input size
VARIANTS = ("base", "acb", "acb-orig", "dbb", "dbb-orig", "orepa", "repvgg", "mobileone")
TARGET_OREPA = 1.25
ORIGINAL_FORWARDS = {"acb-orig": (ACBlock, original_acb_forward), "dbb-orig": (DiverseBranchBlock, original_dbb_forward)}


def saved_step_bytes(module: nn.Module, loss_of: Callable[[nn.Module], torch.Tensor]) -> int:
    """Bytes of distinct non-parameter storages autograd saves for backward in one training step of
    ``module`` (``loss_of(module)``: its forward and loss; the step's backward runs too)."""
    own = {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}
    storages: Dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    module.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_of(module)
    loss.backward()
    return sum(storages.values())


def saved_bytes(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> int:
    """Bytes of distinct non-parameter storages saved for backward in one training step."""
    return saved_step_bytes(model, lambda m: nn.functional.cross_entropy(m(images), labels))


def variant_model(arch: str, variant: str) -> nn.Module:
    """The model of ``variant``: a block type's model, or its blocks running the original forward."""
    block_type = variant.split("-")[0]
    model = build_model(arch, block_type)
    if variant in ORIGINAL_FORWARDS:
        block_class, forward = ORIGINAL_FORWARDS[variant]
        for module in model.modules():
            if isinstance(module, block_class):
                module.forward = functools.partial(forward, module)
    return model


def measure(arch: str, batch: int) -> Dict[str, Tuple[float, float]]:
    """Per variant ``(bytes per image, fixed bytes)`` from steps at ``batch`` and ``2 * batch``."""
    spec = get_arch_spec(arch)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2 * batch, 3, spec.input_size, spec.input_size, generator=generator)
    labels = torch.randint(0, spec.num_classes, (2 * batch,), generator=generator)
    results = {}
    for variant in VARIANTS:
        torch.manual_seed(0)
        model = variant_model(arch, variant)
        small, large = (saved_bytes(model, images[:n], labels[:n]) for n in (batch, 2 * batch))
        results[variant] = ((large - small) / batch, 2 * small - large)
    return results


def format_table(results: Dict[str, Dict[str, Tuple[float, float]]]) -> str:
    mib = 2.0 ** 20
    lines = ["Saved-for-backward tensors in one training step: MiB per image (+ fixed MiB, batch-independent);",
             "ratios to base at the recipe batch per GPU (per image + fixed / batch)",
             f"{'arch':<8} {'batch':>5} " + " ".join(f"{v:>14}" for v in VARIANTS) + "  "
             + " ".join(f"{v + '/b':>10}" for v in VARIANTS[1:]) + "  target"]
    for arch, row in results.items():
        batch = RECIPE_BATCHES[get_arch_spec(arch).input_size]
        at_batch = {v: per_image + fixed / batch for v, (per_image, fixed) in row.items()}
        ratios = [at_batch[v] / at_batch["base"] for v in VARIANTS[1:]]
        orepa = at_batch["orepa"] / at_batch["base"]
        verdict = ("ok" if orepa <= TARGET_OREPA else "ABOVE") + f" (orepa <= {TARGET_OREPA})"
        cells = [f"{per_image / mib:.2f}" + (f"+{fixed / mib:.1f}" if fixed / mib >= 0.05 else "")
                 for per_image, fixed in (row[v] for v in VARIANTS)]
        lines.append(f"{arch:<8} {batch:>5} " + " ".join(f"{c:>14}" for c in cells) + "  "
                     + " ".join(f"{r:>10.3f}" for r in ratios) + f"  {verdict}")
    return "\n".join(lines)


#: Block-level rows of the newer families (issue 28): (label, block type, norm, input shape, kernel, block options),
#: each over the plain unit it replaces (conv with bias for the BN-free ECB, else conv+BN).
FAMILY_CASES = (
    ("ECB BN-free 3x3", "ecb", "none", (8, 64, 28, 28), 3, {}),
    ("ECB + BN 3x3", "ecb", "batch", (8, 64, 28, 28), 3, {}),
    ("dilated 7x7 dw", "dilated", "batch", (8, 64, 28, 28), 7, dict(groups=64)),
    ("dilated 13x13 dw", "dilated", "batch", (8, 64, 28, 28), 13, dict(groups=64)),
)


def family_saved_bytes(block_type: str, norm: str, shape: Tuple[int, ...], kernel: int, options: Dict) -> Tuple[int, int]:
    """``(plain unit, block)`` bytes saved for backward in one training step on an input of ``shape``."""
    from acnet.registry import get_block_type

    torch.manual_seed(0)
    channels, groups = shape[1], options.get("groups", 1)
    conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=groups, bias=norm == "none")
    plain = conv if norm == "none" else nn.Sequential(conv, nn.BatchNorm2d(channels))
    block = get_block_type(block_type).block_class(channels, channels, kernel, padding=kernel // 2, norm=norm,
                                                   **options)
    x = torch.randn(*shape, requires_grad=True)
    plain_bytes, block_bytes = (saved_step_bytes(module, lambda m: m(x).sum()) for module in (plain, block))
    return plain_bytes, block_bytes


def format_family_table(batch: int | None = None) -> str:
    """Saved-for-backward MiB of each family row (the block input included) and its ratio to the plain unit."""
    mib = 2.0 ** 20
    lines = ["", "Newer families, one block: saved-for-backward MiB (its input included) over the plain unit",
             f"{'family':>18} {'N,C,H,W':>14} {'plain':>8} {'block':>8} {'ratio':>6}"]
    for label, block_type, norm, shape, kernel, options in FAMILY_CASES:
        if batch is not None:
            shape = (batch,) + tuple(shape[1:])
        plain, block = family_saved_bytes(block_type, norm, shape, kernel, options)
        lines.append(f"{label:>18} {','.join(map(str, shape)):>14} {plain / mib:8.2f} {block / mib:8.2f} "
                     f"{block / plain:6.2f}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=list(DEFAULT_ARCHS), metavar="ARCH",
                        help=f"architectures (default: {' '.join(DEFAULT_ARCHS)})")
    parser.add_argument("--batch", type=int, help="measured at this batch and twice it (default: 4 at 32x32, 2 at 224x224)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args(argv)
    unknown = [a for a in args.archs if a not in list_archs()]
    if unknown:
        parser.error(f"unknown architecture(s) {unknown}; valid: {', '.join(list_archs())}")
    if (args.batch is not None and args.batch < 1) or args.threads < 1:
        parser.error("--batch must be >= 1 and --threads >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = {a: args.batch or DEFAULT_BATCHES[get_arch_spec(a).input_size] for a in args.archs}
    results = {arch: measure(arch, batches[arch]) for arch in args.archs}
    print(format_table(results))
    print(format_family_table(args.batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
