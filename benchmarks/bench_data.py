"""Input-pipeline throughput: the CIFAR fast path, and the ImageNet pipeline against torchvision's.

    python benchmarks/bench_data.py                 # CIFAR: 50,000 images, 7 alternated rounds
    python benchmarks/bench_data.py --quick         # smaller set, 3 rounds (a few seconds)
    python benchmarks/bench_data.py --data-dir cifar10_data   # the real files, if present
    python benchmarks/bench_data.py --device cuda   # the fast path on the GPU (+ a CPU check)
    python benchmarks/bench_data.py --imagenet      # ImageNet: writes realistic JPEGs itself (< 2 min)
    python benchmarks/bench_data.py --imagenet-dir imagenet_data   # ImageNet: your files
    python benchmarks/bench_data.py --imagenet --write-imagenet DIR   # keep the written folder

CIFAR pipelines, all producing augmented, normalised training batches of 128 (pad 4 + random crop
32 + flip, mean 0.5 / std 0.5):

* ``fast``: ``data.create_loaders``'s CIFAR path (uint8 set on the device, batched augmentation);
* ``tv-0w`` / ``tv-2w``: what the original ACNet code does, a ``DataLoader`` (0 or 2 workers)
  over a dataset returning PIL images through torchvision's ``RandomCrop(32, padding=4)``,
  ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` (torchvision's ``CIFAR10.__getitem__``).

ImageNet pipelines (``--imagenet`` / ``--imagenet-dir``), batches of ``--batch`` 224x224 crops:

* ``ref``: torchvision's reference, what ``data/imagenet.py`` did before: ``ImageFolder`` with PIL
  decoding, ``RandomResizedCrop(224)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``
  in the workers (float32 batches); evaluation ``Resize(256)``, ``CenterCrop(224)``;
* ``new``: ``data.create_loaders("imagenet", decode="cpu")``: ``torchvision.io`` decoding and
  uint8 crops in the workers, uint8 batches (the device-side conversion, float32 + normalisation
  + channels_last once per batch, is timed apart: on a GPU it is not CPU work);
* ``gpu`` (``--device cuda`` only): ``decode="gpu"``, nvJPEG decoding of each batch on the GPU
  (its rows include ``data.to_device``, where the decoding happens).

each with 0 and ``--workers`` worker processes; ``per core`` divides images/s by the processes
that decode (1 with 0 workers, else the worker count). ``--write-imagenet`` mode writes
``--imagenet-images`` JPEGs (quality 90, ImageNet's usual sizes, mostly 500x375, about 90 KB:
smooth colour fields, shapes and grain) into 8 class folders.

The machine may be shared, so the pipelines are measured in alternated rounds (the order rotates
every round); the tables give the median images/s and the median of the per-round ratios to the
0-worker reference. CIFAR: worker start-up and the first batch are excluded from timing;
ImageNet: a whole epoch is timed per round, after one unrecorded round that starts the workers.
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import ShardedBatchSampler, create_loaders, to_device  # noqa: E402
from data.cifar import load_cifar  # noqa: E402
from data.imagenet import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
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
        images = to_device(loader, images, device)
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


# ------------------------------------------------------------------------------------- ImageNet
#: (height, width) of the written images and their shares, ImageNet's common sizes
IMAGENET_SIZES = (((375, 500), 0.5), ((500, 375), 0.2), ((333, 500), 0.15), ((500, 500), 0.1),
                  ((600, 800), 0.05))


def natural_image(height: int, width: int, rng: np.random.Generator) -> Image.Image:
    """A photo-like RGB image: smooth colour fields at four scales, a few flat shapes, grain.

    At quality 90 a 500x375 one is about 90 KB, close to ImageNet's JPEGs (about 110 KB on
    average), so decoding costs about what it costs on the real set.
    """
    from PIL import ImageDraw, ImageFilter

    field = np.zeros((height, width, 3))
    for cells, amplitude in ((3, 70.0), (12, 35.0), (48, 18.0), (160, 22.0), (250, 45.0)):
        small = rng.normal(0, 1, (max(2, cells * height // max(height, width)), cells, 3))
        small = ((small - small.min()) / (np.ptp(small) + 1e-9) * 255).astype(np.uint8)
        upsampled = Image.fromarray(small).resize((width, height), Image.BICUBIC)
        field += (np.asarray(upsampled, dtype=np.float64) - 127.5) / 127.5 * amplitude
    field += rng.integers(60, 200, 3)
    image = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 12))):
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    array = np.asarray(image.filter(ImageFilter.SMOOTH), dtype=np.float64)
    array += rng.normal(0, 17, array.shape)
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))


def write_imagenet_like(root: Path, num_images: int, *, num_classes: int = 8, distinct: int = 96,
                        seed: int = 0) -> Path:
    """``root/{train,val}/n0000000k/*.JPEG``: ``num_images`` training and ``num_images // 2``
    validation files; ``distinct`` different pictures (generating one takes ~0.2 s), reused."""
    rng = np.random.default_rng(seed)
    sizes, shares = zip(*IMAGENET_SIZES)
    encoded = []
    for _ in range(min(distinct, num_images)):
        height, width = sizes[rng.choice(len(sizes), p=shares)]
        buffer = io.BytesIO()
        natural_image(height, width, rng).save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    for split, count in (("train", num_images), ("val", max(num_classes, num_images // 2))):
        for index in range(count):
            folder = root / split / f"n{index % num_classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{split}_{index:06d}.JPEG").write_bytes(encoded[index % len(encoded)])
    return root


def reference_loader(root: Path, batch: int, workers: int, train: bool) -> DataLoader:
    """torchvision's reference ImageNet pipeline (PIL, float32 transforms in the workers)."""
    from torchvision import datasets, transforms

    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if train:
        transform = transforms.Compose([transforms.RandomResizedCrop(224),
                                        transforms.RandomHorizontalFlip(),
                                        transforms.ToTensor(), normalize])
    else:
        transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224),
                                        transforms.ToTensor(), normalize])
    dataset = datasets.ImageFolder(str(root / ("train" if train else "val")), transform=transform)
    sampler = ShardedBatchSampler(len(dataset), batch, train=train)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                      persistent_workers=workers > 0)


def imagenet_benchmark(root: Path, batch: int, workers: int, rounds: int,
                       device: torch.device) -> None:
    """Alternated rounds of the reference and new ImageNet pipelines; prints the table."""
    pipelines: Dict[str, tuple] = {}
    worker_counts = sorted({0, workers})
    for split in ("train", "eval"):
        train = split == "train"
        for count in worker_counts:
            new_train, new_eval = create_loaders("imagenet", root, batch, workers=count,
                                                 device=device)
            new = new_train if train else new_eval
            pipelines[f"ref {split} {count}w"] = (reference_loader(root, batch, count, train),
                                                  count)
            pipelines[f"new {split} {count}w"] = (new, count)
            if device.type == "cuda":
                gpu_train, gpu_eval = create_loaders("imagenet", root, batch, workers=count,
                                                     device=device, decode="gpu")
                pipelines[f"gpu {split} {count}w"] = (gpu_train if train else gpu_eval, count)
    names = list(pipelines)
    results: Dict[str, List[float]] = {name: [] for name in names}
    for round_index in range(rounds + 1):  # round 0 starts the persistent workers: not recorded
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in order:
            loader, _ = pipelines[name]
            rate = epoch_rate(loader, device, round_index, name.startswith("gpu"))
            if round_index:
                results[name].append(rate)

    images = sum(1 for _ in (root / "train").rglob("*.JPEG"))
    print(f"\nImageNet pipelines ({root}: {images} training images; batch {batch} of 224x224; "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) in the main process; "
          f"device {device}; {rounds} alternated rounds)\n")
    print("| pipeline | median images/s | per core | min | max | / ref 0w | / ref, same workers |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in names:
        values, workers_used = results[name], pipelines[name][1]
        split = name.split()[1]
        base = results[f"ref {split} 0w"]
        ratio = statistics.median(v / b for v, b in zip(values, base))
        same_workers = results[f"ref {split} {workers_used}w"]
        per_core_ratio = statistics.median(v / b for v, b in zip(values, same_workers))
        print(f"| {name} | {statistics.median(values):,.0f} | "
              f"{statistics.median(values) / max(1, workers_used):,.0f} | {min(values):,.0f} | "
              f"{max(values):,.0f} | {ratio:.2f}x | {per_core_ratio:.2f}x |")
    uint8_bytes, float_bytes = batch * 3 * 224 * 224, batch * 3 * 224 * 224 * 4
    print(f"\nbytes per batch sent by the workers, pinned and copied to the device: new "
          f"{uint8_bytes / 2**20:.1f} MiB (uint8), ref {float_bytes / 2**20:.1f} MiB (float32)")
    new_loader = pipelines["new train 0w"][0]
    uint8_batch = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)
    seconds = []
    for _ in range(5):
        start = time.perf_counter()
        to_device(new_loader, uint8_batch, device, torch.channels_last)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    print(f"device_transform of a uint8 batch on {device} (copy, float32, normalise, "
          f"channels_last; not in the rows above): {statistics.median(seconds) * 1e3:.1f} ms "
          f"per batch of {batch}")


def epoch_rate(loader, device: torch.device, epoch: int, on_device: bool) -> float:
    """Images/s of one whole epoch of ``loader``, from ``iter()`` to the last batch.

    ``on_device`` (GPU decoding) includes ``data.to_device``, where that mode decodes; the other
    rows stop at the batch the workers deliver (their device-side cost is printed apart).
    """
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    count, start = 0, time.perf_counter()
    for images, labels in loader:
        if on_device:
            images = to_device(loader, images, device)
        count += len(labels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return count / (time.perf_counter() - start)


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small set, 3 rounds")
    parser.add_argument("--data-dir", default="", help="CIFAR-10 root (default: random images)")
    parser.add_argument("--device", default="cpu", help="device of the fast path")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--imagenet-dir", default="", help="time the ImageNet pipelines on this root")
    parser.add_argument("--imagenet", action="store_true",
                        help="time the ImageNet pipelines on realistic JPEGs this script writes")
    parser.add_argument("--write-imagenet", default="", metavar="DIR",
                        help="with --imagenet: write the JPEG folder here and keep it")
    parser.add_argument("--imagenet-images", type=int, default=384,
                        help="training JPEGs --imagenet writes (default 384)")
    parser.add_argument("--batch", type=int, default=64, help="ImageNet batch (default 64)")
    parser.add_argument("--workers", type=int, default=2, help="ImageNet worker processes (default 2)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.imagenet or args.imagenet_dir:
        if not args.threads:
            torch.set_num_threads(1)  # per core: the 0-worker rows decode on one thread
        rounds = args.rounds or 5
        device = torch.device(args.device)
        if args.imagenet_dir:
            imagenet_benchmark(Path(args.imagenet_dir), args.batch, args.workers, rounds, device)
            return
        with tempfile.TemporaryDirectory() as scratch:
            root = Path(args.write_imagenet or scratch)
            began = time.perf_counter()
            write_imagenet_like(root, args.imagenet_images)
            print(f"wrote {args.imagenet_images} + {max(8, args.imagenet_images // 2)} JPEGs "
                  f"into {root} in {time.perf_counter() - began:.0f} s")
            imagenet_benchmark(root, args.batch, args.workers, rounds, device)
        return
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
