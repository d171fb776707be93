"""The twin diagnostic: which channels of a layer duplicate another, and how many distinct channels remain.

Channel ``c`` of a group has a twin when the cosine between its incoming-weight vector (its rows of every
producer of the group, concatenated) and another channel's exceeds ``threshold`` (default 0.99). Twins form
clusters (connected components of the "cosine > threshold" graph); the **effective width** is the number of
clusters, counting a channel without a twin as its own cluster. A dense network has no twins and an effective
width equal to its width; a copy that never diverged from its source leaves both members as twins and one
channel of width lost.
"""
from __future__ import annotations

import torch
from torch import nn

from ...compress.groups import ChannelGroup


def incoming_vectors(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """``(size, d)`` float64: each channel's incoming weights (producer output rows, biases included)."""
    parts = []
    for s in group.slices:
        if s.module_name in group.producers and s.dim == 0:
            t = getattr(model.get_submodule(s.module_name), s.tensor_name).detach()
            parts.append(t.index_select(0, s.index.to(t.device)).double().flatten(1).cpu())
    return torch.cat(parts, dim=1)


def channel_cosines(vectors: torch.Tensor) -> torch.Tensor:
    """``(n, n)``: the cosine between every two rows of ``vectors`` (a zero row has cosine 0 with every row)."""
    unit = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return unit @ unit.T


def twin_layer(vectors: torch.Tensor, threshold: float) -> dict:
    """``{"width", "twins", "effective"}`` of one layer's channel vectors (rows)."""
    n = vectors.shape[0]
    linked = channel_cosines(vectors) > threshold
    linked.fill_diagonal_(False)
    twins = int(linked.any(1).sum())
    labels = torch.arange(n)
    reach = linked | torch.eye(n, dtype=torch.bool)
    while True:  # connected components: every channel takes the smallest label among its neighbours
        new = torch.where(reach, labels.unsqueeze(0), n).min(1).values
        if torch.equal(new, labels):
            break
        labels = new
    return {"width": n, "twins": twins, "effective": int(labels.unique().numel())}


def twin_report(model: nn.Module, groups: list[ChannelGroup], threshold: float = 0.99) -> dict:
    """Per layer (group name) :func:`twin_layer`, and the totals over the layers."""
    layers = {g.name: twin_layer(incoming_vectors(model, g), threshold) for g in groups}
    totals = {k: sum(v[k] for v in layers.values()) for k in ("width", "twins", "effective")}
    return {**totals, "layers": layers}
