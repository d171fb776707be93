"""How far and how gradually a decoupling prunes (``seeds/003_…``, "Taylor-guided Parameter Decoupling").

Eq. 4 (gradual pruning, Zhu & Gupta 2017): ``gamma_t = gamma_{i+1} + (gamma_i - gamma_{i+1}) (1 - t/Δt)^3``
raises the pruned fraction from ``gamma_i`` to ``gamma_{i+1}`` in ``Δt`` steps, each followed by one retraining
iteration; ``gamma_i`` runs over the grid ``0, 10, ..., 90%`` of the sweep. :func:`pruning_ratios` gives the
fraction after every step:

* ``per_increment`` (the paper): ``Δt`` steps per grid increment, so reaching 0.5 on a grid of 0.1 takes 50 steps
  and 0.8 takes 80 (a ratio off the grid ends with a partial increment);
* ``spread`` (tailwise before issue #22): ``Δt`` steps over the whole ramp from 0 to ``gamma``.

``Δt = 0`` prunes in one shot without retraining. :func:`knee` is the paper's γ_best rule on the sweep's curve.

Example::

    for ratio in pruning_ratios(0.5, steps=10):   # 50 ratios, 0.1 reached after the 10th
        decoupler.prune(scores, ratio)
        train_one_step()
"""
from __future__ import annotations

import math

SCHEDULES = ("per_increment", "spread")


def cubic_ratio(k: int, steps: int, start: float, end: float) -> float:
    """Eq. 4: ``end + (start - end) (1 - k / steps)^3`` (``start`` at k = 0, ``end`` at k = steps)."""
    return end + (start - end) * (1.0 - k / steps) ** 3


def pruning_ratios(gamma: float, steps: int, schedule: str = "per_increment", grid: float = 0.1) -> list[float]:
    """The pruned fraction after every pruning step, ending at ``gamma`` (``[gamma]``: one shot, ``steps = 0``)."""
    if steps == 0:
        return [gamma]
    if schedule == "spread":
        return [cubic_ratio(k, steps, 0.0, gamma) for k in range(1, steps + 1)]
    increments = max(1, math.ceil(round(gamma / grid, 9)))
    out = []
    for i in range(increments):
        start, end = i * grid, min((i + 1) * grid, gamma)
        out += [cubic_ratio(k, steps, start, end) for k in range(1, steps + 1)]
    return out


def knee(ratios: list[float], accuracy: list[float]) -> float:
    """γ_best: the ratio just before the largest fall of ``accuracy`` between consecutive ratios (the most compact
    model before the marked drop); ``ratios[0]`` when accuracy never falls."""
    falls = [accuracy[i] - accuracy[i + 1] for i in range(len(ratios) - 1)]
    i = max(range(len(falls)), key=lambda j: (falls[j], -j))
    return ratios[i] if falls[i] > 0 else ratios[0]
