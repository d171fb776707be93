"""Methods: plain classes the trainer calls at fixed points (the Method hook protocol of DESIGN.md).

A method registers itself with :func:`register_method`, giving its name and an options dataclass; the run
config's ``method`` section is ``{name: ..., <that dataclass's keys>}`` and is validated by it up front.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..options import build_dataclass
from ..registry import Registry


class Method:
    """The hook protocol. The base class is the plain baseline (``method: none``): every hook is a no-op."""

    name = "none"
    summary = "plain training with the chosen loss"  # one line for `tailwise methods`

    @dataclass
    class Options:
        pass

    def __init__(self, options: "Method.Options"):
        self.options = options

    @classmethod
    def check_options(cls, options: "Method.Options", cfg) -> None:
        """Validate (and fill in defaults of) ``options`` against the whole config; raise ConfigError."""

    def setup(self, ctx) -> None:
        """Called once after the model, optimizer, data and loss exist (and before a resume is loaded)."""

    def on_epoch_start(self, ctx, epoch: int) -> None:
        pass

    def training_loss(self, ctx, x: torch.Tensor, y: torch.Tensor):
        """Return the loss for this batch to override ``loss_fn(model(x), y)`` — or ``(loss, logits)`` so the
        trainer can count training accuracy — or None for the default."""
        return None

    def after_backward(self, ctx) -> None:
        """Gradients are populated (accumulate gradient-based scores here)."""

    def after_step(self, ctx) -> None:
        """The optimizer has stepped (enforce masks / frozen values here)."""

    def on_epoch_end(self, ctx, epoch: int, val: dict | None) -> dict:
        """``val`` is the validation summary of this epoch. Returns extra fields for ``metrics.jsonl``."""
        return {}

    def predict(self, ctx, x: torch.Tensor) -> torch.Tensor:
        return ctx.model(x)

    def param_groups(self, model: nn.Module) -> list[dict]:
        """The optimizer's parameter groups over ``model``: dicts with ``params`` and optionally ``lr_scale`` (the
        group trains at the schedule's rate times it) or ``weight_decay``. Default: one group of all parameters."""
        return [{"params": list(model.parameters())}]

    def first_active_epoch(self) -> int:
        """The first (0-based) epoch in which the method changes or observes training; before it, a run with
        this method equals the plain run bit for bit, so it may branch from the plain run's checkpoint
        (:mod:`tailwise.engine.branch`). Conservatively 0: active from the start."""
        return 0

    def selectable(self, epoch: int) -> bool:
        """Whether the model at the end of ``epoch`` may be chosen as best-on-validation (a pruning method:
        only once its final budget is in force)."""
        return True

    def finalize(self, ctx) -> nn.Module:
        """Return the deployable model (physically compressed, merged, ...)."""
        return ctx.model

    def describe(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self.options)}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


METHODS: Registry[type[Method]] = Registry("method.name", ConfigError)
METHODS.register("none")(Method)
list_methods = METHODS.names


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator registering a method under its ``name`` attribute (the config's ``method.name``)."""
    return METHODS.register(cls.name)(cls)


def method_class(name: str) -> type[Method]:
    """The registered method ``name``; ConfigError naming the allowed ones otherwise."""
    return METHODS.get(name)


def validate_method_config(raw: Any, cfg=None) -> dict:
    """Validate the ``method`` section against the method's options dataclass (and, given the rest of the
    config ``cfg``, the method's own cross-checks); returns the resolved dict."""
    if not isinstance(raw, dict):
        raise ConfigError(f"method: expected a mapping like {{name: none}}, got {raw!r}")
    raw = dict(raw)
    name = raw.pop("name", "none")
    cls = method_class(name)
    options = build_dataclass(cls.Options, raw, "method")
    if cfg is not None:
        cls.check_options(options, cfg)
    return {"name": name, **dataclasses.asdict(options)}


def build_method(config: dict) -> Method:
    """The method a validated ``method`` section (``name`` plus that method's options) describes."""
    config = dict(config)
    cls = method_class(config.pop("name"))
    return cls(build_dataclass(cls.Options, config, "method"))


from . import pruning as _pruning  # noqa: E402,F401  (registers magnitude, taylor, random)
from . import ltap as _ltap  # noqa: E402,F401  (registers ltap)
from . import more as _more  # noqa: E402,F401  (registers more)
from . import plasticity as _plasticity  # noqa: E402,F401  (registers plasticity)
from . import do as _do  # noqa: E402,F401  (registers do)
