"""Parameter and MAC counts, measured by running the model once on an example input.

MACs count multiply-accumulates of convolutions (``k_h * k_w * C_in/groups * C_out * H_out * W_out``) and
linear layers (``in * out``) — the convention of pruning papers ("FLOPs" of ResNet-50 ≈ 4.1 G are MACs).
BatchNorm, ReLU, pooling and additions are not counted. Parameters count every parameter tensor element.
"""
from __future__ import annotations

import time

import torch
from torch import nn


def _is_head(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "NormedLinear"


def _live(layer_live: dict, name: str, module: nn.Module) -> tuple[int, int]:
    """(input channels, output channels) of ``module``, reduced to the live ones when masks govern them."""
    if isinstance(module, nn.Conv2d):
        full = (module.in_channels, module.out_channels)
    elif isinstance(module, nn.BatchNorm2d):
        full = (module.num_features, module.num_features)
    else:
        full = (module.in_features, module.out_features)
    live_in, live_out = layer_live.get(name, (None, None))
    return (full[0] if live_in is None else live_in), (full[1] if live_out is None else live_out)


def count_params(model: nn.Module, masks=None) -> int:
    """Parameter count; with ``masks``, the count of the compressed model the masks describe."""
    layer_live = masks.layer_live() if masks is not None else {}
    total = 0
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        if isinstance(module, nn.Conv2d):
            cin, cout = _live(layer_live, name, module)
            k = module.kernel_size[0] * module.kernel_size[1]
            total += cout * (cin // module.groups) * k + (cout if module.bias is not None else 0)
        elif isinstance(module, nn.BatchNorm2d) and module.affine:
            total += 2 * _live(layer_live, name, module)[1]
        elif _is_head(module):
            cin, cout = _live(layer_live, name, module)
            total += cin * cout + (cout if getattr(module, "bias", None) is not None else 0)
        else:
            total += sum(p.numel() for p in own)
    return total


@torch.no_grad()
def count_macs(model: nn.Module, example: torch.Tensor, masks=None) -> int:
    """MACs of one forward pass of a single image; with ``masks``, of the compressed model they describe."""
    layer_live = masks.layer_live() if masks is not None else {}
    total = 0

    def hook(name):
        def count(module, inputs, output):
            nonlocal total
            cin, cout = _live(layer_live, name, module)
            if isinstance(module, nn.Conv2d):
                spatial = output.shape[2] * output.shape[3]
                total += module.kernel_size[0] * module.kernel_size[1] * (cin // module.groups) * cout * spatial
            else:
                total += cin * cout
        return count

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, nn.Conv2d) or _is_head(m)]
    was_training = model.training
    model.eval()
    try:
        model(example[:1])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return int(total)


def cost(model: nn.Module, example, masks=None) -> dict:
    """``{"params", "macs", "flops"}`` (FLOPs = 2 x MACs) of ``model``, or of its compressed form under ``masks``.

    ``example`` is an input tensor or an input size ``(C, H, W)``.
    """
    if isinstance(example, (tuple, list, torch.Size)):
        device = next(model.parameters()).device
        example = torch.zeros(1, *example, device=device)
    macs = count_macs(model, example, masks)
    return {"params": count_params(model, masks), "macs": macs, "flops": 2 * macs}


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


def latency_report(run_dir, batches=(1, 128), repeats: int = 20, channels_last: bool = False) -> dict:
    """Median latency of the dense architecture (freshly built) vs the run's deployed model in one process;
    the two are timed alternately, one forward pass each, ``repeats`` times per batch size."""
    import platform
    import statistics

    from ..deploy import dense_reference, load_model

    deployed = load_model(run_dir)
    dense = dense_reference(deployed.arch).eval()
    shape = deployed.preprocess["input_shape"]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dense, deployed = dense.to(memory_format=fmt), deployed.to(memory_format=fmt)
    rows = []
    for b in batches:
        x = torch.randn(b, *shape).contiguous(memory_format=fmt)
        measure_latency(dense, x, 1), measure_latency(deployed, x, 1)  # warm-up of both
        pairs = [(measure_latency(dense, x, 1, warmup=0), measure_latency(deployed, x, 1, warmup=0))
                 for _ in range(repeats)]  # interleaved, so load changes hit both alike
        dense_ms = statistics.median(p[0] for p in pairs)
        deployed_ms = statistics.median(p[1] for p in pairs)
        rows.append({"batch": b, "dense_ms": round(dense_ms, 3), "deployed_ms": round(deployed_ms, 3),
                     "speedup": round(dense_ms / deployed_ms, 3),
                     "speedup_median_of_pairs": round(statistics.median(d / c for d, c in pairs), 3)})
    return {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "threads": torch.get_num_threads(),
            "memory_format": "channels_last" if channels_last else "contiguous",
            "params": count_params(deployed), "params_dense": count_params(dense),
            "macs": count_macs(deployed, torch.zeros(1, *shape)), "macs_dense": count_macs(dense, torch.zeros(1, *shape)),
            "rows": rows}
