"""DO's stage plan (``seeds/003_…``, "Overview" and the implementation details): which class group each stage
prefers, its epochs, learning rate, decoupling ratio and sampler.

``stages: 3``: many -> medium -> few (``order: many-few-medium`` swaps the last two, Table 7); ``stages: 2``:
many -> few; ``stages: 4``: many -> medium-top -> medium-low -> few, the medium classes split at their median
training count (Table 6). A stage whose group is empty is dropped and its epochs are given to the preceding stage
(to the next one, with stage 1's lr, if it is the first).

Example::

    stages, dropped = plan_stages({"many": [0, 1], "medium": [2, 3], "few": [4]}, counts=[500, 300, 80, 40, 5],
                                  total_epochs=200, base_lr=0.05)
    [s.name for s in stages]  # ['many', 'medium', 'few'], epochs 100 / 50 / 50, lr 0.05 / 0.005 / 0.005
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...data.loader import Sampler
from ...errors import TrainingError

ORDERS = ("many-medium-few", "many-few-medium")
STAGE_WEIGHTS = {2: (2, 1), 3: (2, 1, 1), 4: (2, 1, 1, 1)}  # paper: 100 / 50 / 50 epochs
DEFAULT_GAMMA = (0.5, 0.8, 0.8)  # paper, CIFAR-100-LT IR 100: 50% then 80%
FEW_SAMPLERS = {"per_image": "class_balanced", "per_class": "inverse"}  # the two readings of p_3 = 1/N_y


@dataclass
class Stage:
    kind: str  # many | medium | few (the sampler / alpha family)
    name: str  # many | medium | medium-top | medium-low | few
    classes: list[int]
    epochs: int
    start: int  # first epoch (0-based)
    lr: float
    gamma: float | None  # None for the last stage


def stage_epochs(total: int, n: int, given: list[int] | None = None) -> list[int]:
    """Per-stage epochs: ``given`` or ``total`` split by the paper's 2:1:1 ratio (remainder to stage 1)."""
    if given is not None:
        return list(given)
    w = STAGE_WEIGHTS[n]
    epochs = [total * x // sum(w) for x in w]
    epochs[0] += total - sum(epochs)
    return epochs


def stage_lr(stage: Stage, epoch: int, warmup: int) -> float:
    """Stage 1 (index start 0): cosine from ``stage.lr`` to 0 with linear warm-up; later stages constant."""
    if stage.start != 0:
        return stage.lr
    e = epoch - stage.start
    if e < warmup:
        return stage.lr * (e + 1) / warmup
    span = max(1, stage.epochs - warmup)
    t = min(1.0, (e - warmup) / span)
    return stage.lr * (1 + math.cos(math.pi * t)) / 2


def _group_spec(groups: dict[str, list[int]], counts, stages: int, order: str) -> list[tuple[str, str, list[int]]]:
    many, medium, few = groups["many"], groups["medium"], groups["few"]
    if stages == 2:
        return [("many", "many", many), ("few", "few", few)]
    if stages == 4:
        ranked = sorted(medium, key=lambda c: (-counts[c], c))
        half = (len(ranked) + 1) // 2
        return [("many", "many", many), ("medium", "medium-top", sorted(ranked[:half])),
                ("medium", "medium-low", sorted(ranked[half:])), ("few", "few", few)]
    spec = [("many", "many", many), ("medium", "medium", medium), ("few", "few", few)]
    return [spec[0], spec[2], spec[1]] if order == "many-few-medium" else spec


def plan_stages(groups: dict[str, list[int]], counts, total_epochs: int, base_lr: float, stages: int = 3,
                order: str = "many-medium-few", epochs: list[int] | None = None, lrs: list[float] | None = None,
                gammas: list[float] | None = None) -> tuple[list[Stage], list[str]]:
    """The stages (empty groups dropped) and the names of the dropped ones. ``lrs`` default to
    ``[base_lr, base_lr / 10, ...]``, ``gammas`` to :data:`DEFAULT_GAMMA`."""
    spec = _group_spec(groups, list(counts), stages, order)
    epochs = stage_epochs(total_epochs, stages, epochs)
    lrs = list(lrs or [base_lr] + [base_lr / 10] * (stages - 1))
    gammas = list(gammas or DEFAULT_GAMMA[:stages - 1]) + [None]
    dropped, kept = [], []
    for i, ((kind, name, classes), e, lr, gamma) in enumerate(zip(spec, epochs, lrs, gammas)):
        if classes:
            kept.append([kind, name, classes, e, lr, gamma])
            continue
        dropped.append(name)
        if kept:
            kept[-1][3] += e
        else:  # the first stage is empty: its epochs and (cosine) lr go to the next one
            epochs[i + 1] += e
            lrs[i + 1] = lr
    if not kept:
        raise TrainingError("method do: every class group is empty")
    kept[-1][5] = None
    out, start = [], 0
    for kind, name, classes, e, lr, gamma in kept:
        out.append(Stage(kind, name, list(classes), e, start, lr, gamma))
        start += e
    return out, dropped


def stage_sampler(stage: Stage, labels: torch.Tensor, seed: int, batch_size: int, rho_m: float,
                  few_sampler: str = "per_image") -> Sampler:
    """Eq. 1's sampler of ``stage``: a *many* stage samples instances (``p_1 = L[y]``); a *medium* stage is
    group-preferred (``rho_m`` of every batch from the stage's classes); a *few* stage follows
    ``p_3(x, y) = 1/N_y`` read per image (``per_image``: each image drawn with probability proportional to
    ``1/N_y``, i.e. uniform over classes) or per class (``per_class``: a class drawn with probability proportional
    to ``1/N_y``, then an image of it uniformly)."""
    kind = {"many": "instance", "few": FEW_SAMPLERS[few_sampler], "medium": "group_preferred"}[stage.kind]
    return Sampler(labels, kind, seed, batch_size, rho=rho_m, group_classes=stage.classes)


def stage_log_prior(stage: Stage, labels: torch.Tensor, rho_m: float, few_sampler: str = "per_image") -> torch.Tensor:
    """``log pi_t``: the log label distribution of ``stage``'s sampler (:meth:`Sampler.label_distribution`), the
    prior that ``prior_correction: sampler`` subtracts from the logits of the sub-model frozen at that stage. A
    class the sampler never draws gets the smallest prior of a drawn class. (The sampler's seed and batch size do
    not enter its label distribution: dummies here.)"""
    p = stage_sampler(stage, labels, 0, 1, rho_m, few_sampler).label_distribution()
    return p.clamp_min(float(p[p > 0].min())).log().float()


def sampler_name(stage: Stage, rho_m: float, few_sampler: str) -> str:
    """The sampler of ``stage`` as text (``describe()``)."""
    return {"many": "instance", "few": f"{FEW_SAMPLERS[few_sampler]} (p_3 = 1/N_y {few_sampler.replace('_', ' ')})",
            "medium": f"group_preferred(rho={rho_m})"}[stage.kind]
