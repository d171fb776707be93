"""Training batches drawn outside the training loop, from a run's context (``MethodContext``): DO's retraining
steps and sub-model statistics, LTAP's trial statistics.

:func:`training_batches` replays ``sampler``'s index order and the run's training augmentation for *private*
epoch keys (far above any training epoch), each with its own generator, so drawing them changes neither the
training batches nor any random state. Under data parallelism each process takes its part of every batch, as the
training loader does.
"""
from __future__ import annotations

import itertools
from typing import Iterator

import torch

from ..data.loader import Sampler, _generator, rank_slice


def training_batches(ctx, sampler: Sampler, key: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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
