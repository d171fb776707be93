"""The method–trainer boundary: :class:`MethodContext`, everything a method's hooks may use during a run.

The trainer builds one context per run and passes it to every hook (the Method hook protocol of DESIGN.md). It is
a narrow, typed view — the model, optimizer, loss, data and loader, scaler, device, data-parallel job, class counts,
epoch and step — plus the few services a method may ask of the loop that drives it: rebuild the optimizer after
changing parameter shapes, evaluate a split, place a new model on the device, change the sampler or the learning
rate, run one training step through the loop's own step, write to the run's log. A method never holds or reaches
into the trainer, and no method module imports :mod:`tailwise.engine` at run time. The standalone method objects
(``LTAP``, MORE's functions, ``Plasticity``, DO's decoupler) need no context at all: a plain PyTorch loop uses them
directly.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

if TYPE_CHECKING:  # annotations only: no run-time import of the engine or the config
    from ..config import Config
    from ..data.dataset import LongTailData
    from ..engine.dist import Dist


def _unavailable(service: str) -> Callable:
    def fail(*args, **kwargs):
        raise RuntimeError(f"MethodContext.{service} is provided by the loop that drives the method (the trainer); "
                           "this context was built without it")
    return fail


@dataclass
class MethodContext:
    """What a method sees. ``model`` and ``optimizer`` are the live objects (a method that replaces the model's
    parameters calls :meth:`rebuild_optimizer`); ``train_loader`` yields normalised, augmented ``(x, y)`` batches
    on ``device`` and has ``len()``, ``.sampler``, ``.normalize(uint8_batch)`` and ``.augment``; ``mean`` / ``std``
    are the per-channel normalisation in [0, 1]. ``batch_share`` is this process's loss weight in the current
    step under data parallelism (1 alone)."""

    cfg: "Config"
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    data: "LongTailData"
    device: torch.device
    train_loader: Any
    scaler: torch.amp.GradScaler
    dist: "Dist"
    mean: Sequence[float]
    std: Sequence[float]
    epoch: int = 0
    step: int = 0
    batch_share: float = 1.0
    channels_last: bool = False
    precision: torch.dtype | None = None  # autocast dtype of forward passes; None: full precision
    _rebuild_optimizer: Callable = field(default=_unavailable("rebuild_optimizer"), repr=False)
    _evaluate: Callable = field(default=_unavailable("evaluate"), repr=False)
    _place: Callable = field(default=_unavailable("place"), repr=False)
    _train_step: Callable = field(default=_unavailable("train_step"), repr=False)
    _log: Callable[[str], None] = field(default=lambda msg: None, repr=False)

    @property
    def class_counts(self) -> list[int]:
        """Training images per class."""
        return list(self.data.class_counts)

    def grad_scale(self) -> float:
        """The gradient scaler's current scale (1 where loss scaling is off): gradients read in a hook are
        divided by it."""
        return self.scaler.get_scale() if self.scaler.is_enabled() else 1.0

    def rebuild_optimizer(self, carry: dict | None = None) -> None:
        """New optimizer over ``model.parameters()``: surviving parameters keep their state, ``carry`` maps new
        parameters to the state they start from (e.g. sliced momentum); the learning rates are kept."""
        self._rebuild_optimizer(carry)

    def evaluate(self, split: str = "val",
                 predict: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict | None:
        """Accuracy summary of ``split`` (``val`` / ``test`` / ``train``) with the method's ``predict``, or with
        ``predict`` (a function of a normalised batch, e.g. one sub-model) where given; None when the run has no
        such split."""
        return self._evaluate(split, predict)

    def place(self, model: nn.Module, contiguous: bool = False) -> nn.Module:
        """Move ``model`` to the run's device and memory format; ``contiguous=True`` switches the whole run to
        NCHW from now on (irregular pruned widths: see ``Trainer.place``)."""
        return self._place(model, contiguous)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimizer step on ``(x, y)`` through the loop's own step (the method's ``training_loss``, autocast,
        gradient scaling and clipping, data-parallel gradient averaging, ``after_backward`` / ``after_step``);
        returns the batch's mean loss. ``step`` counts the loop's own batches only, not these."""
        return self._train_step(x, y)

    def log(self, msg: str) -> None:
        """Write one line to the run's log (the trainer's: stderr on the main process); a no-op by default."""
        self._log(msg)

    def set_sampler(self, sampler) -> None:
        """Draw the training batches with ``sampler`` (:class:`tailwise.data.loader.Sampler`) from now on."""
        self.train_loader.sampler = sampler

    def set_lr(self, lr: float) -> None:
        """Set the base learning rate: every parameter group gets ``lr`` times its ``lr_scale`` (1 unless a method
        set one). The trainer sets each epoch's scheduled rate with it; a method that owns its schedule (e.g. DO)
        calls it too."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def base_lr(self) -> float:
        """The base learning rate in use (what :meth:`set_lr` or the schedule last set): the first parameter group's
        rate over its ``lr_scale``."""
        group = self.optimizer.param_groups[0]
        return group["lr"] / group.get("lr_scale", 1.0)

    def autocast(self):
        """The forward-pass precision context of this run (a no-op in full precision)."""
        if self.precision is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision)
