"""Throughput of every architecture's training and deploy forms, per block type; prints tables.

Training step = forward, cross-entropy, backward, SGD step (momentum 0.9), on random images.
Inference = eval-mode forward under ``torch.inference_mode``. Variants:

* training: ``base``, ``acb``, ``dbb``, ``orepa`` training forms;
* inference: ``base`` deploy model, ``acb`` training form (eval mode, unconverted), ``acb``
  converted with ``acnet.acnet_switch_to_deploy`` (and ``dbb``, ``orepa`` converted).

Timings on a shared machine are noisy, so every measurement round runs all variants of an
architecture one after the other (alternated, the order rotating each round), and the tables give
the median throughput over rounds and the median over rounds of each ratio to the baseline measured
in the same round. Targets (CPU): converted / base deploy >= 0.97 (the deploy model costs nothing
extra), and on the CIFAR archs acb / base training >= 0.55, orepa / base training >= 0.85 and
orepa / dbb training >= 2.5 (online re-parameterization: one conv and one BN per block).

    python benchmarks/bench_archs.py --quick            # 3 rounds of 1 step, all default archs
    python benchmarks/bench_archs.py --archs src56 --rounds 9 --steps 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acnet import acnet_switch_to_deploy  # noqa: E402
from constructor import build_model, get_arch_spec, list_archs  # noqa: E402

#: (arch, batch size) of the default table: the CIFAR archs at batch 128 (WRN-16-8 at 32) and
#: ResNet-18 at batch 16 on 224x224.
DEFAULT_BATCHES = {"cfqkbnc": 128, "vc": 128, "src56": 128, "src110": 128, "wrnc16plain": 32, "sres18": 16}
TRAIN_VARIANTS = ("base", "acb", "dbb", "orepa")
INFER_VARIANTS = ("base deploy", "acb train form", "acb deploy", "dbb deploy", "orepa deploy")
CONVERTED_TYPES = ("acb", "dbb", "orepa")
TARGET_DEPLOY_RATIO = 0.97
TARGET_ACB_TRAIN_RATIO = 0.55
TARGET_OREPA_TRAIN_RATIO = 0.85
TARGET_OREPA_OVER_DBB = 2.5


@dataclass
class Measurement:
    """Per-variant list of images/s, one per round."""

    rates: Dict[str, List[float]]

    def median(self, variant: str) -> float:
        return statistics.median(self.rates[variant])

    def paired_ratio(self, variant: str, baseline: str) -> float:
        """Median over rounds of ``rate(variant) / rate(baseline)`` from the same round."""
        return statistics.median(v / b for v, b in zip(self.rates[variant], self.rates[baseline]))


def count_macs(model: nn.Module, input_size: int) -> int:
    """Multiply-accumulates of one image through ``model``'s convs and linears (shape-only, meta device)."""
    total = 0

    def hook(module: nn.Module, inputs, output) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kernel_h, kernel_w = module.kernel_size
            total += output.numel() * module.in_channels // module.groups * kernel_h * kernel_w
        else:
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(torch.empty(1, 3, input_size, input_size, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return total


def deploy_cost_table(archs: Sequence[str]) -> str:
    """Parameters and MACs/image of each block type's converted model next to the base deploy model's."""
    names = ("base",) + CONVERTED_TYPES
    lines = ["Deploy models (converted from each training form): parameters and MACs per image",
             f"{'arch':<12} " + " ".join(f"{'params ' + n:>13}" for n in names) + " "
             + " ".join(f"{'GMACs ' + n:>11}" for n in names)]
    for arch in archs:
        size = get_arch_spec(arch).input_size
        models = [build_model(arch, "base", deploy=True)] + [
            acnet_switch_to_deploy(build_model(arch, block_type)).to("meta") for block_type in CONVERTED_TYPES
        ]
        models[0] = models[0].to("meta")
        params = [sum(p.numel() for p in m.parameters()) for m in models]
        macs = [count_macs(m, size) / 1e9 for m in models]
        lines.append(f"{arch:<12} " + " ".join(f"{p:>13,}" for p in params) + " "
                     + " ".join(f"{m:>11.4f}" for m in macs))
    return "\n".join(lines)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images), labels).backward()
        optimizer.step()

    return step


def make_infer_step(model: nn.Module, images: torch.Tensor) -> Callable[[], None]:
    model.eval()

    def step() -> None:
        with torch.inference_mode():
            model(images)

    return step


def measure(steps: Dict[str, Callable[[], None]], batch: int, rounds: int, steps_per_round: int, warmup: int,
            device: torch.device) -> Measurement:
    """Alternate the variants (rotating order) for ``rounds`` rounds of ``steps_per_round`` steps each."""
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    synchronize(device)
    rates: Dict[str, List[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps_per_round):
                steps[name]()
            synchronize(device)
            rates[name].append(batch * steps_per_round / (time.perf_counter() - start))
    return Measurement(rates)


def bench_arch(arch: str, batch: int, args: argparse.Namespace, device: torch.device) -> Dict[str, Measurement]:
    spec = get_arch_spec(arch)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, spec.input_size, spec.input_size, generator=generator).to(device)
    labels = torch.randint(0, spec.num_classes, (batch,), generator=generator).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    images = images.contiguous(memory_format=memory_format)

    def prepared(model: nn.Module) -> nn.Module:
        return model.to(device=device, memory_format=memory_format)

    torch.manual_seed(0)
    train_steps = {t: make_train_step(prepared(build_model(arch, t)), images, labels) for t in TRAIN_VARIANTS}
    train = measure(train_steps, batch, args.rounds, args.steps, args.warmup, device)
    del train_steps

    acb = prepared(build_model(arch, "acb"))
    infer_models = {
        "base deploy": prepared(build_model(arch, "base", deploy=True)),
        "acb train form": acb,
        "acb deploy": prepared(acnet_switch_to_deploy(build_model(arch, "acb"))),
        "dbb deploy": prepared(acnet_switch_to_deploy(build_model(arch, "dbb"))),
        "orepa deploy": prepared(acnet_switch_to_deploy(build_model(arch, "orepa"))),
    }
    infer_steps = {name: make_infer_step(model, images) for name, model in infer_models.items()}
    infer = measure(infer_steps, batch, args.rounds, args.steps, args.warmup, device)
    return {"train": train, "infer": infer}


def format_tables(results: Dict[str, Dict[str, Measurement]], batches: Dict[str, int]) -> str:
    lines = ["Training step (forward + loss + backward + SGD step), images/s (median), ratio = paired median",
             f"{'arch':<12} {'batch':>5} {'base':>9} {'acb':>9} {'dbb':>9} {'orepa':>9} {'acb/base':>9} "
             f"{'dbb/base':>9} {'orepa/b':>9} {'orepa/dbb':>9}  target"]
    for arch, result in results.items():
        m = results[arch]["train"]
        acb_ratio, orepa_ratio = m.paired_ratio("acb", "base"), m.paired_ratio("orepa", "base")
        orepa_over_dbb = m.paired_ratio("orepa", "dbb")
        cifar = get_arch_spec(arch).dataset == "cifar10"
        verdict = "-"
        if cifar:
            ok = (acb_ratio >= TARGET_ACB_TRAIN_RATIO and orepa_ratio >= TARGET_OREPA_TRAIN_RATIO
                  and orepa_over_dbb >= TARGET_OREPA_OVER_DBB)
            verdict = (("ok" if ok else "BELOW") + f" (acb >= {TARGET_ACB_TRAIN_RATIO}, orepa >= "
                       f"{TARGET_OREPA_TRAIN_RATIO}, orepa/dbb >= {TARGET_OREPA_OVER_DBB})")
        lines.append(
            f"{arch:<12} {batches[arch]:>5} {m.median('base'):>9.1f} {m.median('acb'):>9.1f} {m.median('dbb'):>9.1f} "
            f"{m.median('orepa'):>9.1f} {acb_ratio:>9.3f} {m.paired_ratio('dbb', 'base'):>9.3f} "
            f"{orepa_ratio:>9.3f} {orepa_over_dbb:>9.3f}  {verdict}"
        )
    lines += ["", "Inference (eval forward), images/s (median), ratios to base deploy = paired median",
              f"{'arch':<12} {'batch':>5} {'base dep':>9} {'acb trn':>9} {'acb dep':>9} {'dbb dep':>9} {'orepa dep':>9} "
              f"{'acbdep/b':>9} {'dbbdep/b':>9} {'orepdep/b':>9} {'acbtrn/b':>9}  target"]
    for arch in results:
        m = results[arch]["infer"]
        acb_deploy = m.paired_ratio("acb deploy", "base deploy")
        dbb_deploy = m.paired_ratio("dbb deploy", "base deploy")
        orepa_deploy = m.paired_ratio("orepa deploy", "base deploy")
        ok = min(acb_deploy, dbb_deploy, orepa_deploy) >= TARGET_DEPLOY_RATIO
        lines.append(
            f"{arch:<12} {batches[arch]:>5} {m.median('base deploy'):>9.1f} {m.median('acb train form'):>9.1f} "
            f"{m.median('acb deploy'):>9.1f} {m.median('dbb deploy'):>9.1f} {m.median('orepa deploy'):>9.1f} "
            f"{acb_deploy:>9.3f} {dbb_deploy:>9.3f} {orepa_deploy:>9.3f} "
            f"{m.paired_ratio('acb train form', 'base deploy'):>9.3f}  "
            f"{'ok' if ok else 'BELOW'} (deploy >= {TARGET_DEPLOY_RATIO})"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=list(DEFAULT_BATCHES), metavar="ARCH",
                        help=f"architectures (default: {' '.join(DEFAULT_BATCHES)}; any of {', '.join(list_archs())})")
    parser.add_argument("--batch", type=int, default=None, help="batch size for every arch (default: per-arch table)")
    parser.add_argument("--rounds", type=int, default=7, help="alternated measurement rounds (median over them)")
    parser.add_argument("--steps", type=int, default=2, help="steps timed per variant per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 1 step after 1 warm-up step")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup = 3, 1, 1
    for name in ("rounds", "steps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 0 or (args.batch is not None and args.batch < 1):
        parser.error("--warmup must be >= 0 and --batch >= 1")
    unknown = [a for a in args.archs if a not in list_archs()]
    if unknown:
        parser.error(f"unknown architecture(s) {unknown}; valid: {', '.join(list_archs())}")
    try:
        args.device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"bad --device {args.device!r}: {error}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available; use --device cpu")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = {arch: args.batch or DEFAULT_BATCHES.get(arch, 32) for arch in args.archs}
    print(f"torch {torch.__version__}, device {args.device}, {args.threads} thread(s), {args.rounds} rounds x "
          f"{args.steps} step(s), warm-up {args.warmup}{', channels_last' if args.channels_last else ''}", flush=True)
    results = {}
    for arch in args.archs:
        start = time.perf_counter()
        results[arch] = bench_arch(arch, batches[arch], args, args.device)
        print(f"  {arch} measured in {time.perf_counter() - start:.0f} s", flush=True)
        if len(args.archs) > 1:  # partial results first: a long run that is stopped still reports
            print(format_tables({arch: results[arch]}, batches), flush=True)
    print()
    print(format_tables(results, batches))
    print()
    print(deploy_cost_table(args.archs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
