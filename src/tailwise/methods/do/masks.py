"""DO's freeze masks: which entries of the decoupled tensors are free, frozen (and since which stage), or being
pruned; and the enforcement that keeps frozen entries bit-identical and pruned ones at zero under SGD.

Decoupled are the parameters of every non-normalisation layer (conv / linear weights and biases); BatchNorm is
kept per sub-model. ``exempt`` leaves the classifier (:func:`classifier_name`) out: ``classifier`` its
weight and bias, ``classifier_bias`` its bias only (the paper is silent; see :class:`~.adapter.DOOptions`).

Example::

    masks = FreezeMasks(decoupled_parameters(model))
    loss.backward(); masks.mask_gradients(); optimizer.step(); masks.enforce(optimizer)
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ...compress.masks import mask_grads, mask_optimizer_state

EXEMPT = ("classifier", "classifier_bias", "none")
_NORM = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def classifier_name(model: nn.Module) -> str | None:
    """Name of the model's classifier: the last module, in registration order, that is not a normalisation layer
    and has parameters of its own (``fc`` of the CIFAR ResNets, a cosine head included); None without one."""
    names = [name for name, m in model.named_modules()
             if not isinstance(m, _NORM) and any(True for _ in m.parameters(recurse=False))]
    return names[-1] if names else None


def decoupled_parameters(model: nn.Module, exempt: str = "none") -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every non-normalisation module, less the ``exempt`` part of the classifier."""
    head = classifier_name(model)
    out = []
    for mname, module in model.named_modules():
        if isinstance(module, _NORM):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if mname == head and (exempt == "classifier" or (exempt == "classifier_bias" and pname == "bias")):
                continue
            out.append((f"{mname}.{pname}" if mname else pname, p))
    return out


def select_pruned(scores: list[torch.Tensor], free: list[torch.Tensor], ratio: float, scope: str) -> list[torch.Tensor]:
    """Boolean masks of the ``ratio`` fraction of ``free`` entries with the lowest score (per tensor, ``layer``, or
    over all, ``global``). Ties broken by position (stable), so the masks are nested in ``ratio``."""
    out = []
    if scope == "global":
        flat = torch.cat([s.flatten()[f.flatten()] for s, f in zip(scores, free)])
        k = int(math.floor(ratio * len(flat) + 0.5))  # half up
        chosen = torch.zeros(len(flat), dtype=torch.bool)
        chosen[torch.argsort(flat, stable=True)[:k]] = True
        offset = 0
        for f in free:
            m = torch.zeros(f.numel(), dtype=torch.bool)
            idx = f.flatten().nonzero().flatten()
            m[idx] = chosen[offset:offset + len(idx)]
            offset += len(idx)
            out.append(m.view_as(f))
        return out
    for s, f in zip(scores, free):
        idx = f.flatten().nonzero().flatten()
        k = int(math.floor(ratio * len(idx) + 0.5))  # half up
        m = torch.zeros(f.numel(), dtype=torch.bool)
        m[idx[torch.argsort(s.flatten()[idx], stable=True)[:k]]] = True
        out.append(m.view_as(f))
    return out


class FreezeMasks:
    """Per decoupled tensor: ``owner`` (int8; 0 free, ``t`` frozen at the end of stage ``t``), the frozen values,
    and ``pruning`` (the entries being pruned during a decoupling, held at zero; None otherwise)."""

    def __init__(self, params: list[tuple[str, nn.Parameter]]):
        self.params = params
        self.owner = [torch.zeros(p.shape, dtype=torch.int8, device=p.device) for _, p in params]
        self.frozen_values = [torch.zeros_like(p.detach()) for _, p in params]
        self.pruning: list[torch.Tensor] | None = None
        self._update()

    def _update(self) -> None:
        """The float 0/1 multipliers: 1 where free and not being pruned."""
        free = [(o == 0) for o in self.owner]
        if self.pruning is not None:
            free = [f & ~p.to(f.device) for f, p in zip(free, self.pruning)]
        self.free_f = [f.to(p.dtype) for f, (_, p) in zip(free, self.params)]
        self.active = any(bool((o != 0).any()) for o in self.owner) or self.pruning is not None

    def free(self) -> list[torch.Tensor]:
        """Boolean masks of the free entries (on the CPU)."""
        return [(o == 0).cpu() for o in self.owner]

    def set_pruning(self, pruning: list[torch.Tensor] | None) -> None:
        self.pruning = pruning
        self._update()

    def mask_gradients(self) -> None:
        """After backward: zero the gradients of frozen and pruned entries."""
        if not self.active:
            return
        mask_grads((p for _, p in self.params), self.free_f)

    @torch.no_grad()
    def enforce(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """After a step: frozen entries back to their values, pruned ones to zero, and their momentum (any
        optimizer state shaped like the parameter) zeroed, so weight decay and momentum cannot move them."""
        if not self.active:
            return
        tensors = [p.data for _, p in self.params]
        torch._foreach_mul_(tensors, self.free_f)
        torch._foreach_add_(tensors, self.frozen_values)
        if optimizer is not None:
            mask_optimizer_state(optimizer, (p for _, p in self.params), self.free_f)

    @torch.no_grad()
    def freeze(self, kept: list[torch.Tensor], stage: int) -> None:
        """Freeze the ``kept`` entries (boolean, among the free ones) as stage ``stage``'s, at their values."""
        for i, ((_, p), keep) in enumerate(zip(self.params, kept)):
            self.owner[i][keep.to(p.device) & (self.owner[i] == 0)] = stage
            self.frozen_values[i] = p.detach() * (self.owner[i] != 0).to(p.dtype)
        self.set_pruning(None)

    def state_dict(self) -> dict:
        return {"owner": [o.cpu().clone() for o in self.owner],
                "frozen_values": [v.cpu().clone() for v in self.frozen_values]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["owner"]) != len(self.params):
            raise ValueError(f"{len(state['owner'])} decoupled tensors in the state, {len(self.params)} in the model "
                             "(a run made with another method.exempt?)")
        self.owner = [o.to(p.device, torch.int8) for o, (_, p) in zip(state["owner"], self.params)]
        self.frozen_values = [v.to(p.device, p.dtype) for v, (_, p) in zip(state["frozen_values"], self.params)]
        self.set_pruning(None)
