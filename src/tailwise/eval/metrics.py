"""Long-tail evaluation metrics: confusion matrix, per-class / shot-group / balanced accuracy.

All accuracies are percentages. Per-class accuracy is ``nan`` for a class with no test samples; group and
balanced means ignore such classes. ``summarize`` returns plain, rounded, JSON-serialisable Python values
(``nan`` becomes ``None``).
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np
import torch

from ..data.longtail import GROUP_NAMES, ShotGroups

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[int]]

__all__ = ["confusion_matrix", "per_class_accuracy", "group_accuracy", "summarize"]


def _as_labels(x: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
    else:
        t = torch.as_tensor(np.asarray(x))
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        if t.numel() and not (t.is_floating_point() and torch.equal(t, t.round())):
            raise ValueError(f"{name} must hold integer class labels, got dtype {t.dtype}")
    return t.to(torch.int64)


def _check(preds: ArrayLike, targets: ArrayLike, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    p, t = _as_labels(preds, "preds"), _as_labels(targets, "targets")
    if p.numel() != t.numel():
        raise ValueError(f"preds and targets differ in length: {p.numel()} vs {t.numel()}")
    for name, v in (("preds", p), ("targets", t)):
        if v.numel() and (int(v.min()) < 0 or int(v.max()) >= num_classes):
            raise ValueError(f"{name} has labels outside [0, {num_classes}): min {int(v.min())}, max {int(v.max())}")
    return p, t


def confusion_matrix(preds: ArrayLike, targets: ArrayLike, num_classes: int) -> torch.Tensor:
    """``LongTensor[C, C]``; entry ``[i, j]`` counts samples of true class ``i`` predicted as ``j``."""
    p, t = _check(preds, targets, num_classes)
    flat = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def per_class_accuracy(preds: ArrayLike, targets: ArrayLike, num_classes: int) -> torch.Tensor:
    """Recall of every class in percent (float64); ``nan`` for classes absent from ``targets``."""
    cm = confusion_matrix(preds, targets, num_classes).to(torch.float64)
    support = cm.sum(dim=1)
    correct = cm.diagonal()
    acc = torch.full((num_classes,), float("nan"), dtype=torch.float64)
    present = support > 0
    acc[present] = 100.0 * correct[present] / support[present]
    return acc


def _nanmean(values: torch.Tensor) -> float | None:
    values = values[~torch.isnan(values)]
    return float(values.mean()) if values.numel() else None


def group_accuracy(per_class: ArrayLike, groups: ShotGroups) -> dict[str, float | None]:
    """Mean per-class accuracy of the many / medium / few classes (``nan`` classes ignored).

    ``None`` for a group with no classes (or only classes without test samples).
    """
    acc = torch.as_tensor(np.asarray(per_class.detach().cpu() if isinstance(per_class, torch.Tensor) else per_class,
                                     dtype=np.float64))
    if acc.ndim != 1 or acc.numel() != len(groups.membership):
        raise ValueError(f"per_class has {acc.numel()} entries, groups cover {len(groups.membership)} classes")
    out = {}
    for name in GROUP_NAMES:
        idx = groups.indices(name)
        out[name] = _nanmean(acc[idx]) if idx else None
    return out


def _round(x: float | None, ndigits: int = 4) -> float | None:
    if x is None or math.isnan(x):
        return None
    return round(float(x), ndigits)


def summarize(preds: ArrayLike, targets: ArrayLike, groups: ShotGroups) -> dict:
    """Overall, shot-group, balanced and per-class accuracy (percent) as a JSON-serialisable dict.

    ``all`` is sample accuracy; ``balanced`` the mean per-class accuracy over classes present in ``targets``.
    The number of classes is ``len(groups.membership)``.
    """
    num_classes = len(groups.membership)
    p, t = _check(preds, targets, num_classes)
    per_class = per_class_accuracy(p, t, num_classes)
    overall = 100.0 * float((p == t).sum()) / t.numel() if t.numel() else None
    grp = group_accuracy(per_class, groups)
    return {
        "all": _round(overall),
        **{name: _round(grp[name]) for name in GROUP_NAMES},
        "balanced": _round(_nanmean(per_class)),
        "per_class": [_round(v) for v in per_class.tolist()],
        "group_sizes": groups.sizes(),
    }
