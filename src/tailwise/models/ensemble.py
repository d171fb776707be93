"""Aggregating the logits of ``T`` sub-networks (DO's inference, ``seeds/003_…`` section "Instance-level
Test-time Learning"), and :class:`SubModelEnsemble`, the deployable module that does it.

``aggregation``:

* ``average``: the mean of the sub-models' logits ("Ours wo TTL").
* ``instance`` (Eq. 5): per test image, ``T`` weights ``lambda = floor + (1 - T floor) softmax(w)`` maximising the
  cosine similarity of the weighted mixtures of the sub-models' softmax outputs on two stochastic views of the
  image (``steps`` plain gradient-ascent steps of size ``lr`` from ``w = 0``); the prediction is
  ``sum_t lambda_t z_t(x)`` on the clean image.
* ``group`` (SADE, Zhang et al. 2022, the paper's group-level baseline of Table 8): one ``lambda`` for all images,
  learned the same way on the mean similarity over a whole unlabelled split (:func:`group_weights`), then fixed.

``log_priors`` (optional, one ``K``-vector per member): post-hoc logit adjustment (Menon et al., ICLR 2021) of
each member before any aggregation, ``z_t(x) - log pi_t``, where ``pi_t`` is the label distribution member ``t``
was trained under; every aggregation, the views of ``instance`` and ``group`` included, sees the adjusted logits.

The two views are a random crop with ``padding`` zero padding and a flip of the normalised batch, from a
generator seeded by the batch's content and ``seed``: a prediction is a pure function of its batch.

Example (group-level weights learned on unlabelled batches)::

    group = ensemble.with_aggregation("group", group_lambda=ensemble.learn_group_weights(x for x, _ in loader))
"""
from __future__ import annotations

import time
import zlib
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..data.loader import random_crop, random_flip

AGGREGATIONS = ("average", "instance", "group")


def _mixture_weights(w: torch.Tensor, floor: float) -> torch.Tensor:
    return floor + (1 - w.shape[-1] * floor) * w.softmax(-1)


def _check_floor(floor: float, t: int) -> None:
    if floor * t >= 1:
        raise ValueError(f"tta_floor {floor} x {t} sub-models must be below 1")


def instance_weights(views1: torch.Tensor, views2: torch.Tensor, steps: int = 10, lr: float = 1.0,
                     floor: float = 0.05) -> torch.Tensor:
    """Eq. 5 per image. ``views1`` / ``views2``: ``T x B x K`` softmax outputs of the ``T`` sub-models on two
    views of ``B`` images. Returns ``B x T`` weights (every image optimised independently)."""
    t, b, _ = views1.shape
    _check_floor(floor, t)
    v1, v2 = views1.detach().float().permute(1, 0, 2), views2.detach().float().permute(1, 0, 2)  # B x T x K
    w = torch.zeros(b, t, device=v1.device, requires_grad=True)
    with torch.enable_grad():
        for _ in range(steps):
            lam = _mixture_weights(w, floor)
            sim = F.cosine_similarity((lam.unsqueeze(2) * v1).sum(1), (lam.unsqueeze(2) * v2).sum(1), dim=1).sum()
            (grad,) = torch.autograd.grad(sim, w)
            with torch.no_grad():
                w += lr * grad
    with torch.no_grad():
        return _mixture_weights(w, floor)


def group_weights(views: list[tuple[torch.Tensor, torch.Tensor]], steps: int = 10, lr: float = 1.0,
                  floor: float = 0.05) -> torch.Tensor:
    """One ``T``-vector of weights for all images: gradient ascent on the *mean* cosine similarity over every
    batch's ``(T x B x K, T x B x K)`` view pair (SADE's group-level test-time aggregation)."""
    t = views[0][0].shape[0]
    _check_floor(floor, t)
    total = sum(v1.shape[1] for v1, _ in views)
    w = torch.zeros(t, requires_grad=True)
    with torch.enable_grad():
        for _ in range(steps):
            grad = torch.zeros(t)
            for v1, v2 in views:
                mix = _mixture_weights(w, floor).to(v1.device).view(t, 1, 1)
                sim = F.cosine_similarity((mix * v1.float()).sum(0), (mix * v2.float()).sum(0), dim=1).sum() / total
                grad += torch.autograd.grad(sim, w)[0]
            with torch.no_grad():
                w += lr * grad
    with torch.no_grad():
        return _mixture_weights(w, floor)


def batch_views(x: torch.Tensor, padding: int, flip: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two stochastic views of a normalised batch, from a generator seeded by the batch's content and ``seed``."""
    sample = x.detach().flatten()[:: max(1, x.numel() // 4096)].float().cpu().numpy().tobytes()
    g = torch.Generator().manual_seed((zlib.crc32(sample) + 7919 * int(seed)) % 2**64)
    views = []
    for _ in range(2):
        v = random_crop(x, padding, g)
        views.append(random_flip(v, g) if flip else v)
    return views[0], views[1]


def view_probabilities(forward: Callable[[int, torch.Tensor], torch.Tensor], n: int, x: torch.Tensor,
                       padding: int, flip: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``T x B x K`` softmax outputs of the ``n`` sub-models on the two views of ``x``."""
    v1, v2 = batch_views(x, padding, flip, seed)
    return (torch.stack([forward(t, v1).float().softmax(1) for t in range(n)]),
            torch.stack([forward(t, v2).float().softmax(1) for t in range(n)]))


def aggregate(forward: Callable[[int, torch.Tensor], torch.Tensor], n: int, x: torch.Tensor, aggregation: str,
              steps: int = 10, lr: float = 1.0, floor: float = 0.05, padding: int = 4, flip: bool = True,
              seed: int = 0, group_lambda: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logits, lambda)`` of ``n`` sub-models (``forward(t, x)`` gives sub-model ``t``'s logits): the
    aggregated prediction and the ``B x T`` weights used (None for ``average``, or ``group`` before its weights
    were learned, which falls back to the average)."""
    z = torch.stack([forward(t, x).float() for t in range(n)])  # T x B x K
    views = view_probabilities(forward, n, x, padding, flip, seed) if n > 1 and aggregation == "instance" else None
    return combine(z, aggregation, views, steps, lr, floor, group_lambda)


def combine(z: torch.Tensor, aggregation: str, views: tuple[torch.Tensor, torch.Tensor] | None = None,
            steps: int = 10, lr: float = 1.0, floor: float = 0.05,
            group_lambda: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`aggregate` on computed logits: ``z`` (``T x B x K``), and for ``instance`` the two views' softmax
    outputs (:func:`view_probabilities`)."""
    n = z.shape[0]
    if n == 1 or aggregation == "average" or (aggregation == "group" and group_lambda is None):
        return z.mean(0), None
    if aggregation == "group":
        lam = torch.as_tensor(group_lambda).to(z.device, z.dtype).expand(z.shape[1], n)
    else:
        lam = instance_weights(*views, steps, lr, floor)
    return (lam.t().unsqueeze(2) * z).sum(0), lam


class SubModelEnsemble(nn.Module):
    """``T`` networks of one architecture whose logits are aggregated (see the module docstring); what
    ``method: do`` deploys. ``arch`` records the member architecture (members built by tailwise; ``None`` for other
    networks, which cannot be saved as a model folder) and the aggregation settings, ``log_priors`` included, so
    :func:`tailwise.deploy.load_model` rebuilds it from ``arch.json`` and the weights alone.

    Example::

        ensemble = SubModelEnsemble([sub1, sub2, final], "instance")   # then ensemble(x): aggregated logits
        average = ensemble.with_aggregation("average")                  # the same members, another aggregation
    """

    def __init__(self, members: list[nn.Module], aggregation: str = "average", steps: int = 10, lr: float = 1.0,
                 floor: float = 0.05, padding: int = 4, flip: bool = True, seed: int = 0,
                 group_lambda: list[float] | None = None, log_priors: list[list[float]] | None = None):
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation {aggregation!r}: expected one of {AGGREGATIONS}")
        offsets = torch.zeros(len(members), 1)
        if log_priors is not None:
            offsets = torch.stack([torch.as_tensor(p, dtype=torch.float32).cpu() for p in log_priors])
            if offsets.dim() != 2 or len(offsets) != len(members) or offsets.shape[1] < 2:
                raise ValueError(f"log_priors: one vector of class log priors per member expected ({len(members)} "
                                 f"members), got shape {tuple(offsets.shape)}")
            log_priors = offsets.tolist()
        self.offsets = offsets  # a plain float32 tensor, not a buffer: .to(dtype) must not round the priors
        self.members = nn.ModuleList(members)
        self.settings = {"aggregation": aggregation, "steps": steps, "lr": lr, "floor": floor, "padding": padding,
                         "flip": flip, "seed": seed, "group_lambda": group_lambda, "log_priors": log_priors}
        member_arch = getattr(members[0], "arch", None)  # a tailwise network's: what load_model rebuilds
        self.arch = {"ensemble": {"members": len(members), **self.settings},
                     "member": dict(member_arch) if member_arch is not None else None}

    def member_logits(self, t: int, x: torch.Tensor) -> torch.Tensor:
        """Member ``t``'s logits on ``x``, adjusted by its log prior where the ensemble has them."""
        z = self.members[t](x).float()
        return z - self.offsets[t].to(z.device)

    def forward_with_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = self.settings
        lam = torch.tensor(s["group_lambda"]) if s["group_lambda"] is not None else None
        return aggregate(self.member_logits, len(self.members), x, s["aggregation"], s["steps"],
                         s["lr"], s["floor"], s["padding"], s["flip"], s["seed"], lam)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_weights(x)[0]

    def with_aggregation(self, aggregation: str, **changes) -> "SubModelEnsemble":
        """The same members (shared, not copied) under another aggregation and settings."""
        settings = {**self.settings, **changes}
        settings.pop("aggregation")
        return SubModelEnsemble(list(self.members), aggregation, **settings)

    @torch.no_grad()
    def learn_group_weights(self, batches: Iterable[torch.Tensor]) -> list[float]:
        """SADE's group-level weights (:func:`group_weights`) from unlabelled normalised ``batches``."""
        s, n = self.settings, len(self.members)
        views = [view_probabilities(self.member_logits, n, x, s["padding"], s["flip"], s["seed"])
                 for x in batches]
        return [round(float(v), 6) for v in group_weights(views, s["steps"], s["lr"], s["floor"])]


@torch.no_grad()
def aggregation_report(ensemble: SubModelEnsemble, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                       membership: dict, sync: Callable[[], None] = lambda: None) -> dict:
    """The prediction cost per image of ``ensemble`` over labelled ``batches`` and, where its aggregation
    weighs each image (``instance``), the mean ``lambda_t`` per class group of the true label (DO's Table 9;
    ``membership`` maps a class to its group). ``sync`` waits for the device before each clock reading."""
    lams, labels, elapsed, seen = [], [], 0.0, 0
    for x, y in batches:
        sync()
        start = time.perf_counter()
        _, lam = ensemble.forward_with_weights(x)
        sync()
        elapsed += time.perf_counter() - start
        seen += len(y)
        if lam is not None:
            lams.append(lam.cpu())
            labels += [int(c) for c in y]
    out = {"aggregation": ensemble.settings["aggregation"], "ms_per_image": round(1000 * elapsed / max(1, seen), 4)}
    if lams:
        lam = torch.cat(lams).double()
        table = {}
        for g in ("many", "medium", "few"):
            rows = torch.tensor([membership[c] == g for c in labels])
            if rows.any():
                table[g] = [round(float(v), 4) for v in lam[rows].mean(0)]
        out["mean_lambda_per_group"] = table  # Table 9: one list (lambda_1..T) per group
    return out
