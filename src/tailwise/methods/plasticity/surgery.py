"""One growth event's in-place surgery on one channel group: channels ``slots`` become copies of ``sources``.

Every tensor of the group is edited in place (the optimizer keeps its parameter objects), and every optimizer
state tensor shaped like an edited parameter (SGD's momentum buffer) gets the matching edit:

- **Incoming weights** (the producers' output rows): the copy gets its source's rows, plus, with
  ``weight_noise`` σ_w > 0, ``N(0, (σ_w · rms(W_src))²)`` per entry (rms over the source's row), drawn for the
  copy alone.
- **BatchNorm**: the copy's running statistics are its source's (its pre-BN input is the source's, exactly
  without weight noise). Its γ and β (``copy_bn``):

  - ``layer`` (default): drawn afresh, independently of the source, ``γ ~ N(mean γ, std γ²)`` and
    ``β ~ N(mean β, std β²)`` with the mean and (population) std over the layer's surviving channels before the
    event (the std at least ``bn_noise``, so that a layer whose channels still share one γ, as at
    initialisation, gives distinct copies): the paper's "randomized BatchNorm parameters … to ensure gradient
    diversity", with the spread the layer's own channels have (measured on CIFAR-10-LT: a copy perturbed by
    σ = 0.05 stays a twin of its source 50 epochs on; the dense layers' β spread is 0.18);
  - ``perturb``: the source's plus ``N(0, bn_noise²)`` (the landed behaviour; ``bn_noise: 0`` gives an exact
    copy).
- **Outgoing weights** (every consumer's input slice): the source's slice is split 50/50 between source and
  copy, which preserves the function while the copy computes what its source does; then, with
  ``weight_scaling``, the consumer's whole group slice is multiplied by (measured before the surgery)::

      s = sqrt( sum_{c in group} ||W[:, c]||^2  /  sum_{c in group, c not removed} ||W[:, c]||^2 )

  which keeps the Frobenius norm of the consumer's effective (pairs merged) weights — the paper's weight
  scaling "to avoid abrupt shifts in parameter distributions"; ``s = 1`` exactly when the removed channels had
  zero outgoing weights.
- **Momentum**: the copy's buffers are zero (incoming rows, BN entries, outgoing slice): it starts from rest
  instead of moving in its source's direction. The source's buffers are kept (``source_momentum: keep``,
  default) or halved (``halve``). Kept: the source's weights are what they were and its buffer still describes
  its recent gradients; after the split its incoming and BN gradients halve (they flow through half the outgoing
  weight) while its outgoing gradient (activation × downstream error) does not, so halving would match only the
  first, and would slow a channel chosen for being important. The weight-scaling factor ``s`` multiplies the
  consumer's momentum slice like its weights (the effective step stays proportional to the weights).

With ``copy_bn: perturb``, ``bn_noise: 0`` and ``weight_noise: 0`` an event in which the removed channels had no
outgoing weights leaves the network's function (eval mode) exactly unchanged; otherwise it changes only through
the copies' own γ, β and incoming weights (tests/test_plasticity.py checks both).
"""
from __future__ import annotations

import torch
from torch import nn

from ...compress.groups import ChannelGroup


def is_incoming(group: ChannelGroup, s) -> bool:
    """A slice that describes the channel itself (producer output rows, BN entries), not a consumer's input."""
    return (s.module_name in group.producers and s.dim == 0) or s.module_name in group.norms


def _draw(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(n, generator=generator, dtype=torch.float64)


@torch.no_grad()
def duplicate(model: nn.Module, group: ChannelGroup, slots: torch.Tensor, sources: torch.Tensor, state: dict,
              options, generator: torch.Generator) -> dict:
    """Overwrite channels ``slots`` of ``group`` with copies of ``sources`` (see the module docstring);
    ``state`` is the optimizer's per-parameter state (``optimizer.state``, or ``{}``). Returns the
    weight-scaling factor ``s`` of each consumer tensor."""
    removed = torch.zeros(group.size, dtype=torch.bool)
    removed[slots] = True
    halve = options.source_momentum == "halve"
    scales = {}
    for s in group.slices:
        module = model.get_submodule(s.module_name)
        tensor = getattr(module, s.tensor_name)
        index = s.index.to(tensor.device)
        d = s.dim
        dst, src = index[slots.to(tensor.device)], index[sources.to(tensor.device)]
        buffers = [v for v in state.get(tensor, {}).values() if torch.is_tensor(v) and v.shape == tensor.shape]
        if is_incoming(group, s):
            value = tensor.data.index_select(0, src)
            if s.module_name in group.norms:
                value = _bn_affine(tensor.data, index, removed, value, options, generator)
                if s.tensor_name == "weight":
                    for name in ("running_mean", "running_var"):
                        b = getattr(module, name, None)
                        if b is not None:
                            b.index_copy_(0, dst, b.index_select(0, src))
            elif s.tensor_name == "weight" and options.weight_noise > 0:
                rms = value.double().flatten(1).pow(2).mean(1).sqrt()
                noise = _draw(value.numel(), generator).to(value.device).view(value.shape) * options.weight_noise
                value = value + (noise * rms.view(-1, *[1] * (value.dim() - 1))).to(value.dtype)
            tensor.data.index_copy_(0, dst, value)
            for b in buffers:
                if halve:
                    b.index_copy_(0, src, b.index_select(0, src) * 0.5)
                b.index_fill_(0, dst, 0.0)
            continue
        # a consumer: split the sources' outgoing weights between source and copy, then scale
        factor = _scaling(tensor.data, d, index, removed) if options.weight_scaling else 1.0
        half = tensor.data.index_select(d, src) * 0.5
        tensor.data.index_copy_(d, src, half)
        tensor.data.index_copy_(d, dst, half)
        for b in buffers:
            if halve:
                b.index_copy_(d, src, b.index_select(d, src) * 0.5)
            b.index_fill_(d, dst, 0.0)
        if factor != 1.0:
            for t in (tensor.data, *buffers):
                t.index_copy_(d, index, t.index_select(d, index) * factor)
        scales[f"{s.module_name}.{s.tensor_name}"] = factor
    return scales


def _bn_affine(values: torch.Tensor, index: torch.Tensor, removed: torch.Tensor, source: torch.Tensor, options,
               generator: torch.Generator) -> torch.Tensor:
    """The copies' BN γ (or β): drawn from the layer's distribution (``layer``) or the source's + noise."""
    n = len(source)
    if options.copy_bn == "layer":
        kept = values.index_select(0, index[~removed.to(index.device)]).double()
        mean, std = kept.mean(), kept.std(unbiased=False).clamp_min(options.bn_noise)
        return (mean.cpu() + std.cpu() * _draw(n, generator)).to(values.device, values.dtype)
    if options.bn_noise > 0:
        return source + (_draw(n, generator) * options.bn_noise).to(values.device, values.dtype)
    return source


def column_energy(weight: torch.Tensor, d: int, index: torch.Tensor) -> torch.Tensor:
    """Per channel ``index`` of ``weight``'s dimension ``d``: the sum of its squared entries (float64)."""
    energy = weight.index_select(d, index.to(weight.device)).double().pow(2).movedim(d, 0)
    return energy.flatten(1).sum(1) if energy.dim() > 1 else energy


def _scaling(weight: torch.Tensor, d: int, index: torch.Tensor, removed: torch.Tensor) -> float:
    """``s`` of the module docstring for one consumer tensor (its input dimension ``d``)."""
    per_channel = column_energy(weight, d, index)
    kept = per_channel[~removed.to(per_channel.device)].sum()
    return float((per_channel.sum() / kept).sqrt()) if kept > 0 else 1.0
