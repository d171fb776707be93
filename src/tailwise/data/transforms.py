"""Per-image decoding and torchvision transforms of the streamed (file-backed) data path.

Images are decoded with PIL (converted to RGB) and transformed to uint8 ``3 x S x S`` tensors; normalisation
happens later, on the device, in the loader. The training transform is the standard ImageNet-LT recipe
(RandomResizedCrop + horizontal flip, optionally ColorJitter and RandAugment / AutoAugment); the evaluation
transform resizes the shorter side to ``int(S * 256 / 224)`` and takes the centre ``S x S`` crop.

Augmentation randomness is reproducible whatever the number of worker processes: every sample is transformed
under its own seed, derived from (run seed, epoch, position of the sample in the epoch) by :func:`sample_seed`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch

from ..errors import DataError
from .sources import decode_errors

STREAM_IMAGE_SIZE = 224  # the streamed image size when data.image_size is unset
VERIFY_HINT = "check every image of the dataset with `tailwise data verify RECIPE.yaml`"


def open_rgb(path: str | Path):
    """The image at ``path`` as an RGB PIL image; a :class:`DataError` naming the file if it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        reason = "the file does not exist"
    except decode_errors() as exc:
        reason = str(exc) or type(exc).__name__
    raise DataError(f"cannot read image {path}: {reason}; {VERIFY_HINT}")


def eval_resize(size: int) -> int:
    """The shorter-side length the evaluation transform resizes to before the centre crop (256 for 224)."""
    return int(size * 256 / 224)


def eval_transform(size: int) -> Callable:
    """PIL image -> uint8 ``3 x size x size``: Resize(int(size * 256 / 224)) + CenterCrop(size)."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(eval_resize(size)), v2.CenterCrop(size), v2.PILToTensor()])


def train_transform(size: int, flip: bool = True, color_jitter: float = 0.0, policy: str = "none") -> Callable:
    """PIL image -> uint8 ``3 x size x size``: RandomResizedCrop(size) (scale 0.08-1, ratio 3/4-4/3), then a
    horizontal flip (``flip``), ColorJitter(brightness = contrast = saturation = ``color_jitter``) when > 0, and
    RandAugment / AutoAugment (ImageNet policy) when ``policy`` asks for it. Draws from torch's global RNG:
    call it under :func:`seeded`."""
    from torchvision.transforms import v2

    steps = [v2.RandomResizedCrop(size)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    if color_jitter > 0:
        steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    if policy == "randaugment":
        steps.append(v2.RandAugment())
    elif policy == "autoaugment":
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))
    elif policy != "none":
        raise ValueError(f"unknown augmentation policy {policy!r}")
    return v2.Compose([*steps, v2.PILToTensor()])


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of the sample at ``position`` of epoch ``epoch``'s index sequence (a 63-bit hash: no two
    (seed, epoch, position) triples share a stream in practice, unlike a linear combination)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seeded(transform: Callable, image, seed: int | None) -> torch.Tensor:
    """``transform(image)`` with torch's global RNG seeded by ``seed`` (and restored afterwards, so the caller's
    random stream is untouched); ``seed=None`` for deterministic transforms."""
    if seed is None:
        return transform(image)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)
