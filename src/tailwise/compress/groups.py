"""Structured channel groups of a model, found with Torch-Pruning's dependency graph.

A :class:`ChannelGroup` is one dependency group: the output channels of one or more convolutions that must be
removed together (a block-internal conv, or every conv writing into a residual stream), their BatchNorm entries,
and the matching input slices of every consumer (the next conv, the projection shortcut, the classifier).
Channel ``c`` of the group is the unit of structured pruning: removing it removes the slice ``c`` (mapped through
each member's index map) of every member tensor.

The classifier's outputs and the stem's inputs are never prunable. LDAM's ``NormedLinear`` head (weight stored
``(in, out)``) is handled as a consumer whose input dimension is 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Slice:
    """``tensor[..., index[c], ...]`` along ``dim`` of parameter/buffer ``tensor_name`` of ``module_name``."""

    module_name: str
    tensor_name: str
    dim: int
    index: torch.Tensor  # LongTensor: group channel c -> tensor index


@dataclass
class ChannelGroup:
    name: str  # the root conv's name
    kind: str  # "internal" (one producer conv) or "residual" (channels tied by residual additions)
    size: int
    producers: list[str]  # convs whose output channels form the group
    consumers: list[str]  # convs / linears whose input channels read the group
    norms: list[str]  # BatchNorms on the group's channels
    slices: list[Slice] = field(default_factory=list)


def _is_head(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "NormedLinear"


def _plain(idxs) -> torch.Tensor:
    return torch.tensor([int(getattr(i, "idx", i)) for i in idxs], dtype=torch.long)


def _normed_linear_pruner():
    """Torch-Pruning handler for ``NormedLinear`` (weight stored ``(in, out)``, no bias)."""
    import torch_pruning as tp

    class NormedLinearPruner(tp.pruner.function.BasePruningFunc):
        def prune_out_channels(self, layer, idxs):
            keep = sorted(set(range(layer.out_features)) - set(idxs))
            layer.out_features = len(keep)
            layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 1)
            return layer

        def prune_in_channels(self, layer, idxs):
            keep = sorted(set(range(layer.in_features)) - set(idxs))
            layer.in_features = len(keep)
            layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
            return layer

        def get_out_channels(self, layer):
            return layer.out_features

        def get_in_channels(self, layer):
            return layer.in_features

    return NormedLinearPruner()


def dependency_graph(model: nn.Module, example: torch.Tensor):
    """Torch-Pruning's dependency graph of ``model`` (eval mode, autograd on, one example image)."""
    import torch_pruning as tp

    from ..models import NormedLinear

    was_training = model.training
    model.eval()
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example[:1],
                                                      customized_pruners={NormedLinear: _normed_linear_pruner()})
    model.train(was_training)
    return graph


def channel_groups(model: nn.Module, example: torch.Tensor, scope: str = "all") -> list[ChannelGroup]:
    """The prunable channel groups of ``model`` (traced once on ``example``).

    ``scope``: ``all`` (block-internal and residual-stream groups), ``internal`` (only groups produced by a
    single conv whose channels feed no residual addition), or ``residual``.
    """
    if scope not in ("all", "internal", "residual"):
        raise ValueError(f"unknown group scope {scope!r}; allowed: all, internal, residual")
    graph = dependency_graph(model, example)
    heads = [m for m in model.modules() if _is_head(m)]
    names = {m: n for n, m in model.named_modules()}
    groups = []
    for group in graph.get_all_groups(ignored_layers=heads, root_module_types=[nn.Conv2d]):
        producers, consumers, norms, slices = [], [], [], []
        size = None
        for item in group.items:
            module, handler = item.dep.target.module, item.dep.handler
            name = names.get(module)
            if name is None:  # functional ops (ReLU, add) carry no parameters
                continue
            idx = _plain(item.idxs)
            size = len(idx) if size is None else size
            pruning_out = "out" in getattr(handler, "__name__", "")
            if isinstance(module, nn.Conv2d):
                (producers if pruning_out else consumers).append(name)
                slices.append(Slice(name, "weight", 0 if pruning_out else 1, idx))
                if pruning_out and module.bias is not None:
                    slices.append(Slice(name, "bias", 0, idx))
            elif isinstance(module, nn.BatchNorm2d):
                norms.append(name)
                if module.affine:  # running statistics need no mask: a zero gamma and beta give a zero output
                    slices += [Slice(name, "weight", 0, idx), Slice(name, "bias", 0, idx)]
            elif _is_head(module):
                consumers.append(name)
                slices.append(Slice(name, "weight", 0 if type(module).__name__ == "NormedLinear" else 1, idx))
            else:
                raise NotImplementedError(f"channel groups: unsupported layer {name} ({type(module).__name__})")
        if not producers:
            continue
        kind = "internal" if len(producers) == 1 else "residual"
        if scope != "all" and kind != scope:
            continue
        groups.append(ChannelGroup(producers[0], kind, size, producers, consumers, norms, slices))
    groups.sort(key=lambda g: _module_order(model, g.name))
    return groups


def _module_order(model: nn.Module, name: str) -> int:
    return [n for n, _ in model.named_modules()].index(name)
