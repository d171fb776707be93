"""Trial masks for the trial vote: per-class validation accuracy of the model with some channels removed, the model
restored bit for bit afterwards.

A trial zeroes, on the live model, every channel that is not live (pruned or being decayed) plus the trial's
selection, optionally recomputes the BatchNorm statistics of the network so cut (``calibrate``), evaluates, and
copies the saved group tensors and statistics back. Nothing else changes: the model is evaluated in eval mode, no
optimizer or masks object is touched, and neither evaluation nor the statistics pass draws random numbers from the
global generators.

Why recompute: with channels removed, the running statistics no longer describe the activations. In the benchmark's
seed-0 run with stale statistics (``trial_bn_batches: 0``, 2026-12-03), every trial from the third stage on
collapsed to 0-36% on at least one whole class group -- the vote then credited whichever criterion's
broken network happened to predict the tail classes, not the one that protects them.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from ...compress.groups import ChannelGroup
from ...compress.masks import ChannelMasks
from ...eval.metrics import per_class_accuracy
from ..batchnorm import kept_batchnorm_statistics
from .vote import as_accuracy

Evaluate = Callable[[], "torch.Tensor | list"]


def loader_accuracy(model: nn.Module, loader: Iterable, num_classes: int) -> Evaluate:
    """An evaluator for a plain ``(x, y)`` loader: per-class accuracy (percent, NaN for a class without samples)
    of ``model`` in eval mode, its training flag restored."""

    @torch.no_grad()
    def evaluate() -> torch.Tensor:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        preds, targets = [], []
        try:
            for x, y in loader:
                preds.append(model(x.to(device)).argmax(1).cpu())
                targets.append(torch.as_tensor(y).cpu())
        finally:
            model.train(was_training)
        return per_class_accuracy(torch.cat(preds), torch.cat(targets), num_classes)

    return evaluate


@torch.no_grad()
def trial_accuracy(model: nn.Module, groups: list[ChannelGroup], tensors: list[torch.Tensor],
                   live: list[torch.Tensor], selection: dict[int, torch.Tensor], evaluate: Evaluate,
                   calibrate: Callable[[], object] | None = None) -> torch.Tensor:
    """Per-class accuracy of ``model`` with every channel outside ``live`` and every channel of ``selection``
    zeroed, after ``calibrate()`` (when given: recompute the BatchNorm statistics of the model as it now is);
    ``tensors`` (every group member tensor) and the BatchNorm statistics are saved before and restored after."""
    saved = [t.detach().clone() for t in tensors]
    trial = ChannelMasks(model, groups)
    trial.keep = [alive.clone() for alive in live]
    try:
        with kept_batchnorm_statistics(model):
            trial.prune(selection)  # zeroes the dead and the selected channels
            if calibrate is not None:
                calibrate()
            return as_accuracy(evaluate())
    finally:
        for t, s in zip(tensors, saved):
            t.copy_(s)
