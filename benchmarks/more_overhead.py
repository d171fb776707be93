"""What MORE's second (general-only) forward pass costs: median seconds per training step (forward, backward, SGD
step) of the dense model, the reparametrised model with the base loss only, and MORE with the general pass with
and without gradient -- all through the library functions a run uses (:func:`tailwise.methods.more.reparametrize`,
:func:`~tailwise.methods.more.general_logits`, :func:`~tailwise.methods.more.more_loss`).

    PYTHONPATH=src python benchmarks/more_overhead.py [--steps 6] [--threads 1] [--batch 128] [--device cpu]
"""
from __future__ import annotations

import argparse
import copy
import json

import torch

from common import median_time

from tailwise.losses import build_loss
from tailwise.methods.more import general_logits, more_loss, reparametrize
from tailwise.models import build_model

MODEL, NUM_CLASSES = "resnet32", 10


def measure_overhead(steps: int = 6, threads: int = 1, batch: int = 128, device: str = "cpu") -> dict:
    """Median seconds per training step (``steps`` timed after two warm-up steps) of ResNet-32 with 10 classes:
    dense / base-only / MORE / MORE with a detached general pass."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(dev)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(dev)
    counts = [int(500 * 0.01 ** (i / (NUM_CLASSES - 1))) for i in range(NUM_CLASSES)]
    loss_fn = build_loss("balanced_softmax", counts).to(dev)
    prior = torch.tensor(counts, dtype=torch.float32, device=dev)
    prior = prior / prior.sum()
    dense = build_model(MODEL, NUM_CLASSES).to(dev).train()
    lowrank = copy.deepcopy(dense)
    reparametrize(lowrank, 0.1, "all", g)
    amp = 2.0 * NUM_CLASSES

    def timed(model, alpha, detach):
        """Median seconds of a training step of ``model`` with MORE weight ``alpha`` (0: the base loss only) and
        the general pass without gradient if ``detach``."""
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            z_full = model(x)
            z_gen = general_logits(model, x, detach) if alpha else None
            more_loss(z_full, z_gen, y, prior, alpha, loss_fn)[0].backward()
            opt.step()
            sync()

        return median_time(step, steps, warmup=2)

    dense_s = timed(dense, 0.0, False)
    base_s = timed(lowrank, 0.0, False)
    more_s = timed(lowrank, amp, False)
    detached_s = timed(lowrank, amp, True)
    return {"device": str(dev), "threads": threads, "batch": batch, "model": MODEL,
            "dense_step_s": round(dense_s, 4), "lowrank_base_only_step_s": round(base_s, 4),
            "more_step_s": round(more_s, 4), "more_detached_step_s": round(detached_s, 4),
            "ratio_more_vs_base_only": round(more_s / base_s, 3), "ratio_more_vs_dense": round(more_s / dense_s, 3),
            "ratio_detached_vs_base_only": round(detached_s / base_s, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description="Time MORE's second forward pass (ResNet-32, CIFAR-sized batches)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    a = parser.parse_args()
    print(json.dumps(measure_overhead(a.steps, a.threads, a.batch, a.device), indent=1))


if __name__ == "__main__":
    main()
