"""Parameter and MAC counts, measured by running the model once on an example input.

MACs count multiply-accumulates of convolutions (``k_h * k_w * C_in/groups * C_out * H_out * W_out``) and
linear layers (``in * out``) — the convention of pruning papers ("FLOPs" of ResNet-50 ≈ 4.1 G are MACs).
BatchNorm, ReLU, pooling and additions are not counted. Parameters count every parameter tensor element.
"""
from __future__ import annotations

import time

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs of one forward pass of a single image (``example`` has batch size 1)."""
    total = 0

    def conv_hook(module: nn.Conv2d, inputs, output):
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        total += k * output.numel() // output.shape[0]

    def linear_hook(module, inputs, output):
        nonlocal total
        total += inputs[0].shape[-1] * output.shape[-1]

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear) or type(module).__name__ == "NormedLinear":
            handles.append(module.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        model(example[:1])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return int(total)


@torch.no_grad()
def measure_latency(model: nn.Module, example: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall-clock milliseconds of one forward pass of ``example`` (eval mode)."""
    was_training = model.training
    model.eval()
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        model(example)
        if example.is_cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    model.train(was_training)
    return sorted(times)[len(times) // 2]
