"""The deployable model: ``model/weights.safetensors`` + ``model/arch.json``, loadable without training code.

``arch.json`` holds the registry name and options (``build_model(**arch["model"])``; for DO's sub-model
ensemble, the member's and the aggregation settings, see :func:`build_architecture`), the preprocessing
(mean/std in [0, 1], input shape), the class names and the per-layer channel counts. Layers whose saved weights
are smaller than the registry's dense shapes (a physically compressed model) are rebuilt at the saved shapes
before the weights load, so no pickled module is ever needed.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .engine.checkpoint import atomic_write_bytes, atomic_write_json
from .errors import TailwiseError
from .models import NormedLinear, build_model

ARCH_FORMAT = 1


def layer_channels(model: nn.Module) -> dict[str, list[int]]:
    """``{layer: [in_channels, out_channels]}`` for every conv and linear layer."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = [m.in_channels, m.out_channels]
        elif isinstance(m, (nn.Linear, NormedLinear)):
            out[name] = [m.in_features, m.out_features]
    return out


def save_model(model: nn.Module, directory: str | Path, preprocess: dict, classes: list[str], extra: dict | None = None) -> None:
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(directory / "weights.safetensors", lambda fh: fh.write(save(state)))
    atomic_write_json(directory / "arch.json", {"format": ARCH_FORMAT, "model": model.arch, "preprocess": preprocess,
                                                "classes": classes, "channels": layer_channels(model), **(extra or {})})


def _resize_to(model: nn.Module, state: dict) -> None:
    """Replace conv / BN / linear layers whose saved tensors have other shapes by layers of the saved shapes."""
    for name, module in list(model.named_modules()):
        weight = state.get(f"{name}.weight" if name else "weight")
        if weight is None or not hasattr(module, "weight") or module.weight is None or module.weight.shape == weight.shape:
            continue
        if isinstance(module, nn.Conv2d):
            new = nn.Conv2d(weight.shape[1] * module.groups, weight.shape[0], module.kernel_size, module.stride,
                            module.padding, module.dilation, module.groups, module.bias is not None)
        elif isinstance(module, nn.BatchNorm2d):
            new = nn.BatchNorm2d(weight.shape[0], module.eps, module.momentum, module.affine, module.track_running_stats)
        elif isinstance(module, nn.Linear):
            new = nn.Linear(weight.shape[1], weight.shape[0], module.bias is not None)
        elif isinstance(module, NormedLinear):
            new = NormedLinear(weight.shape[0], weight.shape[1])
        else:
            raise TailwiseError(f"cannot rebuild layer {name} ({type(module).__name__}) at saved shape {tuple(weight.shape)}")
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], new)


def build_architecture(arch: dict) -> nn.Module:
    """The dense module ``arch`` (an ``arch.json`` "model" entry) describes: a registry network, or a
    :class:`~tailwise.models.ensemble.SubModelEnsemble` of them (DO's sub-models)."""
    if "ensemble" in arch:
        from .models.ensemble import SubModelEnsemble

        spec = dict(arch["ensemble"])
        members = [build_model(**arch["member"]) for _ in range(spec.pop("members"))]
        return SubModelEnsemble(members, **spec)
    return build_model(**arch)


def dense_reference(arch: dict) -> nn.Module:
    """The network a deployed model's cost is compared with: the architecture itself, or one ensemble member."""
    return build_model(**arch["member"]) if "ensemble" in arch else build_model(**arch)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load the deployable model of a run directory (or of its ``model/`` folder), in eval mode.

    The returned module carries ``.arch``, ``.preprocess`` (mean, std, input shape) and ``.classes``.
    """
    from safetensors.torch import load_file

    path = Path(path)
    directory = path / "model" if (path / "model" / "arch.json").is_file() else path
    if not (directory / "arch.json").is_file():
        raise TailwiseError(f"{path} has no model/arch.json: not a finished tailwise run or model folder")
    arch = json.loads((directory / "arch.json").read_text())
    state = load_file(str(directory / "weights.safetensors"))
    model = build_architecture(arch["model"])
    _resize_to(model, state)
    model.load_state_dict(state)
    model.preprocess, model.classes = arch["preprocess"], arch["classes"]
    return model.to(device).eval()
