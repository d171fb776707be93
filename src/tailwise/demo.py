"""The embedded demo dataset (a small real CIFAR-10-LT subset) and the overrides the demo recipe needs.

``demo_data/cifar10-lt-demo.tar.gz`` (1.3 MB) is an image-folder tree of CIFAR-10 JPEGs (Krizhevsky 2009,
"Learning Multiple Layers of Features from Tiny Images"; images copied from the project's CIFAR-10 JPEG set):
train 2,795 images in the Cao et al. exponential profile (n_max 1000, imbalance ratio 50), val 20 per class from
unused training images, test 100 per class. Built by ``scripts/make_demo_data.py``.

``tailwise demo`` trains the ``demo`` recipe (ResNet-20, Balanced Softmax) densely, then LTAP on the same recipe:
pruning to 30% of the parameters in three stages from the middle of training, branched from the dense run's
checkpoint at that point (:mod:`tailwise.engine.branch`), fine-tuned on the physically smaller model.
"""
from __future__ import annotations

from pathlib import Path

DEMO_DATA = Path(__file__).parent / "demo_data" / "cifar10-lt-demo.tar.gz"



def demo_overrides(epochs: int | None = None, precision: str | None = None) -> list[str]:
    overrides = [f"data.root={DEMO_DATA}"]
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    if precision is not None:
        overrides.append(f"train.precision={precision}")
    return overrides


def ltap_overrides(epochs: int) -> tuple[list[str], int]:
    """LTAP's schedule for a demo of ``epochs`` epochs, and the dense epoch it branches from (0: none).

    Pruning starts after half the epochs, in three stages (one if there is no room), every
    ``(epochs - start) // 5`` epochs, so at least half the remaining epochs fine-tune the pruned model. Each
    trial's BatchNorm statistics are recomputed on 5 training batches (the default 20 is most of an epoch of the
    demo's 2,795 images, and the demo has a 3-minute budget).
    """
    start = max(1, epochs // 2)
    interval = max(1, (epochs - start) // 5)
    stages = 3 if start + 2 * interval <= epochs else 1
    method = {"name": "ltap", "target_params": 0.3, "start_epoch": start, "stages": stages,
              "stage_interval": interval, "normalize": "group-mean", "trial_bn_batches": 5}
    return [f"method.{k}={v}" for k, v in method.items()], start - 1  # score window: the epoch before stage 1


def demo_runs(out: Path, epochs: int | None = None, precision: str | None = None,
              seed: int | None = None) -> list[tuple[str, list[str], Path, Path | None]]:
    """``(label, overrides, run directory, branch checkpoint)`` of the dense and the LTAP demo runs."""
    base = demo_overrides(epochs, precision) + ([f"run.seed={seed}"] if seed is not None else [])
    if epochs is None:
        from .config import load_recipe

        epochs = load_recipe("demo")["train"]["epochs"]
    method, branch = ltap_overrides(epochs)
    keep = [f"run.keep_checkpoints=[{branch}]"] if branch >= 1 else []
    checkpoint = out / "dense" / "checkpoints" / f"epoch_{branch:03d}.pt" if branch >= 1 else None
    return [("BS (dense)", base + keep, out / "dense", None),
            ("BS + LTAP", base + method, out / "ltap", checkpoint)]
