"""Typed option fields and their validation: the leaf module under the run config and every method's options.

:func:`choice` and :func:`bounded` declare a dataclass field's allowed values; :func:`build_dataclass` builds the
dataclass from a mapping, rejecting unknown keys, wrong types, values outside the choices and out-of-range
numbers with a :class:`~tailwise.errors.ConfigError` that names the key path.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import field
from typing import Any

from .errors import ConfigError


def choice(*allowed, default):
    """A dataclass field whose value must be one of ``allowed`` (checked by :func:`build_dataclass`)."""
    return field(default=default, metadata={"choices": allowed})


def bounded(default, low=None, high=None, low_open=False, high_open=False):
    """A numeric dataclass field checked by :func:`build_dataclass` to lie in ``[low, high]`` (ends excluded
    with ``low_open`` / ``high_open``; None: unbounded). Used by the run config and the methods' options."""
    return field(default=default, metadata={"low": low, "high": high, "low_open": low_open, "high_open": high_open})


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp, path: str):
    """Check ``value`` against annotation ``tp`` (int, float, bool, str, list[...], X | None). A float must be
    finite (no .nan / .inf); an int given as a float must be a whole number that a float holds exactly."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list of {_type_name(item)}, got {value!r}")
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:  # exactly that integer
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int beyond any float
                number = math.inf
            if not math.isfinite(number):
                raise ConfigError(f"{path}: expected a finite number, got {value}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def build_dataclass(cls, values: dict | None, path: str):
    """Instantiate dataclass ``cls`` from ``values``, validating keys, types, choices and bounds."""
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {path}.{unknown[0]}; allowed keys in {path}: {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        key = f"{path}.{name}"
        value = _coerce(value, hints[name], key)
        meta = fields[name].metadata
        if "choices" in meta and value not in meta["choices"]:
            allowed = ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in meta["choices"])
            raise ConfigError(f"{key}: {value!r} is not allowed; allowed: {allowed}")
        if value is not None and isinstance(value, (int, float)):
            low, high = meta.get("low"), meta.get("high")
            if (low is not None and (value < low or (meta.get("low_open") and value == low))) or \
                    (high is not None and (value > high or (meta.get("high_open") and value == high))):
                raise ConfigError(f"{key}: {value} is out of range; must be {' and '.join(bounds_text(meta))}")
        kwargs[name] = value
    return cls(**kwargs)


def bounds_text(meta) -> list[str]:
    """The bounds of a :func:`bounded` field as text, e.g. ``['> 0.0', '<= 0.99']``."""
    out = []
    if meta.get("low") is not None:
        out.append(f"{'>' if meta.get('low_open') else '>='} {meta['low']}")
    if meta.get("high") is not None:
        out.append(f"{'<' if meta.get('high_open') else '<='} {meta['high']}")
    return out


def field_table(cls) -> list[tuple[str, str, str, str]]:
    """``(key, type, default, allowed)`` of every field of the options dataclass ``cls``, as text."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        allowed = (", ".join(str(c) for c in f.metadata["choices"]) if "choices" in f.metadata
                   else " and ".join(bounds_text(f.metadata)))
        kind = getattr(hints[f.name], "__name__", None) or str(hints[f.name])
        text = "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
        rows.append((f.name, str(kind).replace("typing.", ""), text, allowed))
    return rows
