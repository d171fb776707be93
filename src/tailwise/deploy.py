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

from .atomic import atomic_write_bytes, atomic_write_json
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


def save_model(model: nn.Module, directory: str | Path, preprocess: dict, classes: list[str]) -> None:
    from safetensors.torch import save

    arch = getattr(model, "arch", None)
    if arch is None or ("ensemble" in arch and arch.get("member") is None):
        raise ValueError("save_model: the model (or an ensemble's members) was not built by tailwise, so arch.json "
                         "could not rebuild it; save its state_dict instead")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(directory / "weights.safetensors", lambda fh: fh.write(save(state)))
    atomic_write_json(directory / "arch.json", {"format": ARCH_FORMAT, "model": arch, "preprocess": preprocess,
                                                "classes": classes, "channels": layer_channels(model)})


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


def _read_arch(arch_file: Path) -> dict:
    """``arch.json`` as a dict, checked to be a tailwise model description (model, classes, preprocess)."""
    try:
        arch = json.loads(arch_file.read_text())
    except ValueError as exc:  # not JSON, or not UTF-8
        raise TailwiseError(f"{arch_file} is not valid JSON ({exc}); restore it from the run that wrote it") from None
    pre = arch.get("preprocess") if isinstance(arch, dict) else None
    shape = pre.get("input_shape") if isinstance(pre, dict) else None
    if not (isinstance(arch, dict) and isinstance(arch.get("model"), dict) and isinstance(arch.get("classes"), list)
            and isinstance(shape, list) and len(shape) == 3 and all(type(n) is int and 0 < n <= 4096 for n in shape)
            and all(isinstance(pre.get(k), list) and len(pre[k]) == 3 for k in ("mean", "std"))):
        raise TailwiseError(f"{arch_file} is not a tailwise model description (it needs \"model\", \"classes\" and "
                            "\"preprocess\" with 3-value mean, std and an input_shape of at most 4096 per side); "
                            "restore it from the run")
    return arch


def _mismatches(model: nn.Module, state: dict, arch: dict) -> list[str]:
    """What does not match between ``model`` (rebuilt from ``arch.json`` at the saved layer shapes) and ``state``:
    missing and unexpected tensors, tensors of another shape, and layers whose channels differ from the ones
    ``arch.json`` records."""
    expected = model.state_dict()
    found = [f"missing tensor {k}" for k in expected if k not in state]
    found += [f"unexpected tensor {k}" for k in state if k not in expected]
    found += [f"tensor {k} has shape {tuple(state[k].shape)}, the architecture needs {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    recorded, actual = arch.get("channels"), layer_channels(model)
    if isinstance(recorded, dict):
        found += [f"layer {name} has {actual.get(name)} (in, out) channels in the weights, arch.json records "
                  f"{recorded.get(name)}" for name in sorted(set(recorded) | set(actual))
                  if actual.get(name) != recorded.get(name)]
    return found


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load the deployable model of a run directory (or of its ``model/`` folder), in eval mode.

    The returned module carries ``.arch``, ``.preprocess`` (mean, std, input shape) and ``.classes``. Nothing that
    does not fit is returned: ``arch.json`` must describe a model tailwise can build, ``weights.safetensors`` must be
    a safetensors file (it is never unpickled), every tensor must belong to the architecture at the shape and layer
    channels ``arch.json`` records, and a forward pass of one batch of the recorded input shape must give one score
    per recorded class. Otherwise a :class:`TailwiseError` says what does not match.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    directory = path / "model" if (path / "model" / "arch.json").is_file() else path
    arch_file, weights_file = directory / "arch.json", directory / "weights.safetensors"
    if not arch_file.is_file():
        raise TailwiseError(f"{path} has no model/arch.json: not a finished tailwise run or model folder")
    arch = _read_arch(arch_file)
    try:
        state = load_file(str(weights_file))
    except (SafetensorError, OSError) as exc:
        raise TailwiseError(f"{weights_file} is not a readable safetensors file ({exc}); it is missing, cut short or "
                            "was replaced. Restore it from the run that wrote it") from None
    spec = arch["model"]
    try:
        model = build_architecture(spec)
    except (TypeError, ValueError, KeyError) as exc:
        raise TailwiseError(f"{arch_file} describes a model tailwise cannot build ({exc})") from None
    problem = f"{weights_file} does not fit {arch_file}"
    try:
        _resize_to(model, state)
    except (IndexError, ValueError, RuntimeError) as exc:  # a tensor of a rank no such layer has
        raise TailwiseError(f"{problem}: {exc}") from None
    found = _mismatches(model, state, arch)
    if found:
        more = f" (and {len(found) - 5} more)" if len(found) > 5 else ""
        raise TailwiseError(f"{problem}: {'; '.join(found[:5])}{more}")
    model.load_state_dict(state)
    model.eval()
    num_classes = (spec.get("member") or spec).get("num_classes")
    try:
        with torch.no_grad():
            logits = model(torch.zeros(1, *arch["preprocess"]["input_shape"]))
    except RuntimeError as exc:  # layers that do not chain (e.g. a classifier narrower than the features)
        raise TailwiseError(f"{problem}: a forward pass fails ({str(exc).splitlines()[0]})") from None
    if tuple(logits.shape) != (1, num_classes) or len(arch["classes"]) != num_classes:
        raise TailwiseError(f"{problem}: the weights give {logits.shape[-1]} class scores, arch.json says num_classes "
                            f"{num_classes} and lists {len(arch['classes'])} class names")
    model.preprocess, model.classes = arch["preprocess"], arch["classes"]
    return model.to(device)
