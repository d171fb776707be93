"""Trial masks for the trial vote: per-class validation accuracy of the model with some channels removed, the model
restored bit for bit afterwards.

A trial zeroes, on the live model, every channel that is not live (pruned or being decayed) plus the trial's
selection, evaluates, and copies the saved group tensors back. Nothing else changes: the model is evaluated in
eval mode (BatchNorm statistics are read, not updated), no optimizer or masks object is touched, and evaluation
draws no random numbers.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from ...compress.groups import ChannelGroup
from ...compress.masks import ChannelMasks
from ...eval.metrics import per_class_accuracy
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
                   live: list[torch.Tensor], selection: dict[int, torch.Tensor], evaluate: Evaluate) -> torch.Tensor:
    """Per-class accuracy of ``model`` with every channel outside ``live`` and every channel of ``selection``
    zeroed; ``tensors`` (every group member tensor) are saved before and restored after."""
    saved = [t.detach().clone() for t in tensors]
    trial = ChannelMasks(model, groups)
    trial.keep = [alive.clone() for alive in live]
    try:
        trial.prune(selection)  # zeroes the dead and the selected channels
        return as_accuracy(evaluate())
    finally:
        for t, s in zip(tensors, saved):
            t.copy_(s)
