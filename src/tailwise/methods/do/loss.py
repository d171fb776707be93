"""DO's compensation loss (``seeds/003_…``, Eqs. 2 and 3).

``alpha_t`` per class: ``1`` for a *many* stage; ``tau(y) = R(L)[y]`` for a *few* stage, ``R`` reversing the
frequency list ``L`` *by frequency rank* (the class of rank r gets the frequency of rank K-1-r; identical to
reversing the list when classes are sorted by count, as in CIFAR-LT); for a *medium* stage Eq. 3 says
``alpha_2 = rho_m``, a constant, which would shift every logit equally and leave softmax CE unchanged. We read it,
like Eq. 1, per class: ``rho_m`` for the stage's classes and ``1 - rho_m`` otherwise (``medium_alpha: per_class``);
``constant`` is the literal (no-op) reading.

Example::

    log_alpha = stage_alpha("few", few_classes, counts, rho_m=0.7).log()
    loss = compensation_loss(model(x), y, log_alpha)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def reversed_frequency(counts) -> torch.Tensor:
    """``tau(y) = R(L)[y]``: the class of frequency rank r (descending, ties by label) gets the frequency of rank
    K-1-r."""
    n = torch.as_tensor(list(counts), dtype=torch.float64)
    freq = n / n.sum()
    order = sorted(range(len(n)), key=lambda c: (-float(n[c]), c))
    tau = torch.empty_like(freq)
    for r, c in enumerate(order):
        tau[c] = freq[order[len(order) - 1 - r]]
    return tau


def stage_alpha(kind: str, classes, counts, rho_m: float, medium_alpha: str = "per_class") -> torch.Tensor:
    """``alpha_t`` of Eq. 3 per class (float64)."""
    k = len(counts)
    if kind == "many":
        return torch.ones(k, dtype=torch.float64)
    if kind == "few":
        return reversed_frequency(counts)
    if medium_alpha == "constant":
        return torch.full((k,), rho_m, dtype=torch.float64)
    alpha = torch.full((k,), 1.0 - rho_m, dtype=torch.float64)
    alpha[list(classes)] = rho_m
    return alpha


def compensation_loss(logits: torch.Tensor, y: torch.Tensor, log_alpha: torch.Tensor) -> torch.Tensor:
    """Eq. 2: mean over the batch of ``-log softmax(z - log alpha)[y]``."""
    return F.cross_entropy(logits.float() - log_alpha.to(logits.device, torch.float32), y)
