"""The options of neuron growth (``method: plasticity``) and the event schedule they define.

The standalone :class:`~.growth.Plasticity` reads the surgery and ranking keys; the trainer adapter
(:class:`~.method.PlasticityMethod`) also reads the schedule keys (``every_epochs``, ``accumulate``,
``last_event_epoch``).
"""
from __future__ import annotations

from dataclasses import dataclass

from ...options import bounded, choice


@dataclass
class PlasticityOptions:
    every_epochs: int = bounded(30, 1)  # E_mod: an event after epochs E, 2E, ... (1-based)
    alpha: float = bounded(0.3, 0.0, 0.5, low_open=True)  # fraction duplicated / removed per layer and event
    scope: str = choice("internal", "residual", "all", default="internal")
    ranking: str = choice("gradient", "l1", default="gradient")
    accumulate: str = choice("epoch", "last_batch", default="epoch")
    reweight: bool = True  # rank with the class-reweighted loss's gradient
    reweight_power: float = bounded(1.0, 0.0)  # w_c ∝ n_c^-p, mean 1 over classes
    weight_scaling: bool = True
    copy_bn: str = choice("layer", "perturb", default="layer")  # the copy's BN gamma/beta: drawn / source's + noise
    bn_noise: float = bounded(0.05, 0.0)  # perturb: sigma of the noise on the source's gamma/beta; layer: min std
    weight_noise: float = bounded(0.0, 0.0)  # sigma of the copy's incoming-weight noise, x the source row's RMS
    source_momentum: str = choice("keep", "halve", default="keep")  # the source's momentum at a duplication
    exempt: str = choice("pairs", "copies", "none", default="pairs")  # the last event's channels kept from removal
    pair_scores: str = choice("lineage", "rescale", "raw", default="lineage")  # undo the splits' halving of scores
    twin_cosine: float = bounded(0.99, 0.0, 1.0, high_open=True)  # incoming-weight cosine that makes a twin
    last_event_epoch: int | None = None  # no event after this epoch (1-based); None: before the first LR decay


def base_lr_end(train) -> int:
    """The last epoch (1-based) after which training still continues at the base learning rate: the epoch
    before the first step milestone (``step``; ``train.epochs - 1`` without a milestone inside the run), the
    cosine's midpoint, where the rate has fallen to half the base (``cosine``: it decays from the first
    post-warm-up epoch, so it has no plateau; past the midpoint more than half the step size is gone), or
    ``train.epochs - 1`` (``constant``)."""
    last = train.epochs - 1
    if train.schedule == "step":
        inside = [m for m in train.milestones if m < train.epochs]
        return min(last, min(inside) - 1) if inside else last
    if train.schedule == "cosine":
        return min(last, train.warmup_epochs + (train.epochs - train.warmup_epochs) // 2)
    return last


def last_event(o: PlasticityOptions, train) -> int:
    """The last epoch (1-based) that may end in an event: ``last_event_epoch``, else :func:`base_lr_end`."""
    return o.last_event_epoch if o.last_event_epoch is not None else base_lr_end(train)


def event_epochs(o: PlasticityOptions, train) -> list[int]:
    """The epochs (1-based) that end in an event: the multiples of E_mod up to :func:`last_event`."""
    return list(range(o.every_epochs, last_event(o, train) + 1, o.every_epochs))
