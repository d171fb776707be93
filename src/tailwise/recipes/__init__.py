"""Bundled YAML recipes, one per table row (dataset x loss x method), plus the demo recipe."""
from __future__ import annotations

from pathlib import Path

RECIPE_DIR = Path(__file__).parent


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def find_recipe(name: str) -> Path | None:
    """A bundled recipe by name (with or without ``.yaml``)."""
    path = RECIPE_DIR / (name if name.endswith(".yaml") else name + ".yaml")
    return path if path.is_file() else None
