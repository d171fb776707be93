"""LTAP in a plain PyTorch loop (no Trainer): ``tailwise.LTAP``.

A small CNN learns six classes of synthetic 8x8 images from a long-tailed training set (300 down to 10 images per
class). LTAP accumulates its criteria during training (``observe``), prunes to half the dense MACs in two
stages (``step``: every criterion's trial mask is evaluated on a balanced validation set, LT-Vote sets the
criterion weights, the mix prunes), fine-tunes, and ``compress`` returns the physically smaller network. Prints
parameters and MACs before/after, the vote at each stage and the per-group test accuracy. A few seconds on a CPU:

    python examples/ltap.py
"""
from __future__ import annotations

import torch
from torch import nn

from tailwise import LTAP
from tailwise.compress.cost import count_macs, count_params
from tailwise.data.longtail import profile_counts, shot_groups
from tailwise.eval.metrics import summarize

COUNTS = profile_counts(300, 6, 30)  # training images per class, exponential profile: 300 down to 10
EPOCHS, STAGES_AFTER = 12, (4, 6)  # prune after epochs 4 and 6, fine-tune to 12


def synthetic(counts, prototypes: torch.Tensor, generator: torch.Generator):
    """``counts[c]`` noisy copies (N(0, 1) per pixel) of class ``c``'s random prototype, and their labels."""
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return prototypes[labels] + torch.randn(len(labels), *prototypes.shape[1:], generator=generator), labels


def show(label: str, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Test accuracy overall and per shot group (many > 100, few < 20 training images)."""
    model.eval()
    with torch.no_grad():
        acc = summarize(model(images).argmax(1), labels, shot_groups(COUNTS))
    model.train()
    print(f"{label}: " + "  ".join(f"{k} {acc[k]:.1f}" for k in ("all", "many", "medium", "few")))


def main() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    prototypes = torch.randn(len(COUNTS), 3, 8, 8, generator=g)
    x_train, y_train = synthetic(COUNTS, prototypes, g)
    val = [synthetic([20] * len(COUNTS), prototypes, g)]  # a loader: one balanced batch of (x, y)
    x_test, y_test = synthetic([50] * len(COUNTS), prototypes, g)

    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, len(COUNTS)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss()
    ltap = LTAP(model, x_train[:1], COUNTS, target_macs=0.5, stages=len(STAGES_AFTER))
    dense = {"params": count_params(model), "macs": count_macs(model, x_train[:1])}

    for epoch in range(1, EPOCHS + 1):
        for idx in torch.randperm(len(y_train), generator=g).split(32):
            loss = criterion(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            ltap.observe(loss)  # backward, pruned gradients zeroed, criteria accumulated
            optimizer.step()
            ltap.enforce(optimizer)  # pruned weights and their momentum stay zero
        if epoch == STAGES_AFTER[0]:
            show("dense      ", model, x_test, y_test)
        if epoch in STAGES_AFTER:
            event = ltap.step(val)  # trial masks on the validation batch (its inputs recompute each trial's BN statistics), LT-Vote, prune
            votes = ltap.round_record["votes"]
            print(f"stage {event['stage']} after epoch {epoch}: removed {event['removed_channels']} channels; "
                  f"votes {', '.join(f'{k} {v:g}' for k, v in votes.items())}; "
                  f"suppressed {event['suppressed']}; alpha "
                  + ", ".join(f"{k} {a:.2f}" for k, a in event["alpha"].items()))

    small = ltap.compress()
    pruned = {"params": count_params(small), "macs": count_macs(small, x_train[:1])}
    for unit in ("params", "macs"):
        print(f"{unit}: {dense[unit]} -> {pruned[unit]} ({100 * pruned[unit] / dense[unit]:.1f}%)")
    model.eval()
    small.eval()
    with torch.no_grad():
        difference = (model(x_test) - small(x_test)).abs().max().item()
    print(f"masked vs compressed: max |logit difference| {difference:.2e}")
    show("compressed ", small, x_test, y_test)


if __name__ == "__main__":
    main()
