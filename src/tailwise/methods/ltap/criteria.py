"""LTAP's five importance criteria per structured channel, accumulated over a scoring window.

A channel ``c`` of a channel group (:mod:`tailwise.compress.groups`) owns the vector ``w_c``: the concatenation,
over every member of its group, of that member's slice ``c`` (producer conv filters and biases, BatchNorm gamma and
beta, and the consumers' input slices). ``g_c`` is the same slice of the minibatch loss gradient (``p.grad`` after
``backward``, before weight decay, momentum or clipping; divided by the AMP loss scale when AMP is on).

The five criteria (paper eq. 2-3; names as in its implementation details), higher = more important:

=====================  ==========================================================================================
``magnitude``          ``||w_c||_2`` at the end of the window.
``avg_magnitude``      ``||w_c||_2 / n_c`` with ``n_c`` the number of *live* elements of ``w_c`` (the parameters
                       the channel would own in the compressed model: slices of already pruned neighbour channels
                       are not counted).
``cosine_similarity``  ``1 + mean_t cos(w_c^t, g_c^t)`` over the window's steps ``t`` (the paper's
                       ``w . w_ref / (|w| |w_ref|)`` with the gradient as ``w_ref``; the ``+1`` shift to ``[0, 2]``
                       and "higher = more important" are the public code's convention). 0 where a norm is 0.
``taylor_first_order`` ``mean_t |<w_c^t, g_c^t>|`` (first-order Taylor estimate of the loss change on removal).
``taylor_second_order`` ``second_order="fisher"`` (default): ``1/2 sum_i H_ii w_i^2`` over the elements ``i`` of
                       ``w_c`` at the end of the window, with ``H_ii = mean_t (g_i^t)^2`` the running mean of squared
                       minibatch gradients (an empirical-Fisher diagonal; its scale cancels in the normalisation).
                       ``second_order="public-code"``: ``mean_t 1/2 <w_c^t, g_c^t>^2`` (what the public code
                       computes from one minibatch; no Hessian involved).
=====================  ==========================================================================================

Normalisation before mixing (:func:`normalise`): each criterion's vector is divided by a scale computed over
**all live channels of the network** (global, not per layer): ``l2`` (default, as the public code: the vector's
Euclidean norm over the live channels), ``mean`` (its mean) or ``max`` (its maximum). Pruned channels score 0.
``group-mean`` (an option, not the paper's) divides by the mean within each channel group instead, as the
pruning baselines do: a residual-stream channel's vector spans many tensors, so un-normalised sums favour it
over block-internal channels under a global ranking. Under ``group-mean`` ``avg_magnitude`` is ``magnitude`` again:
the channels of one group own equally many live elements (the same producer inputs, the same consumer outputs),
so ``||w_c|| / n_c`` is ``||w_c||`` times a per-group constant that the group mean divides out; LTAP's default
criteria leave it out there (:class:`~tailwise.methods.ltap.pruner.LTAPOptions`).
The mixed score is ``S_c = sum_k alpha_k * normalised_k[c]`` (paper eq. 1, :func:`mix`).

Cost: every step of the window does three ``torch._foreach_mul`` calls over the group tensors, one stack and one
sum per (tensor, channel dim) pair, and one ``index_add_`` into the flat per-channel vector -- a loop over tensors,
never over elements; the Fisher diagonal is one ``torch._foreach_add_``. Everything stays on the model's device.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ...compress.groups import ChannelGroup

CRITERIA = ("magnitude", "avg_magnitude", "cosine_similarity", "taylor_first_order", "taylor_second_order")
GRADIENT_CRITERIA = ("cosine_similarity", "taylor_first_order", "taylor_second_order")
NORMALISATIONS = ("l2", "mean", "max", "group-mean")
SECOND_ORDER = ("fisher", "public-code")


def default_criteria(normalize: str) -> list[str]:
    """The criteria LTAP mixes when none are given: all five, less ``avg_magnitude`` under ``group-mean``, where it
    ranks channels exactly as ``magnitude`` does (the row length is constant within a channel group)."""
    return [c for c in CRITERIA if not (c == "avg_magnitude" and normalize == "group-mean")]


class ChannelLayout:
    """All channels of all groups laid out in one flat vector (group ``i`` at ``offsets[i]:offsets[i]+size``),
    with the scatter map that sums per-(tensor, dim) reductions into it."""

    def __init__(self, model: nn.Module, groups: list[ChannelGroup]):
        self.groups = groups
        self.offsets, total = [], 0
        for g in groups:
            self.offsets.append(total)
            total += g.size
        self.total = total
        self.keys: list[tuple[str, str]] = []
        key_index: dict[tuple[str, str], int] = {}
        targets: dict[tuple[int, int], torch.Tensor] = {}
        for gi, g in enumerate(groups):
            for s in g.slices:
                key = (s.module_name, s.tensor_name)
                if key not in key_index:
                    key_index[key] = len(self.keys)
                    self.keys.append(key)
                ti = key_index[key]
                tensor = getattr(model.get_submodule(s.module_name), s.tensor_name)
                pair = (ti, s.dim)
                if pair not in targets:  # entries of a dim no group governs go to the dump bin ``total``
                    targets[pair] = torch.full((tensor.shape[s.dim],), total, dtype=torch.long)
                targets[pair][s.index] = self.offsets[gi] + torch.arange(g.size)
        self.pairs = list(targets)
        self._scatter = torch.cat([targets[p] for p in self.pairs])
        self._scatter_on: dict[torch.device, torch.Tensor] = {}

    def tensors(self, model: nn.Module) -> list[torch.Tensor]:
        return [getattr(model.get_submodule(m), n) for m, n in self.keys]

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-group pieces of a flat per-channel vector."""
        return [flat[o:o + g.size] for o, g in zip(self.offsets, self.groups)]

    def reduce(self, values: list[torch.Tensor]) -> torch.Tensor:
        """Per-channel sums: ``values[i]`` is ``(Q, *shape_i)`` (Q stacked elementwise quantities of tensor
        ``keys[i]``); returns ``(Q, total)`` float64, entry ``[q, c]`` the sum of quantity ``q`` over every slice
        of channel ``c``."""
        parts = []
        for ti, dim in self.pairs:
            x = values[ti]
            dims = [d + 1 for d in range(x.dim() - 1) if d != dim]
            parts.append(x.sum(dim=dims) if dims else x)
        flat = torch.cat(parts, dim=1).double()
        scatter = self._scatter_on.get(flat.device)
        if scatter is None:
            scatter = self._scatter_on[flat.device] = self._scatter.to(flat.device)
        out = torch.zeros(flat.shape[0], self.total + 1, dtype=torch.float64, device=flat.device)
        out.index_add_(1, scatter, flat)
        return out[:, :self.total]

    def live_elements(self, model: nn.Module, keep: list[torch.Tensor]) -> torch.Tensor:
        """``n_c``: for every channel, its number of live elements (``keep[i]``: the live channels of group i)."""
        tensors = self.tensors(model)
        masks = [torch.ones(t.shape, dtype=torch.float64) for t in tensors]
        key_index = {k: i for i, k in enumerate(self.keys)}
        for g, alive in zip(self.groups, keep):
            dead = (~alive.cpu()).nonzero().flatten()
            if len(dead) == 0:
                continue
            for s in g.slices:
                masks[key_index[(s.module_name, s.tensor_name)]].index_fill_(s.dim, s.index[dead], 0.0)
        return self.reduce([m.unsqueeze(0).to(tensors[0].device) for m in masks])[0]


class CriteriaAccumulator:
    """Accumulates the gradient-based criteria over the scoring window's steps and computes all five."""

    def __init__(self, layout: ChannelLayout, criteria: list[str], second_order: str = "fisher"):
        unknown = [c for c in criteria if c not in CRITERIA]
        if unknown:
            raise ValueError(f"unknown LTAP criteria {unknown}; allowed: {', '.join(CRITERIA)}")
        if second_order not in SECOND_ORDER:
            raise ValueError(f"second_order: {second_order!r}; allowed: {', '.join(SECOND_ORDER)}")
        self.layout, self.criteria, self.second_order = layout, list(criteria), second_order
        self.wants_gradients = any(c in GRADIENT_CRITERIA for c in self.criteria)
        self.fisher_needed = "taylor_second_order" in self.criteria and second_order == "fisher"
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.sums: dict[str, torch.Tensor] = {}  # per-channel running sums (float64)
        self.fisher: list[torch.Tensor] | None = None  # per-element running sums of g^2

    # ------------------------------------------------------------------------------------------- per step
    @torch.no_grad()
    def accumulate(self, model: nn.Module, grad_scale: float = 1.0) -> bool:
        """Add one step's gradients; returns False (and adds nothing) when they are not finite (AMP overflow)."""
        tensors = self.layout.tensors(model)
        ws = [t.detach() for t in tensors]
        gs = [t.grad.detach() if t.grad is not None else torch.zeros_like(t) for t in tensors]
        if grad_scale != 1.0:
            gs = torch._foreach_div(gs, grad_scale)
        quantities = []  # which per-channel sums this step needs: <w,g>, |g|^2, |w|^2
        need_cos = "cosine_similarity" in self.criteria
        need_dot = need_cos or "taylor_first_order" in self.criteria or (
            "taylor_second_order" in self.criteria and self.second_order == "public-code")
        if need_dot:
            quantities.append(torch._foreach_mul(ws, gs))
        gg = torch._foreach_mul(gs, gs) if (need_cos or self.fisher_needed) else None
        if need_cos:
            quantities += [gg, torch._foreach_mul(ws, ws)]
        if quantities:
            r = self.layout.reduce([torch.stack(q) for q in zip(*quantities)])
            if grad_scale != 1.0 and not bool(torch.isfinite(r).all()):
                return False
            dot = r[0]
            terms = {}
            if need_cos:
                denom = (r[1] * r[2]).sqrt()
                cosine = dot / denom.clamp_min(1e-300)
                terms["cosine_similarity"] = torch.where(denom > 0, cosine, torch.zeros_like(dot))
            if "taylor_first_order" in self.criteria:
                terms["taylor_first_order"] = dot.abs()
            if "taylor_second_order" in self.criteria and self.second_order == "public-code":
                terms["taylor_second_order"] = 0.5 * dot * dot
            for name, value in terms.items():
                self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        if self.fisher_needed:
            if self.fisher is None:
                self.fisher = [g.detach().float().clone() for g in gg]
            else:
                torch._foreach_add_(self.fisher, [g.float() for g in gg])
        self.steps += 1
        return True

    # -------------------------------------------------------------------------------------------- scores
    @torch.no_grad()
    def compute(self, model: nn.Module, keep: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Raw (unnormalised) flat per-channel value of every selected criterion."""
        if self.wants_gradients and self.steps == 0:
            raise RuntimeError("LTAP: gradient-based criteria requested but the scoring window saw no step")
        tensors = [t.detach() for t in self.layout.tensors(model)]
        out: dict[str, torch.Tensor] = {}
        if "magnitude" in self.criteria or "avg_magnitude" in self.criteria:
            norm = self.layout.reduce([torch.stack([t * t]) for t in tensors])[0].sqrt()
            if "magnitude" in self.criteria:
                out["magnitude"] = norm
            if "avg_magnitude" in self.criteria:
                n = self.layout.live_elements(model, keep).to(norm.device)
                out["avg_magnitude"] = norm / n.clamp_min(1.0)
        if "cosine_similarity" in self.criteria:
            out["cosine_similarity"] = 1.0 + self.sums["cosine_similarity"] / self.steps
        if "taylor_first_order" in self.criteria:
            out["taylor_first_order"] = self.sums["taylor_first_order"] / self.steps
        if "taylor_second_order" in self.criteria:
            if self.second_order == "public-code":
                out["taylor_second_order"] = self.sums["taylor_second_order"] / self.steps
            else:
                h = [f / self.steps for f in self.fisher]
                out["taylor_second_order"] = 0.5 * self.layout.reduce(
                    [torch.stack([hi * t.float() * t.float()]) for hi, t in zip(h, tensors)])[0]
        return {name: out[name] for name in self.criteria}

    # ----------------------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        return {"steps": self.steps, "sums": {k: v.detach().cpu().clone() for k, v in self.sums.items()},
                "fisher": None if self.fisher is None else [f.detach().cpu().clone() for f in self.fisher]}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.steps = int(state["steps"])
        self.sums = {k: v.clone().to(device) for k, v in state["sums"].items()}
        self.fisher = None if state["fisher"] is None else [f.clone().to(device) for f in state["fisher"]]


def normalise(values: torch.Tensor, live: torch.Tensor, how: str = "l2",
              segments: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """``values / scale`` over the live channels (``live``: flat bool mask); 0 elsewhere.

    ``scale`` over all live entries of the network: ``l2`` = Euclidean norm, ``mean`` = mean, ``max`` = max of
    |value|. ``group-mean`` (not the paper's: the pruning baselines' normalisation) divides each group's entries
    by their own live mean instead; ``segments`` lists each group's ``(offset, size)`` in the flat vector.
    A zero scale (a criterion that is 0 everywhere) leaves the zeros.
    """
    if how not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {how!r}; allowed: {', '.join(NORMALISATIONS)}")
    out = torch.zeros_like(values, dtype=torch.float64)
    if how == "group-mean":
        if segments is None:
            raise ValueError("normalise(how='group-mean') needs the groups' segments")
        for start, size in segments:
            out[start:start + size] = normalise(values[start:start + size], live[start:start + size], "mean")
        return out
    v = values[live].double()
    if v.numel() == 0:
        return out
    scale = {"l2": lambda: v.norm(), "mean": lambda: v.mean(), "max": lambda: v.abs().max()}[how]()
    scale = float(scale)
    out[live] = v / scale if scale > 0 and math.isfinite(scale) else v * 0.0
    return out


def mix(normalised: dict[str, torch.Tensor], alpha: dict[str, float]) -> torch.Tensor:
    """Paper eq. 1: ``S = sum_k alpha_k * s_k`` over the criteria with a positive weight."""
    active = [k for k, a in alpha.items() if a > 0]
    if not active:
        raise ValueError("LTAP: every criterion weight is 0")
    total = None
    for k in active:
        term = alpha[k] * normalised[k]
        total = term if total is None else total + term
    return total
