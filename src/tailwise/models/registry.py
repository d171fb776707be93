"""A small timm-style model registry.

``build_model(name, num_classes, **kw)`` attaches ``model.arch = {"name", "num_classes", **kw}`` (a plain
JSON-serialisable dict) so a run can write it to ``arch.json`` and rebuild the same module later with
``build_model(**arch)``.
"""
from __future__ import annotations

import json
from typing import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a factory ``fn(num_classes, **kw) -> nn.Module`` under ``name``."""

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(name: str, num_classes: int, **kw) -> nn.Module:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    num_classes = int(num_classes)
    arch = {"name": name, "num_classes": num_classes, **kw}
    try:
        arch = json.loads(json.dumps(arch))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"model options must be JSON-serialisable: {kw!r}") from exc
    model = _REGISTRY[name](num_classes=num_classes, **kw)
    model.arch = arch
    return model
