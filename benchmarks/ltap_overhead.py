"""Measure LTAP's training overhead over the dense run: ``python benchmarks/ltap_overhead.py``.

ResNet-32 on CIFAR-sized batches (128 x 3 x 32 x 32, 10 classes), one thread by default. Times, per optimizer
step, the dense work (forward, backward, SGD step) and LTAP's hooks on top of it: ``after_backward`` (gradient
masking + accumulation of the gradient criteria, the Fisher diagonal included) and ``after_step`` (masks on
weights and momentum) in a scoring-window epoch, and the hooks in an epoch outside the window after that stage
(masking only). Also times one pruning stage to 75% of the parameters (criteria, normalisation, the trial
vote's evaluations -- here on a 20-image validation split, so their share is not representative --, mixing,
budgeted selection, masking). The per-epoch overhead of the worst epoch (a scoring window that ends with a
stage) is
``(steps * hook_time + stage_time) / (steps * dense_step_time)`` with ``steps`` the steps of a CIFAR-10-LT IR-100
epoch (12,406 images / 128 = 97 steps); evaluation time is left out of the denominator (conservative).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from common import median_time


def measure(steps: int = 12, threads: int = 1, batch: int = 128, epoch_steps: int = 97, device: str = "cpu") -> dict:
    from tailwise.config import config_from_dict
    from tailwise.engine.trainer import Trainer

    torch.set_num_threads(threads)
    raw = {"data": {"name": "synthetic", "num_classes": 10, "synthetic_per_class": 20, "synthetic_test_per_class": 2,
                    "imbalance_ratio": 1, "image_size": 32, "val_per_class": 2, "cache": False},
           "model": {"name": "resnet32"}, "loss": {"name": "balanced_softmax"},
           "method": {"name": "ltap", "start_epoch": 1, "stages": 2, "stage_interval": 2, "target_params": 0.5},
           "train": {"epochs": 3, "batch_size": batch, "warmup_epochs": 0},
           "run": {"seed": 0, "progress": "none", "threads": threads, "device": device}}
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config_from_dict(raw), out, log=lambda msg: None)
        ctx, method = trainer.ctx, trainer.method
        x = torch.randn(batch, 3, 32, 32, device=ctx.device)
        y = torch.randint(0, 10, (batch,), device=ctx.device)
        sync = (lambda: torch.cuda.synchronize()) if ctx.device.type == "cuda" else (lambda: None)

        def dense_step():
            ctx.optimizer.zero_grad(set_to_none=True)
            trainer.loss_fn(ctx.model(x), y).backward()
            ctx.optimizer.step()
            sync()

        def hooks():
            method.after_backward(ctx)
            method.after_step(ctx)
            sync()

        dense_step()
        dense_step()  # warm-up
        ctx.epoch = 0  # epoch 0 ends with stage 1: the scoring window
        assert method.in_scoring_window(0)
        dense = median_time(dense_step, steps)
        window = median_time(hooks, steps * 4)
        start = time.perf_counter()
        method.on_epoch_end(ctx, 0, None)  # stage 1: criteria, mixing, selection, masks
        stage = time.perf_counter() - start
        ctx.epoch = 1  # outside any scoring window, with pruned channels: masking only
        assert not method.in_scoring_window(1)
        pruned = median_time(hooks, steps * 4)
    worst = (epoch_steps * window + stage) / (epoch_steps * dense)
    return {"device": str(ctx.device), "threads": threads, "batch": batch, "dense_step_s": round(dense, 4),
            "hooks_scoring_window_s": round(window, 5), "hooks_after_pruning_s": round(pruned, 5),
            "stage_s": round(stage, 3), "epoch_steps": epoch_steps,
            "overhead_scoring_epoch_pct": round(100 * worst, 2),
            "overhead_other_epochs_pct": round(100 * pruned / dense, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epoch-steps", type=int, default=97)
    parser.add_argument("--device", default="cpu")
    a = parser.parse_args()
    print(json.dumps(measure(a.steps, a.threads, a.batch, a.epoch_steps, a.device), indent=1))


if __name__ == "__main__":
    main()
