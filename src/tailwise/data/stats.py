"""Normalisation statistics of a run: per-channel mean and standard deviation in [0, 1].

An in-memory training split is scanned once (:func:`channel_stats`); a streamed split cannot be scanned
cheaply, so it uses ``data.mean`` / ``data.std`` when given and the ImageNet constants otherwise.
"""
from __future__ import annotations

from typing import Callable

import torch

from .stream import FileSplit

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation in [0, 1] of uint8 ``N x C x H x W`` images, accumulated in
    float64 over chunks (no full float copy of the dataset)."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].double()
        total += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
    n = images.numel() / images.shape[1]
    mean = total / n
    std = (squares / n - mean * mean).clamp_min(0).sqrt()
    return (mean / 255).tolist(), (std / 255).tolist()


def normalization(split, cfg, log: Callable[[str], None] = lambda msg: None) -> tuple[list[float], list[float]]:
    """(mean, std) for training on ``split`` under ``cfg`` (a :class:`tailwise.config.DataConfig`): the
    configured values where given; otherwise computed from an in-memory split, or the ImageNet constants for a
    streamed one (logged, since they are an assumption about the data)."""
    if cfg.mean is not None and cfg.std is not None:
        return list(cfg.mean), list(cfg.std)
    if not isinstance(split, FileSplit):
        mean, std = channel_stats(split.images)
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        log("streamed data: normalising with the ImageNet mean/std constants (a streamed split is not scanned); "
            "set data.mean and data.std to use your dataset's statistics")
    return list(cfg.mean or mean), list(cfg.std or std)
