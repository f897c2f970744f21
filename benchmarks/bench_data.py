"""Images/s of the CIFAR fast path vs the torchvision-transform DataLoader pipeline.

    python benchmarks/bench_data.py                 # 50,000 images, 7 alternated rounds
    python benchmarks/bench_data.py --quick         # smaller set, 3 rounds (a few seconds)
    python benchmarks/bench_data.py --data-dir cifar10_data   # the real files, if present
    python benchmarks/bench_data.py --device cuda   # the fast path on the GPU (+ a CPU check)
    python benchmarks/bench_data.py --imagenet-dir imagenet_data   # also the ImageNet pipeline

Pipelines, all producing augmented, normalised training batches of 128 (pad 4 + random crop 32
+ flip, mean 0.5 / std 0.5):

* ``fast``: ``data.create_loaders``'s CIFAR path (uint8 set on the device, batched augmentation);
* ``tv-0w`` / ``tv-2w``: what the original ACNet code does, a ``DataLoader`` (0 or 2 workers)
  over a dataset returning PIL images through torchvision's ``RandomCrop(32, padding=4)``,
  ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` (torchvision's ``CIFAR10.__getitem__``).

With ``--imagenet-dir``, the ImageNet pipeline (``data.create_loaders("imagenet", ...)``: JPEG
decoding, RandomResizedCrop 224, flip) is also timed with 0 and ``--workers`` worker processes.

The machine may be shared, so the pipelines are measured in alternated rounds (the order rotates
every round); the table gives the median images/s and the median of the per-round ratios to the
0-worker torchvision pipeline. Worker start-up and the first batch are excluded from timing.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import create_loaders  # noqa: E402
from data.cifar import load_cifar  # noqa: E402
from data.tensor_loader import TensorImageLoader  # noqa: E402

BATCH = 128


class PilCifar(Dataset):
    """torchvision ``CIFAR10.__getitem__``: an HWC uint8 array -> PIL image -> transforms."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images, self.labels, self.transform = images_hwc, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def torchvision_loader(images: torch.Tensor, labels: torch.Tensor, workers: int) -> DataLoader:
    from torchvision import transforms

    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    dataset = PilCifar(images.permute(0, 2, 3, 1).contiguous().numpy(), labels.numpy(), transform)
    return DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers,
                      persistent_workers=workers > 0, drop_last=True)


def images_per_second(loader, batches: int, device: torch.device, epoch: int) -> float:
    """Steady-state throughput: the first batch (start-up, worker spawn) is not timed."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    iterator = iter(loader)
    next(iterator)
    count = 0
    start = time.perf_counter()
    for _ in range(batches):
        images, labels = next(iterator)
        images = images.to(device, non_blocking=True)
        count += len(images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    del iterator
    return count / elapsed


def load_images(data_dir: str, count: int):
    if data_dir:
        split = load_cifar("cifar10", data_dir, train=True, download=False)
        return split.images[:count], split.labels[:count], f"CIFAR-10 files in {data_dir}"
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (count,), generator=generator)
    return images, labels, "random uint8 images of CIFAR's shape"


def check_device_matches_cpu(images: torch.Tensor, labels: torch.Tensor,
                             device: torch.device) -> bool:
    """The fast path on ``device`` yields exactly the CPU batches (same seed, epoch, rank)."""
    kwargs = dict(num_classes=10, train=True, seed=1)
    cpu = TensorImageLoader(images[:1000], labels[:1000], BATCH, **kwargs)
    dev = TensorImageLoader(images[:1000].to(device), labels[:1000].to(device), BATCH, **kwargs)
    return all(torch.equal(a.cpu(), b) and torch.equal(y.cpu(), z)
               for (a, y), (b, z) in zip(dev, cpu))


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small set, 3 rounds")
    parser.add_argument("--data-dir", default="", help="CIFAR-10 root (default: random images)")
    parser.add_argument("--device", default="cpu", help="device of the fast path")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--imagenet-dir", default="", help="also time this ImageNet root")
    parser.add_argument("--workers", type=int, default=4, help="ImageNet worker processes")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    count = 6400 if args.quick else 50000
    rounds = args.rounds or (3 if args.quick else 7)
    tv_batches = 15 if args.quick else 60
    device = torch.device(args.device)

    images, labels, source = load_images(args.data_dir, count)
    fast = TensorImageLoader(images.to(device), labels.to(device), BATCH, num_classes=10,
                             train=True)
    pipelines: Dict[str, tuple] = {
        "fast": (fast, len(fast) - 1),
        "tv-0w": (torchvision_loader(images, labels, 0), tv_batches),
        "tv-2w": (torchvision_loader(images, labels, 2), tv_batches),
    }
    if args.imagenet_dir:
        for workers in sorted({0, args.workers}):
            loader, _ = create_loaders("imagenet", args.imagenet_dir, BATCH, workers=workers)
            pipelines[f"imagenet-{workers}w"] = (loader, min(tv_batches, len(loader) - 1))
    names = list(pipelines)
    results: Dict[str, List[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in order:
            loader, batches = pipelines[name]
            results[name].append(images_per_second(loader, batches, device, round_index))

    base = results["tv-0w"]
    print(f"\nTraining-batch throughput (CIFAR rows: {source}, {count} images; batch {BATCH}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; fast path on "
          f"{device}; {rounds} alternated rounds)\n")
    print("| pipeline | median images/s | min | max | median ratio to tv-0w |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        values = results[name]
        ratio = statistics.median(v / b for v, b in zip(values, base))
        print(f"| {name} | {statistics.median(values):,.0f} | {min(values):,.0f} | "
              f"{max(values):,.0f} | {ratio:.1f}x |")
    if device.type != "cpu":
        print(f"\n{device} batches identical to CPU batches: "
              f"{check_device_matches_cpu(images, labels, device)}")


if __name__ == "__main__":
    main()
