"""The embedded demo dataset (a small real CIFAR-10-LT subset) and the overrides the demo recipe needs.

``demo_data/cifar10-lt-demo.tar.gz`` (1.3 MB) is an image-folder tree of CIFAR-10 JPEGs (Krizhevsky 2009,
"Learning Multiple Layers of Features from Tiny Images"; images copied from the project's CIFAR-10 JPEG set):
train 2,795 images in the Cao et al. exponential profile (n_max 1000, imbalance ratio 50), val 20 per class from
unused training images, test 100 per class. Built by ``scripts/make_demo_data.py``.
"""
from __future__ import annotations

from pathlib import Path

DEMO_DATA = Path(__file__).parent / "demo_data" / "cifar10-lt-demo.tar.gz"


def demo_overrides(epochs: int | None = None) -> list[str]:
    overrides = [f"data.root={DEMO_DATA}"]
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    return overrides
