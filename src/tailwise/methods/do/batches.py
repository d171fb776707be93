"""The batches DO draws outside the training loop, from a run's context (``MethodContext``).

* :func:`stage_batches`: a stage's training batches (its sampler, the run's training augmentation, RandAugment
  included), from private epoch keys, for the decoupling's retraining steps and the sub-models' BatchNorm
  statistics;
* :func:`class_batches`: the unaugmented training images of a set of classes, for the importance scores;
* :func:`split_batches`: a validation or test split, unaugmented.

Under data parallelism each process takes its part of every batch (:func:`stage_batches`, as the training
loader does) or a contiguous run of whole batches (:func:`class_batches`, whose sums the caller adds up).
"""
from __future__ import annotations

import itertools
from typing import Iterator

import torch

from ...data.factory import make_eval_loader
from ...data.loader import Sampler, _generator, rank_slice


def stage_batches(ctx, sampler: Sampler, key: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless normalised, augmented training batches ``(x, y)`` of ``sampler``'s epochs ``key, key + 1000, ...``
    (``train.batch_size`` each; an epoch's incomplete last batch is skipped)."""
    loader, labels, bs = ctx.train_loader, ctx.data.train.labels, ctx.cfg.train.batch_size
    for r in itertools.count():
        indices = sampler.epoch_indices(key + 1000 * r)
        g = _generator(ctx.cfg.run.seed, key + 1000 * r, 1)
        for start in range(0, max(1, len(indices) - bs + 1), bs):
            batch = indices[start:start + bs]
            part = rank_slice(len(batch), ctx.dist.rank, ctx.dist.world)
            x = loader.augmented_batch(batch, g, part)
            yield loader.normalize(x[part]), labels[batch[part]].to(ctx.device)


def class_batches(ctx, classes: list[int], max_batches: int | None = None):
    """The training images of ``classes`` in order, unaugmented, in batches of ``train.batch_size`` (at most
    ``max_batches``); under data parallelism this process's contiguous run of whole batches."""
    bs = ctx.cfg.train.batch_size
    member = torch.zeros(ctx.data.num_classes, dtype=torch.bool)
    member[classes] = True
    idx = torch.where(member[ctx.data.train.labels])[0]
    if max_batches is not None:
        idx = idx[:max_batches * bs]
    count = -(-len(idx) // bs)
    mine = range(count)[rank_slice(count, ctx.dist.rank, ctx.dist.world)]
    idx = idx[mine.start * bs:mine.stop * bs]
    return make_eval_loader(ctx.data.train.subset(idx), bs, ctx.mean, ctx.std, ctx.device, ctx.channels_last,
                            ctx.cfg.run.workers)


def split_batches(ctx, split: str):
    """The whole ``val`` or ``test`` split, unaugmented, in batches of ``train.eval_batch_size`` (None without
    that split)."""
    data = {"val": ctx.data.val, "test": ctx.data.test}[split]
    if data is None:
        return None
    return make_eval_loader(data, ctx.cfg.train.eval_batch_size, ctx.mean, ctx.std, ctx.device,
                            workers=ctx.cfg.run.workers)
