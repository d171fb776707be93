"""One registry style for models, losses and methods (in the manner of timm's model registry).

Each kind has one :class:`Registry`; entries are added with its ``register(name)`` decorator and listed with
``names()``. ``tailwise.models`` exposes it as ``register_model`` / ``list_models`` / ``build_model``,
``tailwise.losses`` as ``register_loss`` / ``list_losses`` / ``build_loss``, ``tailwise.methods`` as
``register_method`` / ``list_methods`` / ``build_method``.
"""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Names to objects of one kind (a model factory, a loss, a method class); ``key`` is the config key that
    names an entry (``model.name``), used in the error for an unknown name."""

    def __init__(self, key: str, error: type[Exception] = ValueError):
        self.key, self.error = key, error
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding its target under ``name``; a name already taken by another object is refused."""

        def decorator(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.key} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return decorator

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests that register a temporary entry)."""
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def get(self, name: str) -> T:
        """The entry ``name``; ``error`` naming the allowed ones otherwise."""
        if name not in self._entries:
            raise self.error(f"{self.key}: {name!r} is not allowed; allowed: {', '.join(self.names())}")
        return self._entries[name]
