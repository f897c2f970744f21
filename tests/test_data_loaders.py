"""The loader protocol: augmentation, determinism, DDP sharding, synthetic, ImageNet folders."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision.transforms.functional as TF
from hypothesis import given
from hypothesis import strategies as st

from data import DATASETS, DatasetArgumentError, DatasetError, ShardedBatchSampler, create_loaders
from data.augment import (CropFlip, normalize, random_crop_flip, sample_crop_flip,
                          with_zero_sentinel)
from data.cifar import load_cifar
from data.tensor_loader import TensorImageLoader
from fakedata import write_fake_cifar10, write_fake_imagefolder


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar10(root, num_train=150, num_test=37, seed=5)
    return root


def _cifar(root: Path, batch: int = 16, **kwargs):
    return create_loaders("cifar10", root, batch, download=False, **kwargs)


# ---------------------------------------------------------------------------------------------
# Augmentation maths
# ---------------------------------------------------------------------------------------------
@given(st.integers(0, 2**31 - 1), st.integers(1, 5), st.integers(0, 4), st.integers(3, 9),
       st.integers(3, 9))
def test_crop_flip_matches_torchvision_pad_crop_hflip(seed, batch, padding, height, width):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8,
                           generator=generator)
    top, left, flip = sample_crop_flip(batch, padding, generator)
    out = random_crop_flip(images, top, left, flip, padding)
    computed = CropFlip(height, width, padding)
    computed.table = None  # the per-batch index path, used for large images
    assert torch.equal(computed(with_zero_sentinel(images), top, left, flip), out)
    for b in range(batch):
        expected = TF.crop(TF.pad(images[b], [padding]), int(top[b]), int(left[b]), height, width)
        if flip[b]:
            expected = TF.hflip(expected)
        assert torch.equal(out[b], expected)


def test_crop_offsets_stay_inside_the_padded_image():
    top, left, flip = sample_crop_flip(20000, 4, torch.Generator().manual_seed(0))
    assert top.min() == 0 and top.max() == 8 and left.min() == 0 and left.max() == 8
    assert 0.45 < flip.float().mean() < 0.55


def test_normalize_is_torchvision_to_tensor_then_normalize():
    images = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = TF.normalize(images.float() / 255, mean, std)
    torch.testing.assert_close(normalize(images, mean, std), expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# CIFAR fast path: protocol, augmentation through the loader, determinism
# ---------------------------------------------------------------------------------------------
def test_loader_protocol(cifar_root):
    train, val = _cifar(cifar_root, 32, eval_batch_size=10)
    assert (len(train), len(val)) == (5, 4)
    assert (train.num_samples, val.num_samples) == (150, 37)
    assert (train.batch_size, val.batch_size) == (32, 10)
    assert train.num_classes == val.num_classes == 10 and train.image_size == 32
    sizes = []
    for images, labels in train:
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert images.shape[1:] == (3, 32, 32) and images.device.type == "cpu"
        assert -1.0 <= images.min() and images.max() <= 1.0
        sizes.append(len(labels))
    assert sizes == [32, 32, 32, 32, 22]


def test_eval_is_untouched_and_in_order(cifar_root):
    _, val = _cifar(cifar_root, 16)
    raw = load_cifar("cifar10", cifar_root, train=False, download=False)
    images = torch.cat([x for x, _ in val])
    labels = torch.cat([y for _, y in val])
    assert torch.equal(labels, raw.labels)
    torch.testing.assert_close(images, raw.images.float() / 127.5 - 1.0, rtol=0, atol=1e-6)


def test_train_images_are_crops_and_flips_of_their_sources(cifar_root):
    train, _ = _cifar(cifar_root, 50)
    train.set_epoch(3)
    raw = load_cifar("cifar10", cifar_root, train=True, download=False)
    order = train.sampler.epoch_order()
    images = torch.cat([x for x, _ in train])
    labels = torch.cat([y for _, y in train])
    assert torch.equal(labels, raw.labels[order])
    padded = TF.pad(raw.images[order], [4])
    pixels = torch.round((images + 1.0) * 127.5).to(torch.uint8)
    # every 32x32 window of each padded source, unflipped and flipped: (N, 3, 9, 9, 32, 32)
    windows = padded.unfold(2, 32, 1).unfold(3, 32, 1)
    plain = (windows == pixels[:, :, None, None]).flatten(-2).all(-1).all(1).flatten(1)
    mirrored = (windows.flip(-1) == pixels[:, :, None, None]).flatten(-2).all(-1).all(1).flatten(1)
    assert (plain.any(1) | mirrored.any(1)).all(), "a train image is not a pad-4 crop (+flip)"
    flipped = ~plain.any(1)
    assert 0 < flipped.sum() < len(images)  # both flipped and unflipped images occur


def test_determinism_and_reshuffling(cifar_root):
    def epoch_batches(loader, epoch):
        loader.set_epoch(epoch)
        return [(x.clone(), y.clone()) for x, y in loader]

    first, _ = _cifar(cifar_root, seed=7)
    again, _ = _cifar(cifar_root, seed=7)
    other, _ = _cifar(cifar_root, seed=8)
    e0, e0_again, e1 = epoch_batches(first, 0), epoch_batches(again, 0), epoch_batches(first, 1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(e0, e0_again))
    assert not torch.equal(e0[0][1], e1[0][1])  # a new epoch reshuffles
    assert not torch.equal(e0[0][0], epoch_batches(other, 0)[0][0])  # the seed matters
    assert all(torch.equal(a[0], b[0]) for a, b in zip(e1, epoch_batches(first, 1)))


# ---------------------------------------------------------------------------------------------
# DDP sharding, checked for world sizes 1-4 without launching processes
# ---------------------------------------------------------------------------------------------
@given(num_samples=st.integers(1, 300), world_size=st.integers(1, 4),
       batch_size=st.integers(1, 40), epoch=st.integers(0, 5))
def test_sharding_is_disjoint_complete_and_step_synchronous(num_samples, world_size, batch_size,
                                                             epoch):
    for train in (True, False):
        if train and num_samples < world_size:
            continue
        samplers = [ShardedBatchSampler(num_samples, batch_size, rank=r, world_size=world_size,
                                        train=train, seed=3) for r in range(world_size)]
        shards = []
        for sampler in samplers:
            sampler.set_epoch(epoch)
            batches = list(sampler)
            assert len(batches) == len(sampler) and all(batches)
            assert all(len(b) <= batch_size for b in batches)
            flat = [i for b in batches for i in b]
            shards.append(flat[:sampler.shard_size])
            padded = len(flat) - sampler.shard_size  # only batch_size 1 may repeat a sample
            assert padded == 0 or (train and batch_size == 1 and padded == 1)
        everything = sorted(i for shard in shards for i in shard)
        assert everything == list(range(num_samples))  # disjoint and complete
        if train:
            assert len({len(s) for s in samplers}) == 1  # same number of steps on every rank
        else:
            assert shards == [list(range(r, num_samples, world_size))
                              for r in range(world_size)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_train_shards_reshuffle_every_epoch(world_size):
    sampler = ShardedBatchSampler(400, 16, rank=world_size - 1, world_size=world_size,
                                  train=True, seed=0)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        orders.append(sampler.epoch_order().tolist())
    assert orders[0] != orders[1] != orders[2]
    if world_size > 1:  # a rank's shard content changes, not just its order
        assert set(orders[0]) != set(orders[1])


def test_loaders_shard_across_ranks(cifar_root):
    world = 3
    loaders = [_cifar(cifar_root, 24, rank=r, world_size=world) for r in range(world)]
    train_labels, val_seen = [], 0
    for train, val in loaders:
        assert train.batch_size == 8 and len(train) == len(loaders[0][0])
        train.set_epoch(2)
        train_labels.append(torch.cat([y for _, y in train]))
        val_seen += sum(len(y) for _, y in val)
    raw = load_cifar("cifar10", cifar_root, train=True, download=False)
    assert torch.equal(torch.cat(train_labels).sort().values, raw.labels.sort().values)
    assert sum(t.num_samples for t, _ in loaders) == 150
    assert val_seen == sum(v.num_samples for _, v in loaders) == 37


# ---------------------------------------------------------------------------------------------
# Synthetic
# ---------------------------------------------------------------------------------------------
def test_synthetic_shapes_determinism_and_options():
    train, val = create_loaders("synthetic", None, 64, seed=1, num_train=200, num_val=50,
                                image_size=24, num_classes=5)
    assert (train.num_samples, val.num_samples, train.num_classes, train.image_size) == (
        200, 50, 5, 24)
    images, labels = next(iter(train))
    assert images.shape == (64, 3, 24, 24) and labels.max() < 5
    again, _ = create_loaders("synthetic", None, 64, seed=1, num_train=200, num_val=50,
                              image_size=24, num_classes=5)
    assert torch.equal(next(iter(again))[0], images)
    other, _ = create_loaders("synthetic", None, 64, seed=2, num_train=200, num_val=50,
                              image_size=24, num_classes=5)
    assert not torch.equal(next(iter(other))[0], images)


def test_synthetic_is_learnable():
    train, val = create_loaders("synthetic", None, 64, seed=0, num_train=512, num_val=200)
    assert (train.num_classes, train.image_size) == (10, 32)
    model = torch.nn.Sequential(torch.nn.AvgPool2d(4), torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    torch.manual_seed(0)
    for epoch in range(3):
        train.set_epoch(epoch)
        for images, labels in train:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in val)
    assert correct / val.num_samples > 0.5  # chance is 0.1


# ---------------------------------------------------------------------------------------------
# ImageNet folders
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    write_fake_imagefolder(root, num_classes=3, per_class_train=5, per_class_val=3,
                           size=(36, 44))
    return root


def test_imagefolder_loaders(imagenet_root):
    train, val = create_loaders("imagenet", imagenet_root, 4, workers=0, image_size=32)
    assert (train.num_classes, train.image_size, train.num_samples, val.num_samples) == (
        3, 32, 15, 9)
    assert (len(train), len(val)) == (4, 3)
    images, labels = next(iter(train))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8  # normalised on the device
    assert labels.dtype == torch.int64
    assert torch.cat([y for _, y in val]).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_imagefolder_sharding_and_workers(imagenet_root):
    seen = []
    for rank in range(2):
        _, val = create_loaders("imagenet", imagenet_root, 4, rank=rank, world_size=2,
                                workers=2 if rank == 0 else 0, image_size=16)
        seen += torch.cat([y for _, y in val]).tolist()
        assert val.num_samples == (5 if rank == 0 else 4)
    assert sorted(seen) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_imagefolder_errors(tmp_path, imagenet_root):
    with pytest.raises(DatasetError, match=r"nowhere.train does not exist.*ln -s"):
        create_loaders("imagenet", tmp_path / "nowhere", workers=0)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"empty.train is empty \(no class folders\)"):
        create_loaders("imagenet", tmp_path / "empty", workers=0)
    (tmp_path / "noimages" / "train" / "n0").mkdir(parents=True)
    with pytest.raises(DatasetError, match="has no usable images"):
        create_loaders("imagenet", tmp_path / "noimages", workers=0)
    write_fake_imagefolder(tmp_path / "mismatch", num_classes=2, per_class_train=1,
                           per_class_val=1)
    (tmp_path / "mismatch" / "val" / "n00000001").rename(tmp_path / "mismatch" / "val" / "nX")
    with pytest.raises(DatasetError, match="different class folders"):
        create_loaders("imagenet", tmp_path / "mismatch", workers=0)
    with pytest.raises(DatasetArgumentError, match="has 3 classes but num_classes=1000"):
        create_loaders("imagenet", imagenet_root, workers=0, num_classes=1000)


def test_corrupt_jpeg_names_the_file(tmp_path):
    root = write_fake_imagefolder(tmp_path, num_classes=2, per_class_train=2, per_class_val=1)
    bad = sorted((root / "val").rglob("*.JPEG"))[0]
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    _, val = create_loaders("imagenet", root, 2, workers=0, image_size=16)
    with pytest.raises(DatasetError, match=f"cannot decode image {bad}"):
        list(val)


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(dataset="mnist"), "unknown dataset 'mnist'; choose one of " + ", ".join(DATASETS)),
    (dict(dataset="synthetic", global_batch_size=10, world_size=4), "multiple of the number"),
    (dict(dataset="synthetic", rank=2, world_size=2), r"rank must be in \[0, world_size\)"),
    (dict(dataset="synthetic", num_test=5), r"unexpected options \['num_test'\]"),
    (dict(dataset="cifar10", image_size=64), "has image_size 32"),
    (dict(dataset="cifar10", num_classes=100), "has num_classes 10"),
    (dict(dataset="synthetic", device="cuda:0"), "CUDA is not available"),
    (dict(dataset="synthetic", device="gpu"), "invalid device 'gpu'"),
])
def test_bad_arguments(kwargs, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DatasetArgumentError, match=message):
        create_loaders(download=False, **kwargs)


def test_train_set_smaller_than_world_is_rejected():
    with pytest.raises(DatasetArgumentError, match="cannot be sharded over 4 ranks"):
        TensorImageLoader(torch.zeros(3, 3, 4, 4, dtype=torch.uint8), torch.zeros(3).long(), 1,
                          num_classes=2, train=True, rank=0, world_size=4)
