"""The loaders of a run, built for whichever kind of split the data has, so callers never branch on it:
an in-memory :class:`~tailwise.data.dataset.Split` gets a :class:`~tailwise.data.loader.BatchLoader`
(batched tensor augmentation), a file-backed :class:`~tailwise.data.stream.FileSplit` a
:class:`~tailwise.data.stream.StreamLoader` (decoding in ``run.workers`` processes)."""
from __future__ import annotations

from typing import Sequence

import torch

from .loader import Augment, BatchLoader, Sampler
from .stream import FileSplit, StreamLoader
from .transforms import train_transform


def make_train_loader(split, cfg, mean: Sequence[float], std: Sequence[float], device: str | torch.device = "cpu",
                      rank: int = 0, world: int = 1) -> BatchLoader | StreamLoader:
    """The training loader of ``split`` under ``cfg`` (a :class:`tailwise.config.Config`): ``train.sampler``
    seeded by ``run.seed``, global batch ``train.batch_size``, the training augmentation of ``cfg.data``;
    process ``rank`` of ``world`` keeps its share of every batch."""
    t, d = cfg.train, cfg.data
    sampler = Sampler(split.labels, t.sampler, cfg.run.seed, t.batch_size)
    common = dict(sampler=sampler, device=device, channels_last=t.channels_last, rank=rank, world=world)
    if isinstance(split, FileSplit):
        transform = train_transform(split.image_size, d.flip, d.color_jitter, d.policy)
        return StreamLoader(split, t.batch_size, mean, std, transform=transform, workers=cfg.run.workers, **common)
    return BatchLoader(split.images, split.labels, t.batch_size, mean, std,
                       augment=Augment(d.crop_padding, d.flip, d.cutout, d.policy), **common)


def make_eval_loader(split, batch_size: int, mean: Sequence[float], std: Sequence[float],
                     device: str | torch.device = "cpu", channels_last: bool = False, workers: int = 0,
                     rank: int = 0, world: int = 1) -> BatchLoader | StreamLoader:
    """Sequential, unaugmented batches of process ``rank``'s part of ``split`` (the whole split for one
    process); ``workers`` decoding processes for a file-backed split."""
    if isinstance(split, FileSplit):
        return StreamLoader(split, batch_size, mean, std, device=device, channels_last=channels_last, rank=rank,
                            world=world, workers=workers)
    return BatchLoader(split.images, split.labels, batch_size, mean, std, device=device, channels_last=channels_last,
                       rank=rank, world=world)
