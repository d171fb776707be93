"""Learning-rate schedules as pure functions of the epoch (so resuming needs no scheduler state beyond it).

``step`` (the LDAM-DRW CIFAR recipe): ``lr * decay^k`` with ``k`` the number of milestones <= epoch, so with
``lr_decay = 0.01`` and milestones [160, 180] the rate is x0.01 from epoch 160 and x0.0001 from epoch 180
(epochs counted from 0). ``cosine``: ``min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2`` with ``t`` the fraction
of the post-warm-up epochs done. ``constant``. All with linear warm-up ``lr * (epoch + 1) / warmup_epochs``.
"""
from __future__ import annotations

import math


class LRSchedule:
    def __init__(self, lr: float, epochs: int, schedule: str = "step", warmup_epochs: int = 0,
                 milestones: list[int] = (), lr_decay: float = 0.1, min_lr: float = 0.0):
        self.lr, self.epochs, self.schedule = lr, epochs, schedule
        self.warmup_epochs, self.milestones, self.lr_decay, self.min_lr = warmup_epochs, list(milestones), lr_decay, min_lr

    @classmethod
    def from_config(cls, train) -> "LRSchedule":
        return cls(train.lr, train.epochs, train.schedule, train.warmup_epochs, train.milestones, train.lr_decay,
                   train.min_lr)

    def __call__(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return self.lr * (epoch + 1) / self.warmup_epochs
        if self.schedule == "step":
            return self.lr * self.lr_decay ** sum(epoch >= m for m in self.milestones)
        if self.schedule == "cosine":
            span = max(1, self.epochs - self.warmup_epochs)
            t = min(1.0, (epoch - self.warmup_epochs) / span)
            return self.min_lr + (self.lr - self.min_lr) * (1 + math.cos(math.pi * t)) / 2
        return self.lr
