"""Image files to uint8 crops: torchvision.io decoding (libjpeg-turbo on the CPU, nvJPEG on CUDA).

The ImageNet pipeline's per-image work, for both decoding modes of ``data.imagenet``:

* ``decode_rgb``: file bytes -> uint8 ``(3, H, W)`` RGB, through ``torchvision.io.decode_image``
  (JPEG incl. greyscale and CMYK, PNG, GIF, WEBP); formats it lacks (BMP, TIFF, 16-bit PNG) go
  through PIL; a file neither can read is one ``DatasetError`` naming it.
* ``random_resized_crop_box``: torchvision ``RandomResizedCrop.get_params`` (same algorithm, same
  distribution) drawn from a per-sample ``numpy`` generator (``sample_generator``).
* ``crop_train`` / ``crop_eval``: the crop + antialiased bilinear resize (+ flip), on uint8 tensors
  on the CPU (torch's exact uint8 kernels), in float32 elsewhere.
* ``EncodedBatch`` + ``decode_batch``: the GPU mode's batch of file bytes and crop parameters,
  decoded at once by ``torchvision.io.decode_jpeg(list, device=...)`` and cropped on that device.

torchvision exposes no reduced-size (DCT-scaled) JPEG decoding, so every image is decoded at full
size; on ImageNet-sized images (about 500x375) a crop at least twice the 224 output in both sides,
where libjpeg's 1/2 scaling would apply, is rare (impossible for a 375-pixel side).
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import torch

from .errors import DatasetError

__all__ = ["RRC_SCALE", "RRC_RATIO", "JPEG_MAGIC", "DECODE_MODES", "EncodedBatch", "crop_eval", "crop_train",
           "decode_batch", "decode_rgb", "eval_resize_size", "image_size_from_header",
           "random_resized_crop_box", "read_file_bytes", "sample_generator"]


RRC_SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop defaults
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
JPEG_MAGIC = b"\xff\xd8\xff"
DECODE_MODES = ("cpu", "gpu")  # where ImageNet JPEGs are decoded: the loader workers, or per batch on the GPU
_AUGMENT_STREAM = 7  # generator stream of the per-sample crop parameters

Box = Tuple[int, int, int, int]  # top, left, height, width


def read_file_bytes(path: str) -> torch.Tensor:
    """The file's bytes as a 1-D uint8 tensor; an unreadable file is a ``DatasetError`` naming it."""
    try:
        with open(path, "rb") as handle:
            data = bytearray(handle.read())
    except OSError as exc:
        raise DatasetError(f"cannot read image {path} ({type(exc).__name__}: {exc}); check the "
                           "file's permissions or remove it") from None
    return torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def _corrupt(path: str, exc: BaseException) -> DatasetError:
    return DatasetError(f"cannot decode image {path} ({type(exc).__name__}: {exc}); the file "
                        "is corrupt or not an image: replace or delete it")


def _decode_with_pil(data: torch.Tensor, path: str) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
            array = np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise _corrupt(path, exc) from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def decode_rgb(data: torch.Tensor, path: str) -> torch.Tensor:
    """uint8 ``(3, H, W)`` RGB of an encoded image (``data``: its bytes, ``path``: for errors).

    Equals PIL's ``Image.open(path).convert("RGB")`` (same libjpeg-turbo / libpng output; no EXIF
    rotation, alpha dropped): ``torchvision.io.decode_image`` where it can, PIL otherwise.
    """
    from torchvision.io import ImageReadMode, decode_image

    if data.numel():
        try:
            image = decode_image(data, mode=ImageReadMode.RGB)
            if image.dtype == torch.uint8:
                return image
        except RuntimeError:
            pass  # a format torchvision lacks, or a corrupt file: PIL decides
    return _decode_with_pil(data, path)


def image_size_from_header(data: torch.Tensor) -> Tuple[int, int]:
    """``(height, width)`` from the file header alone (PIL parses it; the pixels are not decoded).

    Raises ``OSError``/``ValueError`` style errors when the header is unreadable.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
        width, height = image.size
    return height, width


def sample_generator(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of sample ``index`` in ``epoch``: the same in every worker and on every rank."""
    return np.random.default_rng([int(seed), int(epoch), _AUGMENT_STREAM, int(index)])


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: Sequence[float] = RRC_SCALE,
                            ratio: Sequence[float] = RRC_RATIO) -> Box:
    """``(top, left, h, w)`` of a random crop, torchvision ``RandomResizedCrop.get_params``'s algorithm.

    Up to 10 tries: area fraction ~ U(scale), log aspect ~ U(log ratio), ``w = round(sqrt(A r))``,
    ``h = round(sqrt(A / r))``; the first crop that fits is placed uniformly. Otherwise the
    largest centred crop whose aspect is clamped into ``ratio``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def eval_resize_size(image_size: int) -> int:
    """Shorter side before the evaluation centre crop: 256 for 224 (``round(size * 256 / 224)``)."""
    return round(image_size * 256 / 224)


def _resizable(image: torch.Tensor) -> torch.Tensor:
    # torch's CPU bilinear antialias kernel has an exact uint8 path (PIL's arithmetic); on other
    # devices the resize runs in float32 and is not rounded back to uint8.
    return image if image.device.type == "cpu" else image.float()


def crop_train(image: torch.Tensor, box: Box, flip: bool, size: int) -> torch.Tensor:
    """``image[:, top:top+h, left:left+w]`` resized to ``size x size`` (bilinear, antialias), mirrored if ``flip``."""
    from torchvision.transforms.v2 import functional as F

    top, left, h, w = box
    out = F.resized_crop(_resizable(image), top, left, h, w, [size, size], antialias=True)
    return out.flip(-1) if flip else out


def crop_eval(image: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's ``Resize(eval_resize_size(size))`` (shorter side) then ``CenterCrop(size)``."""
    from torchvision.transforms.v2 import functional as F

    resized = F.resize(_resizable(image), [eval_resize_size(size)], antialias=True)
    return F.center_crop(resized, [size, size]).contiguous()


@dataclass
class EncodedBatch:
    """One batch of the GPU decoding mode, as the workers send it.

    ``payloads[i]``: a JPEG's bytes (1-D uint8) or, for a file nvJPEG cannot take (PNG, ...), the
    image already decoded in the worker (uint8 ``(3, H, W)``); ``params``: int64 ``(B, 5)`` rows
    ``top, left, h, w, flip`` (training crops; zeros for evaluation); ``paths``: for errors.
    """

    payloads: List[torch.Tensor]
    params: torch.Tensor
    paths: List[str]

    def __len__(self) -> int:
        return len(self.payloads)


def _decode_jpegs(payloads: List[torch.Tensor], paths: List[str],
                  device: torch.device) -> List[torch.Tensor]:
    """``decode_jpeg(list, device=device)``; when it fails (no nvJPEG, a file it rejects), each
    image is decoded on the CPU (a corrupt file then raises the ``DatasetError`` naming it)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return list(decode_jpeg(payloads, mode=ImageReadMode.RGB, device=device))
    except RuntimeError as exc:
        # a warning, not a debug line: shown once per process, so a machine whose nvJPEG fails every
        # batch does not train at CPU-decoding speed unnoticed
        warnings.warn(f"batch JPEG decoding on {device} failed ({exc}); decoding it on the CPU instead "
                      "(slower; --decode cpu decodes in the workers)", RuntimeWarning, stacklevel=2)
        return [decode_rgb(data, path).to(device) for data, path in zip(payloads, paths)]


def decode_batch(batch: EncodedBatch, device: torch.device, *, train: bool,
                 size: int) -> torch.Tensor:
    """Decode and crop ``batch`` on ``device``: ``(B, 3, size, size)`` (uint8 on the CPU, float32
    in [0, 255] elsewhere); the same crops as the CPU mode's workers make."""
    device = torch.device(device)
    jpeg_slots = [i for i, payload in enumerate(batch.payloads) if payload.dim() == 1]
    images = [payload.to(device) if payload.dim() == 3 else payload for payload in batch.payloads]
    if jpeg_slots:
        decoded = _decode_jpegs([batch.payloads[i] for i in jpeg_slots],
                                [batch.paths[i] for i in jpeg_slots], device)
        for slot, image in zip(jpeg_slots, decoded):
            images[slot] = image
    params = batch.params.tolist()
    if train:
        crops = [crop_train(image, tuple(row[:4]), bool(row[4]), size)
                 for image, row in zip(images, params)]
    else:
        crops = [crop_eval(image, size) for image in images]
    return torch.stack(crops)
