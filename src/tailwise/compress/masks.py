"""Keep-masks over structured channel groups, enforced on weights, gradients and optimizer state.

A pruned channel of a group is zero in every member tensor (producer conv filters and biases, BN gamma/beta,
consumer input slices). ``enforce_weights`` and ``enforce_grads`` multiply every affected tensor by its mask in
one ``torch._foreach_mul_`` call (no Python loop over parameters in the hot path); ``enforce_optimizer`` does the
same for SGD momentum buffers, so weight decay and momentum cannot move a pruned entry
(``../shared/reference/method-pitfalls.md``).

Progressive zeroing (HESSO-style): a channel scheduled over ``T`` steps is multiplied after step ``t`` (0-based)
by ``(T - t - 1) / (T - t)``; the factors telescope, so after ``T`` steps the weight is ``w * prod = 0`` exactly,
and the channel then joins the hard mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .groups import ChannelGroup


def mask_grads(params, masks) -> None:
    """Multiply the gradient of each of ``params`` by its mask, in one ``torch._foreach_mul_`` call; parameters
    without a gradient are skipped."""
    pairs = [(p.grad, m) for p, m in zip(params, masks) if p.grad is not None]
    if pairs:
        torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])


def mask_optimizer_state(optimizer: torch.optim.Optimizer, params, masks) -> None:
    """Multiply every per-parameter state tensor of ``optimizer`` shaped like its parameter (momentum, ...) by the
    parameter's mask, in one ``torch._foreach_mul_`` call; other state (step counts, ...) is left alone."""
    states, state_masks = [], []
    for p, m in zip(params, masks):
        for value in optimizer.state.get(p, {}).values():
            if torch.is_tensor(value) and value.shape == p.shape:
                states.append(value)
                state_masks.append(m)
    if states:
        with torch.no_grad():
            torch._foreach_mul_(states, state_masks)


@dataclass
class _Decay:
    group: int
    channels: torch.Tensor
    steps: int
    done: int = 0


class ChannelMasks:
    def __init__(self, model: nn.Module, groups: list[ChannelGroup]):
        self.groups = groups
        self.keep = [torch.ones(g.size, dtype=torch.bool) for g in groups]
        self.decays: list[_Decay] = []
        self._model = model
        self._pairs: tuple[list, list] | None = None

    # ------------------------------------------------------------------------------------------- queries
    def live(self, group: int) -> torch.Tensor:
        """Channels of ``group`` neither pruned nor being decayed."""
        alive = self.keep[group].clone()
        for d in self.decays:
            if d.group == group:
                alive[d.channels] = False
        return alive

    def num_live(self) -> int:
        return sum(int(self.live(i).sum()) for i in range(len(self.groups)))

    def num_channels(self) -> int:
        return sum(g.size for g in self.groups)

    def layer_live(self) -> dict[str, list[int | None]]:
        """``{layer: [live input channels or None, live output channels or None]}`` for every layer a group
        touches (``None``: that side is not governed by a group)."""
        out: dict[str, list[int | None]] = {}
        for g, alive in zip(self.groups, (self.live(i) for i in range(len(self.groups)))):
            n = int(alive.sum())
            for name in g.producers + g.norms:
                out.setdefault(name, [None, None])[1] = n
            for name in g.consumers:
                out.setdefault(name, [None, None])[0] = n
        return out

    # --------------------------------------------------------------------------------------------- changes
    def prune(self, selection: dict[int, torch.Tensor], steps: int = 1) -> None:
        """Remove channels ``selection[group]``: at once (``steps <= 1``) or decayed over ``steps`` steps."""
        for gi, channels in selection.items():
            channels = torch.as_tensor(channels, dtype=torch.long).unique()
            if len(channels) == 0:
                continue
            alive = self.live(gi)
            if not alive[channels].all():
                raise ValueError(f"group {self.groups[gi].name}: some selected channels are already pruned")
            if int(alive.sum()) - len(channels) < 1:
                raise ValueError(f"group {self.groups[gi].name}: pruning {len(channels)} channels would leave none")
            if steps <= 1:
                self.keep[gi][channels] = False
            else:
                self.decays.append(_Decay(gi, channels, int(steps)))
        self._pairs = None
        self.enforce_weights()

    def finish_decays(self) -> None:
        """End every decay in progress at once: its channels join the hard mask and are zeroed."""
        for d in self.decays:
            self.keep[d.group][d.channels] = False
        self.decays = []
        self._pairs = None
        self.enforce_weights()

    def step_decay(self) -> None:
        """Apply one progressive-zeroing step (call after each optimizer step)."""
        if not self.decays:
            return
        tensors, factors = [], []
        for d in self.decays:
            factor = (d.steps - d.done - 1) / (d.steps - d.done)
            for tensor, mask in self._slice_masks(d.group, d.channels, factor):
                tensors.append(tensor)
                factors.append(mask)
            d.done += 1
        with torch.no_grad():
            torch._foreach_mul_(tensors, factors)
        finished = [d for d in self.decays if d.done >= d.steps]
        for d in finished:
            self.keep[d.group][d.channels] = False
        if finished:
            self.decays = [d for d in self.decays if d.done < d.steps]
            self._pairs = None

    # -------------------------------------------------------------------------------------------- enforce
    def _tensor(self, module_name: str, tensor_name: str) -> torch.Tensor:
        return getattr(self._model.get_submodule(module_name), tensor_name)

    def _slice_masks(self, group: int, channels: torch.Tensor, value: float):
        """(tensor, mask) pairs that multiply ``channels`` of ``group`` by ``value`` and leave the rest."""
        for s in self.groups[group].slices:
            tensor = self._tensor(s.module_name, s.tensor_name)
            shape = [1] * tensor.dim()
            shape[s.dim] = tensor.shape[s.dim]
            mask = torch.ones(shape[s.dim], dtype=tensor.dtype, device=tensor.device)
            mask[s.index[channels].to(tensor.device)] = value
            yield tensor, mask.view(shape)

    def _tensor_masks(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One combined 0/1 mask per tensor that has pruned entries (cached until the masks change)."""
        if self._pairs is None:
            combined: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            for gi, keep in enumerate(self.keep):
                dead = (~keep).nonzero().flatten()
                if len(dead) == 0:
                    continue
                for tensor, mask in self._slice_masks(gi, dead, 0.0):
                    if id(tensor) in combined:
                        t, m = combined[id(tensor)]
                        combined[id(tensor)] = (t, m * mask)
                    else:
                        combined[id(tensor)] = (tensor, mask)
            self._pairs = ([t for t, _ in combined.values()], [m for _, m in combined.values()])
        return self._pairs

    def enforce_weights(self) -> None:
        tensors, masks = self._tensor_masks()
        if tensors:
            with torch.no_grad():
                torch._foreach_mul_(tensors, masks)

    def enforce_grads(self) -> None:
        mask_grads(*self._tensor_masks())

    def enforce_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the pruned entries of every per-parameter state tensor of the same shape (momentum, ...)."""
        mask_optimizer_state(optimizer, *self._tensor_masks())

    # ----------------------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        return {"groups": [g.name for g in self.groups], "keep": [k.clone() for k in self.keep],
                "decays": [[d.group, d.channels.clone(), d.steps, d.done] for d in self.decays]}

    def load_state_dict(self, state: dict) -> None:
        if state["groups"] != [g.name for g in self.groups]:
            raise ValueError("checkpoint masks were saved for different channel groups")
        # masks live on the CPU (they index the CPU ``Slice.index`` maps), whatever ``map_location`` loaded them to
        self.keep = [k.detach().to("cpu", torch.bool, copy=True) for k in state["keep"]]
        self.decays = [_Decay(int(g), c.detach().to("cpu", torch.long, copy=True), int(s), int(d))
                       for g, c, s, d in state["decays"]]
        self._pairs = None
