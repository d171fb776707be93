"""DO's classifier-exemption probe: the validation comparison that chooses ``exempt`` (issue #22) within one run.

The paper (``seeds/003_…``) is silent on whether the classifier is decoupled. A run decouples it as its own
``exempt`` says; alongside, the probe follows the stricter readings (``classifier`` -> ``classifier_bias`` and
``none``; ``classifier_bias`` -> ``none``). At each decoupling it ranks the classifier tensors that a reading
decouples (and the run does not) by the same Taylor importance ``E_w = sum_b (w g_b)^2`` on the stage's images,
from the same pass as the run's own scores, keeps the top ``1 - γ`` of their still-free entries per tensor
(cumulatively over the stages, as :class:`~.masks.FreezeMasks` freezes), and the adapter evaluates the new
sub-model with the classifier's other entries zeroed, everything else as the run trained it.

At the first decoupling the kept entries are exactly those a run with that reading freezes (its importance pass
precedes any masking: tests/test_decoupled.py); the accuracy is not that run's: its retraining with those entries
at zero (the rest of the network adapting to them) and their re-initialisation are not simulated, here or later.
So the probe is a pessimistic estimate of the stricter readings, exact entries without retraining, which isolates
the effect the issue measured on the landed run: classifier rows and biases of the classes a stage does not
train, pruned to near nothing because they are scored on the stage's images only.
"""
from __future__ import annotations

import torch
from torch import nn

from .masks import decoupled_parameters, select_pruned

STRICTER = {"classifier": ("classifier_bias", "none"), "classifier_bias": ("none",), "none": ()}


class ExemptProbe:
    """Per stricter reading of ``exempt``: the classifier entries it would have frozen so far."""

    def __init__(self, model: nn.Module, exempt: str):
        own = {name for name, _ in decoupled_parameters(model, exempt)}
        every = dict(decoupled_parameters(model, "none"))
        self.readings = {r: [n for n, _ in decoupled_parameters(model, r) if n not in own] for r in STRICTER[exempt]}
        self.names = sorted({n for names in self.readings.values() for n in names})
        self.params = [(n, every[n]) for n in self.names]  # the tensors the probe scores
        self.kept = {r: {n: torch.zeros(every[n].shape, dtype=torch.bool) for n in names}
                     for r, names in self.readings.items()}

    def decouple(self, scores: list[torch.Tensor], gamma: float) -> None:
        """One decoupling at ratio ``gamma``; ``scores`` of :attr:`params`, in order."""
        by_name = dict(zip(self.names, (s.cpu() for s in scores)))
        for r, names in self.readings.items():
            free = [~self.kept[r][n] for n in names]
            pruned = select_pruned([by_name[n] for n in names], free, gamma, "layer")
            for n, f, p in zip(names, free, pruned):
                self.kept[r][n] |= f & ~p

    def submodel(self, reading: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` (a sub-model's) with the classifier entries ``reading`` would not have frozen zeroed."""
        out = dict(state)
        for n, keep in self.kept[reading].items():
            out[n] = state[n] * keep.to(state[n].device, state[n].dtype)
        return out

    def state_dict(self) -> dict:
        return {r: {n: k.clone() for n, k in kept.items()} for r, kept in self.kept.items()}

    def load_state_dict(self, state: dict) -> None:
        self.kept = {r: {n: state[r][n].cpu().bool() for n in names} for r, names in self.readings.items()}
