"""Physical compression: turn a masked model into a smaller dense one, and prove it computes the same thing.

``compress`` copies the model, removes every pruned channel of every group with Torch-Pruning's dependency
graph (the group's producer filters, BN entries and consumer input slices), then compares the logits of the
masked and the compressed model on random inputs and on any real batch given: the largest absolute difference
must be within ``rtol`` (1e-5) of the largest logit magnitude, or :class:`CompressionError` is raised. The check
runs every time, not only in tests.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import TailwiseError
from .groups import dependency_graph
from .masks import ChannelMasks


class CompressionError(TailwiseError):
    """The compressed model does not compute what the masked model computes."""


@torch.no_grad()
def max_relative_difference(a: nn.Module, b: nn.Module, inputs: list[torch.Tensor]) -> float:
    worst = 0.0
    for x in inputs:
        ya, yb = a(x).double(), b(x).double()
        worst = max(worst, float((ya - yb).abs().max() / ya.abs().max().clamp_min(1e-12)))
    return worst


def compress(model: nn.Module, masks: ChannelMasks, example: torch.Tensor, check_inputs: list[torch.Tensor] = (),
             rtol: float = 1e-5) -> nn.Module:
    """A physically smaller copy of ``model`` without the channels ``masks`` prune (``model`` is unchanged).

    ``example``: one input image batch (shape as used in training) for tracing; ``check_inputs``: extra real
    batches for the equivalence check (random inputs of the example's shape are always used too).
    """
    import torch_pruning as tp

    if masks.decays:
        raise CompressionError("channels are still being decayed; finish progressive zeroing before compressing")
    masks.enforce_weights()
    slim = copy.deepcopy(model)
    device = next(model.parameters()).device
    example = example.to(device)
    graph = dependency_graph(slim, example)
    for group, keep in zip(masks.groups, masks.keep):
        dead = (~keep).nonzero().flatten()
        if len(dead) == 0:
            continue
        root = slim.get_submodule(group.name)
        index = next(s.index for s in group.slices if s.module_name == group.name and s.tensor_name == "weight")
        pruning_group = graph.get_pruning_group(root, tp.prune_conv_out_channels, idxs=index[dead].tolist())
        if not graph.check_pruning_group(pruning_group):
            raise CompressionError(f"Torch-Pruning refused to prune group {group.name} (it would empty a layer)")
        pruning_group.prune()
    if hasattr(model, "arch"):
        slim.arch = dict(model.arch)
    was_training = model.training
    model.eval()
    slim.eval()
    generator = torch.Generator().manual_seed(0)
    shape = (8, *example.shape[1:])
    inputs = [torch.randn(shape, generator=generator).to(device), *[x.to(device) for x in check_inputs]]
    difference = max_relative_difference(model, slim, inputs)
    model.train(was_training)
    if difference > rtol:
        raise CompressionError(f"compressed model differs from the masked model by {difference:.2e} (relative) > {rtol}")
    slim.compression_check = difference
    return slim


def drop_pruned_entries(masks: ChannelMasks, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` maps ``"module.tensor"`` names of the masked model to tensors of those shapes (e.g. SGD
    momentum buffers); returns them without the entries of pruned channels, as ``compress`` removes them from
    the model, so they line up with the compressed model's parameters."""
    dead: dict[str, dict[int, list[torch.Tensor]]] = {}
    for group, keep in zip(masks.groups, masks.keep):
        gone = ~keep
        if gone.any():
            for s in group.slices:
                dead.setdefault(f"{s.module_name}.{s.tensor_name}", {}).setdefault(s.dim, []).append(s.index[gone])
    out = {}
    for name, tensor in tensors.items():
        for dim, parts in dead.get(name, {}).items():
            alive = torch.ones(tensor.shape[dim], dtype=torch.bool)
            alive[torch.cat(parts)] = False
            tensor = tensor.index_select(dim, alive.nonzero().flatten().to(tensor.device))
        out[name] = tensor
    return out
