"""Long-tailed subsampling, shot groups and the subset hash.

The CIFAR-LT subset is bit-exact with Cao et al. (2019, LDAM-DRW ``imbalance_cifar.py``)::

    n_i = int(n_max * (1 / IR) ** (i / (C - 1)))        # exponential profile, classes in label order
    np.random.seed(0); for each class: np.random.shuffle(idx_c); keep idx_c[:n_i]

``index_sha256`` is the SHA-256 of the selected indices, sorted, as little-endian int64 bytes.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

GROUP_NAMES = ("many", "medium", "few")


def imbalance_ratio(value: float) -> float:
    """Normalise an imbalance given either as a ratio (100) or as a factor (0.01) to the ratio (>= 1)."""
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"imbalance must be a positive ratio (e.g. 100) or factor (e.g. 0.01), got {value}")
    return 1.0 / value if value < 1 else value


def profile_counts(n_max: int, num_classes: int, ratio: float, profile: str = "exp") -> list[int]:
    """Per-class image counts of a long-tailed profile, head class first (label order).

    ``exp``: ``int(n_max * (1/IR) ** (i / (C-1)))`` (Cao et al. 2019). ``step``: the first half of the
    classes keep ``n_max``, the second half ``int(n_max / IR)`` (Cao et al.'s step imbalance, mu = 0.5).
    """
    ratio = imbalance_ratio(ratio)
    if num_classes < 1:
        raise ValueError("num_classes must be >= 1")
    if profile == "exp":
        if num_classes == 1:
            return [int(n_max)]
        factor = 1.0 / ratio
        return [int(n_max * factor ** (i / (num_classes - 1.0))) for i in range(num_classes)]
    if profile == "step":
        half = num_classes // 2
        return [int(n_max)] * half + [int(n_max / ratio)] * (num_classes - half)
    raise ValueError(f"unknown imbalance profile {profile!r}; allowed: exp, step")


def longtail_indices(labels: Sequence[int] | np.ndarray, counts: Sequence[int], seed: int = 0) -> np.ndarray:
    """Select ``counts[c]`` samples of every class exactly as Cao et al. do.

    ``np.random.seed(seed)``, then for each class in label order ``np.random.shuffle`` of that class's indices
    (in sample order) and keep the first ``counts[c]``. Returns the selected indices in that concatenated order.
    Uses the legacy global NumPy generator because that is what makes the subset bit-exact; its state is saved
    and restored so callers' randomness is unaffected.
    """
    labels = np.asarray(labels, dtype=np.int64)
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        chosen = []
        for c, n in enumerate(counts):
            idx = np.where(labels == c)[0]
            if n > len(idx):
                raise ValueError(f"class {c} has {len(idx)} samples, the profile asks for {n}")
            np.random.shuffle(idx)
            chosen.append(idx[:n])
    finally:
        np.random.set_state(state)
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


def index_sha256(indices: Sequence[int] | np.ndarray) -> str:
    """SHA-256 of the indices, sorted, as little-endian int64 bytes."""
    arr = np.sort(np.asarray(indices, dtype=np.int64)).astype("<i8")
    return hashlib.sha256(arr.tobytes()).hexdigest()


def class_counts(labels: Sequence[int] | np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)[:num_classes].tolist()


@dataclass(frozen=True)
class ShotGroups:
    """Many / medium / few membership of every class, from training counts.

    ``rule`` is ``"thresholds"`` (many > hi, medium lo..hi inclusive, few < lo: the classifier-balancing
    convention) or ``"terciles"`` (the fallback used when a threshold group would be empty, e.g. on 10 classes).
    """

    membership: tuple[str, ...]
    thresholds: tuple[int, int] = (100, 20)
    rule: str = "thresholds"

    def indices(self, name: str) -> list[int]:
        return [c for c, g in enumerate(self.membership) if g == name]

    def sizes(self) -> dict[str, int]:
        return {g: self.membership.count(g) for g in GROUP_NAMES}

    def to_json(self) -> dict:
        return {**self.sizes(), "thresholds": list(self.thresholds), "rule": self.rule}


def shot_groups(counts: Sequence[int], many: int = 100, few: int = 20, fallback: str = "terciles") -> ShotGroups:
    """Assign classes to shot groups by training count: many > ``many``, few < ``few``, medium otherwise.

    If a group would be empty and ``fallback == "terciles"``, classes are ranked by count (descending, ties by
    label) and split into three near-equal frequency terciles instead; ``rule`` records which was used.
    ``fallback="none"`` keeps the (possibly empty) threshold groups.
    """
    if few > many:
        raise ValueError(f"few threshold ({few}) must not exceed many threshold ({many})")
    membership = tuple("many" if n > many else "few" if n < few else "medium" for n in counts)
    groups = ShotGroups(membership, (int(many), int(few)), "thresholds")
    if fallback == "none" or all(groups.sizes().values()) or len(counts) < 3:
        return groups
    if fallback != "terciles":
        raise ValueError(f"unknown shot-group fallback {fallback!r}; allowed: terciles, none")
    order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
    bounds = np.array_split(np.array(order), 3)
    tercile = {}
    for name, members in zip(GROUP_NAMES, bounds):
        for c in members:
            tercile[int(c)] = name
    return ShotGroups(tuple(tercile[c] for c in range(len(counts))), (int(many), int(few)), "terciles")
