"""Recomputing a network's BatchNorm statistics on given batches, and putting the old ones back.

A network with channels removed (DO's sub-models, issue #22; LTAP's trial masks, issue #21) does not produce the
activations its running statistics describe; on a stand-in ResNet-32 pruned to 50% one-shot the stale statistics
gave 18.95% accuracy against 61.9% with recomputed ones.

Example::

    recompute_batchnorm(submodel, (x for x, _ in batches))   # then submodel.eval() predicts with them
    with kept_batchnorm_statistics(model):                   # a trial: recompute, evaluate, restore
        recompute_batchnorm(model, inputs)
        accuracy = evaluate(model)
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace the running mean and variance of every BatchNorm layer of ``model`` (in place) by the cumulative
    average over ``batches`` of each batch's mean and unbiased variance (``momentum=None``: the statistics
    forward passes in train mode compute); affine parameters and every other weight are untouched. Returns the
    number of batches (0: nothing was changed)."""
    norms = batchnorm_layers(model)
    if not norms:
        return 0
    momenta, was = [m.momentum for m in norms], model.training
    count = 0
    try:
        model.train()
        for x in batches:
            if count == 0:
                for m in norms:
                    m.reset_running_stats()
                    m.momentum = None
            model(x)
            count += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was)
    return count


@contextmanager
def kept_batchnorm_statistics(model: nn.Module) -> Iterator[None]:
    """Within the block the BatchNorm statistics of ``model`` may change; on leaving it (also by an exception)
    every running mean, variance and batch count is put back bit for bit."""
    norms = batchnorm_layers(model)
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
