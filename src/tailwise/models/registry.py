"""A small timm-style model registry.

``build_model(name, num_classes, **kw)`` attaches ``model.arch = {"name", "num_classes", **kw}`` (a plain
JSON-serialisable dict) so a run can write it to ``arch.json`` and rebuild the same module later with
``build_model(**arch)``.
"""
from __future__ import annotations

import json
from typing import Callable

from torch import nn

from ..registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model.name")
register_model = MODELS.register  # decorator registering a factory ``fn(num_classes, **kw) -> nn.Module``
list_models = MODELS.names


def build_model(name: str, num_classes: int, **kw) -> nn.Module:
    factory = MODELS.get(name)
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    num_classes = int(num_classes)
    arch = {"name": name, "num_classes": num_classes, **kw}
    try:
        arch = json.loads(json.dumps(arch))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"model options must be JSON-serialisable: {kw!r}") from exc
    model = factory(num_classes=num_classes, **kw)
    model.arch = arch
    return model
