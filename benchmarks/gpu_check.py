"""GPU readiness check: every block type on one CUDA GPU (sized for under 8 minutes); prints tables, writes JSON.

Three phases (each block type of ``acnet.registry``):

(a) block equivalence: each block (dense, strided, grouped) in eval mode against its deploy conv,
    in float32 (TF32 off; relative error <= 1e-5) and under bf16 autocast (<= 2e-2), plus one
    training-mode forward/backward under autocast;
(b) training: ``src56`` and ``sres18`` on the learnable synthetic set, AMP bf16, channels_last,
    eager and ``torch.compile``-d, for ``--steps`` (``--compile-steps``) steps; then the deploy model
    (``acnet_switch_to_deploy``, loaded into the arch's deploy build) must give the training-form
    model's eval outputs (float32, relative <= 1e-4) and the loss must have fallen;
(c) cost: images/s of the timed steps and ``torch.cuda.max_memory_allocated`` per block type, with
    ratios to base (the eager runs of (b));
(d) ImageNet input pipeline: on ``--decode-images`` realistic JPEGs written for the check
    (``bench_data.write_imagenet_like``), images/s of ``decode="cpu"`` (``--workers`` loader
    workers decode, uint8 batches) against ``decode="gpu"`` (nvJPEG, ``decode_jpeg(list,
    device="cuda")``), each up to normalised channels_last batches on the device; and the two
    modes' evaluation batches compared (nvJPEG's and libjpeg-turbo's pixels may differ slightly:
    mean difference <= 2 uint8 levels required, the maximum reported). The faster mode is the
    candidate for ``--decode``'s default on CUDA.

    python benchmarks/gpu_check.py                                  # on a CUDA machine; gpu_check.json
    python benchmarks/gpu_check.py --device cpu --steps 2 --no-compile --batch 2   # smoke run (CPU)

Exits 1 when a check fails (after writing the JSON), 2 with one line when no CUDA device is there.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acnet import acnet_switch_to_deploy  # noqa: E402
from acnet.fileio import atomic_open  # noqa: E402
from acnet.errors import BlockTypeNotApplicableError  # noqa: E402
from acnet.registry import BLOCK_REGISTRY  # noqa: E402
from constructor import build_model, get_arch_spec  # noqa: E402
from data import to_device  # noqa: E402
from data.imagenet import IMAGENET_STD, create_imagefolder_loaders  # noqa: E402
from data.synthetic import make_synthetic  # noqa: E402

ARCHS = ("src56", "sres18")
DEFAULT_BATCH = {32: 128, 224: 32}
#: in, out, K, stride, groups; a block type runs the cases it has a form for (dilated: K >= 5).
BLOCK_CASES = ((16, 32, 3, 1, 1), (32, 32, 3, 2, 1), (32, 64, 5, 1, 2), (32, 32, 7, 1, 32))
TOL_FLOAT32, TOL_BF16, TOL_DEPLOY = 1e-5, 2e-2, 1e-4


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-30)).item()


def randomize_bn_(module: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so that fusion is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                shape = m.running_mean.shape
                m.running_mean.copy_(torch.randn(shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(shape, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(shape, generator=gen) * 0.1)
    return module


def takes_any_conv(arch: str, block_type: str) -> bool:
    """Whether ``-b block_type`` puts a block on some conv of ``arch`` (dilated re-param: only odd K >= 5)."""
    try:
        with torch.device("meta"):
            build_model(arch, block_type)
    except BlockTypeNotApplicableError:
        return False
    return True


def check_blocks(device: torch.device) -> List[Dict[str, Any]]:
    """(a) every block type's train/deploy equivalence, float32 and bf16 autocast."""
    rows = []
    for name, spec in BLOCK_REGISTRY.items():
        for cin, cout, k, stride, groups in BLOCK_CASES:
            if spec.block_class.unsupported(dim=2, kernel_size=(k, k), stride=(stride, stride), padding=(k // 2,) * 2,
                                            dilation=(1, 1), groups=groups, padding_mode="zeros", norm="batch"):
                continue  # no form for this conv (e.g. dilated re-param below 5x5)
            torch.manual_seed(0)
            block = spec.block_class(cin, cout, k, stride=stride, padding=k // 2, groups=groups)
            block = randomize_bn_(block, 1).to(device)
            x = torch.randn(4, cin, 16, 16, device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16):  # training step under AMP must run
                block.train()(x).float().square().mean().backward()
            block.eval()
            with torch.no_grad():
                expected = block(x)
                deploy = block.make_deploy_conv()
                float32 = relative(deploy(x), expected)
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    bf16 = relative(deploy(x), block(x))
            ok = float32 <= TOL_FLOAT32 and bf16 <= TOL_BF16
            rows.append(dict(block=name, case=f"{cin}->{cout} k{k} s{stride} g{groups}", float32=float32,
                             bf16=bf16, ok=ok))
    return rows


def synthetic_batches(arch: str, batch: int, device: torch.device, memory_format):
    spec = get_arch_spec(arch)
    images, labels = make_synthetic(4 * batch, spec.input_size, spec.num_classes, seed=0, split="train")
    images = ((images.float() / 255 - 0.5) / 0.5).to(device).contiguous(memory_format=memory_format)
    return images, labels.to(device), spec


def train_run(arch: str, block_type: str, steps: int, batch: int, compile_model: bool, device: torch.device,
              channels_last: bool) -> Dict[str, Any]:
    """(b) + (c) one training run, its deploy equality, throughput and peak memory."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images, labels, spec = synthetic_batches(arch, batch, device, memory_format)
    torch.manual_seed(0)
    model = build_model(arch, block_type).to(device=device, memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    step_model = torch.compile(model) if compile_model else model
    loss_fn = nn.CrossEntropyLoss()
    chunks = [(images[i:i + batch], labels[i:i + batch]) for i in range(0, len(images), batch)]
    warmup = min(3, max(steps - 1, 0))
    losses: List[float] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start, timed = time.perf_counter(), 0
    for step in range(steps + warmup):
        if step == warmup:
            synchronize(device)
            start, timed = time.perf_counter(), 0
        x, y = chunks[step % len(chunks)]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(step_model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        timed += len(x)
    synchronize(device)
    images_per_sec = timed / max(time.perf_counter() - start, 1e-9)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    model.eval()
    x = images[:batch]
    with torch.no_grad():
        expected = model(x).float()
        deployed = acnet_switch_to_deploy(copy.deepcopy(model))
        target = build_model(arch, block_type, deploy=True).to(device=device, memory_format=memory_format)
        target.load_state_dict(deployed.state_dict(), strict=True)
        deploy_error = relative(target.eval()(x), expected)
    first, last = sum(losses[:3]) / len(losses[:3]), sum(losses[-3:]) / len(losses[-3:])
    learned = last < first or steps < 20  # a smoke run is too short to require learning
    return dict(arch=arch, block=block_type, compile=compile_model, steps=steps, batch=batch,
                images_per_sec=images_per_sec, peak_memory_bytes=peak, first_loss=first, last_loss=last,
                deploy_error=deploy_error, ok=deploy_error <= TOL_DEPLOY and learned and all(map(_finite, losses)))


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cost_table(runs: List[Dict[str, Any]]) -> str:
    lines = ["(c) eager training, AMP bf16: images/s and peak memory (MiB), ratios to base",
             f"{'arch':<8} {'block':<6} {'images/s':>10} {'x base':>7} {'peak MiB':>9} {'x base':>7}"]
    for run in runs:
        if run["compile"]:
            continue
        base = next(r for r in runs if r["arch"] == run["arch"] and r["block"] == "base" and not r["compile"])
        mem = run["peak_memory_bytes"]
        mem_cells = (f"{mem / 2**20:>9.0f} {mem / base['peak_memory_bytes']:>7.3f}" if mem else f"{'-':>9} {'-':>7}")
        lines.append(f"{run['arch']:<8} {run['block']:<6} {run['images_per_sec']:>10.1f} "
                     f"{run['images_per_sec'] / base['images_per_sec']:>7.3f} {mem_cells}")
    return "\n".join(lines)


def decode_check(device: torch.device, images: int, batch: int, workers: int) -> Dict[str, Any]:
    """(d) decode="cpu" vs decode="gpu" on realistic JPEGs: images/s and batch agreement."""
    from bench_data import write_imagenet_like  # benchmarks/ is this script's folder

    level = 1 / 255 / min(IMAGENET_STD)
    rates: Dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = write_imagenet_like(Path(scratch), images, distinct=min(96, images))
        evaluated = {}
        for mode in ("cpu", "gpu"):
            train, val = create_imagefolder_loaders(root, batch, batch, rank=0, world_size=1, device=device,
                                                    workers=workers, seed=0, decode=mode)
            per_epoch = []
            for epoch in range(3):  # epoch 0 starts the workers and warms the decoder: not timed
                train.set_epoch(epoch)
                synchronize(device)
                start, count = time.perf_counter(), 0
                for x, y in train:
                    to_device(train, x, device, torch.channels_last)
                    count += len(y)
                synchronize(device)
                per_epoch.append(count / (time.perf_counter() - start))
            rates[mode] = statistics.median(per_epoch[1:])
            evaluated[mode] = torch.cat([to_device(val, x, device).cpu() for x, _ in val])
    difference = (evaluated["cpu"] - evaluated["gpu"]).abs()
    max_levels, mean_levels = difference.max().item() / level, difference.mean().item() / level
    return dict(images=images, batch=batch, workers=workers, cpu_images_per_sec=rates["cpu"],
                gpu_images_per_sec=rates["gpu"], faster=max(rates, key=rates.get),
                max_diff_levels=max_levels, mean_diff_levels=mean_levels, ok=mean_levels <= 2.0)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    parser.add_argument("--steps", type=int, default=200, help="timed training steps per eager run (default 200)")
    parser.add_argument("--compile-steps", type=int, default=30, help="steps per torch.compile run (default 30)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile runs")
    parser.add_argument("--batch", type=int, help="batch for every arch (default 128 at 32x32, 32 at 224x224)")
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS, metavar="ARCH")
    parser.add_argument("--output", default="gpu_check.json", help="JSON results (default gpu_check.json)")
    parser.add_argument("--decode-images", type=int,
                        help="(d) training JPEGs to write and decode (default 1024 on CUDA, 16 on CPU)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="(d) loader workers of the CPU decoding mode (default min(8, cores))")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.compile_steps < 1 or (args.batch is not None and args.batch < 2):
        parser.error("--steps and --compile-steps must be >= 1, --batch >= 2")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check.py: error: no CUDA device (torch.cuda.is_available() is False); run it on a machine "
              "with a GPU, or pass --device cpu for a smoke run", file=sys.stderr)
        return 2
    if device.type == "cuda":  # exact float32 comparisons: no TF32 in the checks
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    began = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"torch {torch.__version__} on {name}", flush=True)

    blocks = check_blocks(device)
    print("(a) block equivalence (relative max error): float32 <= 1e-5, bf16 autocast <= 2e-2")
    for row in blocks:
        print(f"  {row['block']:<6} {row['case']:<18} float32 {row['float32']:.2e}  bf16 {row['bf16']:.2e}  "
              f"{'ok' if row['ok'] else 'FAIL'}", flush=True)

    runs = []
    print("(b) training on the synthetic set, AMP bf16, channels_last; deploy vs training form <= 1e-4")
    for arch in args.archs:
        batch = args.batch or DEFAULT_BATCH[get_arch_spec(arch).input_size]
        for compile_model in (False,) if args.no_compile else (False, True):
            for block_type in BLOCK_REGISTRY:
                if not takes_any_conv(arch, block_type):
                    print(f"  {arch:<7} {block_type:<6} skipped: the block type fits no conv of {arch}", flush=True)
                    continue
                steps = args.compile_steps if compile_model else args.steps
                run = train_run(arch, block_type, steps, batch, compile_model, device, channels_last=True)
                runs.append(run)
                print(f"  {arch:<7} {block_type:<6} {'compiled' if compile_model else 'eager':<8} {steps} steps: "
                      f"loss {run['first_loss']:.3f} -> {run['last_loss']:.3f}, deploy error "
                      f"{run['deploy_error']:.2e}  {'ok' if run['ok'] else 'FAIL'}", flush=True)
    print(cost_table(runs))
    images = args.decode_images or (1024 if device.type == "cuda" else 16)
    decode = decode_check(device, images, min(128, images), args.workers)
    print(f"(d) ImageNet decoding, {images} JPEGs, batch {decode['batch']}, up to normalised batches on "
          f"{device}: cpu ({args.workers} workers) {decode['cpu_images_per_sec']:.0f} images/s, gpu (nvJPEG) "
          f"{decode['gpu_images_per_sec']:.0f} images/s; eval batches differ by {decode['mean_diff_levels']:.3f} "
          f"uint8 levels on average, {decode['max_diff_levels']:.1f} at most  {'ok' if decode['ok'] else 'FAIL'}",
          flush=True)
    ok = all(r["ok"] for r in blocks) and all(r["ok"] for r in runs) and decode["ok"]
    seconds = time.perf_counter() - began
    record = dict(torch=torch.__version__, device=name, seconds=seconds, ok=ok, blocks=blocks, runs=runs,
                  decode=decode)
    with atomic_open(args.output) as handle:
        json.dump(record, handle, indent=1)
    print(f"{'all checks passed' if ok else 'SOME CHECKS FAILED'} in {seconds:.0f} s; results in {args.output}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
