"""The ImageNet input pipeline (data/imagenet.py, data/decode.py) on real image files.

uint8 crops decoded by torchvision.io in the workers (or, ``decode="gpu"``, per batch on the
device; run here on the CPU, where it must give the CPU mode's batches exactly), normalised on the
device by ``data.to_device``; the crop distribution is torchvision's RandomResizedCrop's, the
evaluation tensors are the PIL reference pipeline's up to JPEG / resize rounding.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from benchmarks.bench_data import natural_image
from data import DatasetArgumentError, DatasetError, create_loaders, to_device
from data.decode import (EncodedBatch, crop_train, decode_batch, decode_rgb,
                         random_resized_crop_box, read_file_bytes, sample_generator)
from data.imagenet import IMAGENET_MEAN, IMAGENET_STD, create_imagefolder_loaders

CPU = torch.device("cpu")
ONE_LEVEL = 1 / 255 / min(IMAGENET_STD)  # one uint8 step after normalisation: 0.0174


def _save(image: Image.Image, path: Path, fmt: str, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **options)


def write_odd_folder(root: Path) -> Path:
    """2 classes of real files: photo-like RGB JPEGs of ImageNet-like and tiny sizes, a greyscale
    and a CMYK JPEG, RGBA and palette PNGs (with a .JPEG-less name), a BMP, a 3x2 JPEG."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        a, b = root / split / "n01", root / split / "n02"
        _save(natural_image(150, 200, rng), a / "photo.JPEG", "JPEG", quality=90)
        _save(natural_image(96, 64, rng), a / "portrait.JPEG", "JPEG", quality=90)
        _save(natural_image(60, 80, rng).convert("L"), a / "grey.JPEG", "JPEG", quality=90)
        _save(natural_image(70, 90, rng).convert("CMYK"), a / "cmyk.JPEG", "JPEG", quality=90)
        _save(natural_image(50, 40, rng).convert("RGBA"), b / "alpha.png", "PNG")
        _save(natural_image(40, 50, rng).convert("P"), b / "palette.png", "PNG")
        _save(natural_image(30, 45, rng), b / "bitmap.bmp", "BMP")
        _save(natural_image(3, 2, rng), b / "tiny.JPEG", "JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def odd_root(tmp_path_factory) -> Path:
    return write_odd_folder(tmp_path_factory.mktemp("odd"))


def reference_transforms(size: int):
    from torchvision import transforms

    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    return transforms.Compose([transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size),
                               transforms.ToTensor(), normalize]), normalize


def loader_pair(root, decode: str, workers: int = 0, size: int = 32, batch: int = 4, **shard):
    shard = {"rank": 0, "world_size": 1, "seed": 0, **shard}
    return create_imagefolder_loaders(root, batch, batch, device=CPU, workers=workers, image_size=size,
                                      decode=decode, **shard)


def model_inputs(loader, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    loader.set_epoch(epoch)
    pairs = [(to_device(loader, x, CPU), y) for x, y in loader]
    return torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])


# ------------------------------------------------------------------------------- crop parameters
@pytest.mark.parametrize("height, width", [(375, 500), (500, 333), (20, 200), (3, 2)])
def test_crop_parameters_follow_torchvisions_distribution(height, width):
    """Two-sample KS tests of top, left, h, w: ours (per-sample numpy streams) vs torchvision's
    RandomResizedCrop.get_params (torch's global generator). (20, 200) mostly falls back to the
    centred clamped-ratio crop, (3, 2) exercises rounding on a tiny image."""
    from torchvision.transforms import RandomResizedCrop

    count = 2000
    ours = np.array([random_resized_crop_box(height, width, sample_generator(1, 0, i)) for i in range(count)])
    torch.manual_seed(0)
    image = torch.empty(1, height, width)
    theirs = np.array([RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(count)])
    for column, name in enumerate(("top", "left", "h", "w")):
        result = stats.ks_2samp(ours[:, column], theirs[:, column])
        assert result.pvalue > 1e-3, (name, result)
    assert (ours[:, 2] <= height).all() and (ours[:, 3] <= width).all() and (ours[:, 2:] > 0).all()
    assert ((ours[:, 0] + ours[:, 2]) <= height).all() and ((ours[:, 1] + ours[:, 3]) <= width).all()


def test_crop_distribution_test_detects_another_scale():
    """The KS comparison above has the power to see a wrong parameter (scale (0.25, 1))."""
    from torchvision.transforms import RandomResizedCrop

    ours = [random_resized_crop_box(375, 500, sample_generator(1, 0, i), scale=(0.25, 1.0))[2]
            for i in range(2000)]
    torch.manual_seed(0)
    theirs = [RandomResizedCrop.get_params(torch.empty(1, 375, 500), [0.08, 1.0], [3 / 4, 4 / 3])[2]
              for _ in range(2000)]
    assert stats.ks_2samp(ours, theirs).pvalue < 1e-6


def test_flip_probability_is_one_half():
    flips = [sample_generator(0, 3, i) for i in range(4000)]
    share = np.mean([(rng.uniform(), rng.uniform(), rng.random() < 0.5)[2] for rng in flips])
    assert abs(share - 0.5) < 0.03  # 4 sigma


# --------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("mode, fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"),
                                       ("P", "PNG"), ("LA", "PNG"), ("I;16", "PNG"), ("RGB", "BMP"),
                                       ("RGB", "GIF"), ("RGB", "TIFF"), ("RGB", "WEBP")])
def test_decode_rgb_equals_pil(mode, fmt, tmp_path):
    """torchvision.io where it can, PIL for the rest (BMP, TIFF, 16-bit PNG): PIL's convert('RGB')."""
    path = tmp_path / f"image.{fmt.lower()}"
    _save(natural_image(37, 53, np.random.default_rng(1)).convert(mode), path, fmt)
    decoded = decode_rgb(read_file_bytes(str(path)), str(path))
    expected = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    assert decoded.dtype == torch.uint8 and torch.equal(decoded, expected)


@pytest.mark.parametrize("content", [b"", b"\xff\xd8\xff\xe0 not really a jpeg", b"GIF89a", "truncated"])
@pytest.mark.parametrize("decode, workers", [("cpu", 0), ("cpu", 2), ("gpu", 0)])
def test_corrupt_file_is_one_error_naming_it(tmp_path, content, decode, workers):
    root = write_odd_folder(tmp_path / "set")
    bad = root / "val" / "n01" / "photo.JPEG"
    if content == "truncated":  # the header is intact: in GPU mode the batch decode meets it
        content = bad.read_bytes()[:600]
    bad.write_bytes(content)
    _, val = loader_pair(root, decode, workers=workers, batch=8)
    with pytest.raises(DatasetError) as info:
        model_inputs(val)
    message = str(info.value)
    assert message.startswith(f"cannot decode image {bad} (") and "\n" not in message
    assert message.endswith("the file is corrupt or not an image: replace or delete it")


def test_unreadable_file_is_named(tmp_path):
    with pytest.raises(DatasetError, match=f"cannot read image {tmp_path / 'gone.JPEG'}"):
        read_file_bytes(str(tmp_path / "gone.JPEG"))


# ---------------------------------------------------------------------------- batches, both paths
def test_odd_files_load_on_both_paths_as_uint8_batches(odd_root):
    train, val = loader_pair(odd_root, "cpu", batch=3)
    assert (train.num_classes, train.num_samples, val.num_samples, len(train)) == (2, 8, 8, 3)
    images, labels = next(iter(train))
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 32, 32) and labels.dtype == torch.int64
    for loader in (train, val):
        x, y = model_inputs(loader)
        assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and sorted(y.tolist()) == [0] * 4 + [1] * 4
        assert torch.isfinite(x).all() and x.std() > 0.1


@pytest.mark.parametrize("split", ["train", "val"])
def test_gpu_decode_mode_gives_the_cpu_modes_batches(odd_root, split):
    """decode='gpu' on a CPU device: workers send bytes + crop rows, the batch is decoded with
    decode_jpeg(list) and cropped by decode_batch: the CPU mode's tensors, bit for bit."""
    index = 0 if split == "train" else 1
    cpu = loader_pair(odd_root, "cpu", batch=3)[index]
    gpu = loader_pair(odd_root, "gpu", batch=3, workers=1)[index]
    batch, _ = next(iter(gpu))
    assert isinstance(batch, EncodedBatch) and len(batch) == 3 and batch.params.shape == (3, 5)
    kinds = {p.dim() for b, _ in gpu for p in b.payloads}
    assert kinds == {1, 3}  # JPEG bytes, and images decoded in the worker (PNG, BMP)
    for epoch in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(model_inputs(cpu, epoch), model_inputs(gpu, epoch)))


def test_gpu_mode_falls_back_to_cpu_decoding(odd_root, monkeypatch):
    """No nvJPEG (decode_jpeg on the device raises): each image is decoded on the CPU instead."""
    import torchvision.io

    _, val = loader_pair(odd_root, "gpu", batch=8)
    expected = model_inputs(val)[0]
    calls = []

    def unavailable(*args, **kwargs):
        calls.append(kwargs.get("device"))
        raise RuntimeError("decode_jpeg on this device is not available")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", unavailable)
    assert torch.equal(model_inputs(val)[0], expected) and calls


def test_a_failed_batch_decode_warns_and_names_the_corrupt_file(odd_root, tmp_path):
    """The batch decoder rejects a truncated JPEG (header intact): the fallback says so with a warning
    (a machine whose batch decode always fails must not train at CPU speed unnoticed), then the CPU
    decoder names the file."""
    good = str(odd_root / "train" / "n01" / "photo.JPEG")
    bad = tmp_path / "cut.JPEG"
    bad.write_bytes(Path(good).read_bytes()[:600])
    payloads = [read_file_bytes(good), read_file_bytes(str(bad))]
    batch = EncodedBatch(payloads, torch.zeros(2, 5, dtype=torch.int64), [good, str(bad)])
    with pytest.warns(RuntimeWarning, match="batch JPEG decoding on cpu failed"):
        with pytest.raises(DatasetError, match=f"cannot decode image {bad} "):
            decode_batch(batch, CPU, train=False, size=32)


def test_float_resize_of_the_gpu_path_matches_uint8(odd_root):
    """Off the CPU the crop is resized in float32 (not rounded): within one level of the uint8
    kernel (fixed-point weights, then rounding)."""
    path = str(odd_root / "train" / "n01" / "photo.JPEG")
    image = decode_rgb(read_file_bytes(path), path)
    for box, flip in (((10, 20, 100, 120), True), ((0, 0, 150, 200), False), ((5, 7, 9, 11), False)):
        exact = crop_train(image, box, flip, 32).float()
        floating = crop_train(image.float(), box, flip, 32)
        assert (exact - floating).abs().max() < 1.0
    batch = EncodedBatch([read_file_bytes(path)], torch.tensor([[10, 20, 100, 120, 1]]), [path])
    assert torch.equal(decode_batch(batch, CPU, train=True, size=32)[0], crop_train(image, (10, 20, 100, 120), True, 32))


def test_augmentation_does_not_depend_on_workers_or_ranks(odd_root):
    """A sample's crop is a function of (seed, epoch, index): same for 0 or 2 workers, and on
    whichever rank of a 2-process run it lands."""
    single = loader_pair(odd_root, "cpu", batch=2)[0]
    with_workers = loader_pair(odd_root, "cpu", batch=2, workers=2)[0]
    x0, y0 = model_inputs(single, 3)
    assert all(torch.equal(a, b) for a, b in zip((x0, y0), model_inputs(with_workers, 3)))
    by_index = dict(zip(single.sampler.epoch_order().tolist(), x0))
    for rank in range(2):
        shard = loader_pair(odd_root, "cpu", batch=2, rank=rank, world_size=2)[0]
        x, _ = model_inputs(shard, 3)
        for index, image in zip(shard.sampler.epoch_order().tolist(), x):
            assert torch.equal(image, by_index[index])
    other_epoch, _ = model_inputs(single, 4)
    assert not torch.equal(torch.sort(x0.flatten(1).sum(1)).values, torch.sort(other_epoch.flatten(1).sum(1)).values)


# ------------------------------------------------------------------------- against the reference
def test_eval_tensors_match_the_pil_reference_pipeline(odd_root):
    """Resize(256) + CenterCrop(224) + ToTensor + Normalize on PIL images vs the new path at 224:
    the same decoder output, resizes that differ by uint8 rounding: max difference one level."""
    reference, _ = reference_transforms(224)
    _, val = loader_pair(odd_root, "cpu", size=224, batch=8)
    x, _ = model_inputs(val)
    paths = [path for path, _ in val.files.samples]
    expected = torch.stack([reference(Image.open(p).convert("RGB")) for p in paths])
    difference = (x - expected).abs()
    assert difference.max() <= ONE_LEVEL + 1e-5, difference.max() / ONE_LEVEL
    assert difference.mean() < 0.05 * ONE_LEVEL


def test_train_crops_are_the_reference_crops_of_the_drawn_box(odd_root):
    """The new path's training crop of a sample = torchvision's resized_crop + hflip on the PIL
    image with the box and flip drawn for that sample (within one uint8 level)."""
    from torchvision.transforms import functional as TF

    _, normalize = reference_transforms(32)
    train, _ = loader_pair(odd_root, "cpu", size=32, batch=8)
    x, _ = model_inputs(train, 2)
    for index, image in zip(train.sampler.epoch_order().tolist(), x):
        path = train.files.samples[index][0]
        pil = Image.open(path).convert("RGB")
        rng = sample_generator(0, 2, index)
        top, left, h, w = random_resized_crop_box(pil.height, pil.width, rng)
        crop = TF.resized_crop(pil, top, left, h, w, [32, 32], antialias=True)
        if rng.random() < 0.5:
            crop = TF.hflip(crop)
        assert (image - normalize(TF.to_tensor(crop))).abs().max() <= ONE_LEVEL + 1e-5, path


def test_device_transform_normalises_once_in_the_requested_layout(odd_root):
    train, _ = loader_pair(odd_root, "cpu", batch=4)
    images, _ = next(iter(train))
    out = train.device_transform(images, CPU, torch.channels_last)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    assert torch.allclose(out.double(), (images.double() / 255 - mean) / std, atol=1e-5, rtol=0)
    assert images.element_size() * 4 == out.element_size()  # a quarter of the bytes to copy
    plain = [torch.ones(2, 3, 4, 4)]  # any iterable of float batches: moved, not normalised
    assert torch.equal(to_device(plain, plain[0], CPU, torch.channels_last), plain[0])


def test_decode_mode_arguments(odd_root, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DatasetArgumentError, match="decoding on the GPU needs a CUDA device.*--decode cpu"):
        create_loaders("imagenet", odd_root, 4, workers=0, decode="gpu")
    with pytest.raises(DatasetArgumentError, match="unknown decode mode 'nvjpeg'; choose one of cpu, gpu"):
        create_loaders("imagenet", odd_root, 4, workers=0, decode="nvjpeg")
    train, _ = create_loaders("synthetic", None, 4, decode="gpu")  # nothing to decode: ignored
    assert next(iter(train))[0].dtype == torch.float32


# ----------------------------------------------------------------------------------- end to end
def test_sres18_trains_on_an_imagefolder_end_to_end(odd_root, tmp_path):
    """The real command line: sres18, 1 epoch (one step of 8) on the odd files at 224x224,
    evaluated, converted and its deploy model checked (the baseline: ACB ResNet-18 costs twice the
    time on CPU, and its blocks are tested elsewhere; workers are tested above)."""
    import json

    import do_acnet

    do_acnet.main(["-a", "sres18", "-b", "base", "--dataset", "imagenet", "--data-dir", str(odd_root),
                   "--output-dir", str(tmp_path), "--epochs", "1", "--batch-size", "8", "--workers", "0",
                   "--no-progress", "--print-freq", "1"])
    run = tmp_path / "sres18_base_train"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["dataset"] == "imagenet" and summary["max_rel_logit_diff"] < 1e-4
    log = (run / "log.txt").read_text()
    assert "epoch 1 iter 1 val top1=" in log and "finish_deploy.hdf5 written" in log


def test_decode_gpu_without_cuda_is_one_line_from_the_command_line(odd_root, tmp_path, capsys):
    import do_acnet

    with pytest.raises(SystemExit) as info:
        do_acnet.main(["-a", "sres18", "--dataset", "imagenet", "--data-dir", str(odd_root), "--device", "cpu",
                       "--decode", "gpu", "--output-dir", str(tmp_path), "--epochs", "1", "--batch-size", "8"])
    err = capsys.readouterr().err
    assert info.value.code != 0 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert "decoding on the GPU needs a CUDA device, the device is cpu; use decode='cpu' (--decode cpu)" in line
