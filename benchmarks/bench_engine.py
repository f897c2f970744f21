#!/usr/bin/env python
"""Engine overhead: end-to-end training throughput of do_acnet.py vs the raw model step.

For each block type, alternately (to share the machine's noise fairly) and ``--repeats`` times:

* engine: ``do_acnet.py -a ARCH -b BLOCK --dataset synthetic`` in a subprocess; images/s is
  ``train_images_per_sec`` from its ``summary.json`` (training loop only: data, forward, loss,
  backward, SGD step, schedule, device-side metrics, progress reads);
* raw: a subprocess running the bare step (forward, cross-entropy, backward, SGD step) on one fixed
  pre-made batch of the same size, the same number of iterations, timed the same way.

The table gives medians and ``overhead = 1 - engine / raw`` (target <= 10%). Run from the repository
root:  ``python benchmarks/bench_engine.py --quick``  (CUDA: ``--device cuda``, adds bf16 autocast and
channels_last as the engine does; ``--compile`` to compile both). ``--in-process`` alternates engine
epochs and bare-step loops inside one process instead (CPU), which a loaded machine disturbs less.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def raw_step_throughput(arch: str, block: str, batch: int, iterations: int, device: str, compile_model: bool) -> float:
    """Images/s of the bare training step on a fixed batch (run inside the worker subprocess)."""
    import torch

    sys.path.insert(0, str(ROOT))
    import constructor
    from train_configs import get_recipe
    from utils.engine.optim import make_sgd

    dev = torch.device("cuda" if device == "cuda" else "cpu")
    on_cuda = dev.type == "cuda"
    recipe = get_recipe(arch)
    kwargs = {"gamma_init": recipe.gamma_init} if block == "acb" else {}
    spec = constructor.get_arch_spec(arch)
    torch.manual_seed(0)
    model = constructor.build_model(arch, block, **kwargs).to(dev)
    fmt = torch.channels_last if on_cuda else torch.contiguous_format
    model = model.to(memory_format=fmt)
    step_model = torch.compile(model) if compile_model else model
    optimizer = make_sgd(model, 1e-4, recipe.weight_decay, momentum=recipe.momentum)  # the engine's SGD
    images = torch.randn(batch, 3, spec.input_size, spec.input_size, device=dev).contiguous(memory_format=fmt)
    labels = torch.randint(0, spec.num_classes, (batch,), device=dev)
    model.train()
    start = time.perf_counter()
    for _ in range(iterations):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=on_cuda):
            logits = step_model(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if on_cuda:
        torch.cuda.synchronize()
    return batch * iterations / (time.perf_counter() - start)


def engine_throughput(arch: str, block: str, batch: int, iterations: int, epochs: int, device: str,
                      compile_model: bool, workdir: Path) -> float:
    out = workdir / f"run_{block}_{time.monotonic_ns()}"
    cmd = [sys.executable, str(ROOT / "do_acnet.py"), "-a", arch, "-b", block, "--dataset", "synthetic",
           "--epochs", str(epochs), "--batch-size", str(batch), "--synthetic-num-train", str(batch * iterations),
           "--synthetic-num-val", str(batch), "--output-dir", str(out), "--no-progress", "--device", device,
           "--val-every", str(10 ** 6), "--print-freq", "50"]
    if compile_model:
        cmd.append("--compile")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"do_acnet.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads(next(out.glob("*/summary.json")).read_text())
    return float(summary["train_images_per_sec"])


def interleaved_in_process(arch: str, block: str, batch: int, iterations: int, rounds: int) -> tuple[list, list]:
    """Engine epochs and bare-step loops alternated in ONE process on the same model (CPU).

    Less exposed to a shared machine's drifting load than separate processes: each round runs one
    engine epoch (``Trainer._train_one_epoch``: synthetic loader, step, schedule, device-side metrics,
    progress reads) and then the same number of bare steps on a fixed batch.
    Returns (engine images/s per round, raw images/s per round).
    """
    import torch

    sys.path.insert(0, str(ROOT))
    import constructor
    import data
    from train_configs import get_recipe
    from utils.rundir.checkpoint import ExperimentPaths
    from utils.engine.distributed import DistContext
    from utils.engine.trainer import Trainer, TrainOptions
    from utils.engine.optim import make_sgd
    from utils.rundir.log import RunLog, TensorBoard

    recipe = get_recipe(arch, epochs=rounds + 1, batch_size=batch)
    spec = constructor.get_arch_spec(arch)
    kwargs = {"gamma_init": recipe.gamma_init} if block == "acb" else {}
    torch.manual_seed(0)
    model = constructor.build_model(arch, block, **kwargs)
    train_loader, eval_loader = data.create_loaders("synthetic", None, batch, image_size=spec.input_size,
                                                    num_classes=spec.num_classes, num_train=batch * iterations,
                                                    num_val=batch)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        paths = ExperimentPaths(Path(tmp))
        trainer = Trainer(model, train_loader, eval_loader, recipe, ctx, paths, RunLog(paths.log, enabled=False),
                          TrainOptions(progress_bar=False))
        trainer._step_model = trainer._build_step_model()
        criterion = torch.nn.CrossEntropyLoss()
        optimizer = make_sgd(model, 1e-4, recipe.weight_decay, momentum=recipe.momentum)  # the engine's SGD
        images, labels = next(iter(train_loader))
        tb = TensorBoard(paths.tensorboard, enabled=False)
        trainer._train_one_epoch(0, criterion, tb)  # warm-up, not timed
        engine, raw = [], []
        for epoch in range(1, rounds + 1):
            _, seconds, seen = trainer._train_one_epoch(epoch, criterion, tb)
            engine.append(seen / seconds)
            start = time.perf_counter()
            for _ in range(iterations):
                loss = criterion(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            raw.append(batch * iterations / (time.perf_counter() - start))
    return engine, raw


def run_raw_worker(args: argparse.Namespace) -> float:
    cmd = [sys.executable, __file__, "--raw-worker", "--arch", args.arch, "--batch", str(args.batch),
           "--iterations", str(args.iterations * args.epochs), "--device", args.device, "--blocks", args.block_one]
    if args.compile:
        cmd.append("--compile")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"raw worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="src56")
    parser.add_argument("--blocks", default="base,acb", help="comma-separated block types")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=30, help="iterations per epoch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--quick", action="store_true", help="batch 64, 8 iterations x 1 epoch, 3 repeats")
    parser.add_argument("--in-process", action="store_true",
                        help="CPU: alternate engine epochs and bare-step loops in one process (robust to load)")
    parser.add_argument("--raw-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_worker:
        print(raw_step_throughput(args.arch, args.blocks, args.batch, args.iterations, args.device, args.compile))
        return
    if args.quick:
        args.batch, args.iterations, args.epochs, args.repeats = 64, 8, 1, 3
    blocks = [b.strip() for b in args.blocks.split(",") if b.strip()]
    if args.in_process:
        print(f"engine loop vs bare step, one process, {args.repeats} alternated rounds of {args.iterations} it, "
              f"{args.arch} batch {args.batch}, CPU")
        print("| block | engine img/s (median) | raw step img/s (median) | engine/raw (median of rounds) | overhead |")
        print("|-------|---------------------:|------------------------:|------------------------------:|---------:|")
        for block in blocks:
            engine, raw = interleaved_in_process(args.arch, block, args.batch, args.iterations, args.repeats)
            ratio = statistics.median(e / r for e, r in zip(engine, raw))
            print(f"| {block} | {statistics.median(engine):.1f} | {statistics.median(raw):.1f} | {ratio:.3f} | "
                  f"{100 * (1 - ratio):.1f}% |", flush=True)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_engine_") as tmp:
        for block in blocks:
            args.block_one = block
            engine, raw = [], []
            for _ in range(args.repeats):  # alternate: engine, raw, engine, raw, ...
                engine.append(engine_throughput(args.arch, block, args.batch, args.iterations, args.epochs,
                                                args.device, args.compile, Path(tmp)))
                raw.append(run_raw_worker(args))
            e, r = statistics.median(engine), statistics.median(raw)
            rows.append((block, e, r, e / r, 1 - e / r, engine, raw))
            print(f"{block}: engine {[round(x, 1) for x in engine]} img/s, raw {[round(x, 1) for x in raw]} img/s",
                  flush=True)
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(f"\nengine overhead: {args.arch}, batch {args.batch}, {args.iterations} it x {args.epochs} epoch(s), "
          f"{args.repeats} alternated repeats, device {args.device}{' +compile' if args.compile else ''}, "
          f"threads {threads}")
    print(f"| block | engine img/s (median) | raw step img/s (median) | engine/raw | overhead | target |")
    print(f"|-------|---------------------:|------------------------:|-----------:|---------:|:------:|")
    for block, e, r, ratio, overhead, _, _ in rows:
        status = "ok" if overhead <= 0.10 else "MISS"
        print(f"| {block} | {e:.1f} | {r:.1f} | {ratio:.3f} | {100 * overhead:.1f}% | <=10% {status} |")


if __name__ == "__main__":
    main()
