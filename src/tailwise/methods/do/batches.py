"""The batches DO draws outside the training loop, from a run's context (``MethodContext``).

* a stage's training batches (its sampler, the run's training augmentation, RandAugment included, from private
  epoch keys) for the decoupling's retraining steps and the sub-models' BatchNorm statistics are
  :func:`tailwise.methods.batches.training_batches`;
* :func:`class_batches`: the unaugmented training images of a set of classes, for the importance scores;
* :func:`split_batches`: a validation or test split, unaugmented.

Under data parallelism :func:`class_batches` gives each process a contiguous run of whole batches, whose sums the
caller adds up.
"""
from __future__ import annotations

import torch

from ...data.factory import make_eval_loader
from ...data.loader import rank_slice


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
