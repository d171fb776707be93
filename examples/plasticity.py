"""Neuron growth and removal in a plain PyTorch loop (no Trainer): ``tailwise.Plasticity``.

A tiny CNN learns six classes of synthetic 8x8 images with a long-tailed training set (300 down to 10 images per
class). Every ``E_MOD`` epochs the epoch's class-reweighted gradients are observed and ``event(optimizer)``
duplicates the top 30% channels of each layer into the slots of the bottom 30% (widths never change), and
prints what it did. Right after an event every copy is a twin of its source (the same incoming weights; its
BatchNorm gamma/beta are fresh draws, its momentum zero); the twin diagnostic at the end shows how many pairs
have diverged since (in a network this small, four epochs separate only some). Runs in a few seconds on a CPU:

    python examples/plasticity.py
"""
from __future__ import annotations

import torch
from torch import nn

from tailwise import Plasticity
from tailwise.data.longtail import profile_counts, shot_groups
from tailwise.eval.metrics import summarize

COUNTS = profile_counts(300, 6, 30)  # training images per class, exponential profile: 300 down to 10
EPOCHS, E_MOD = 12, 4  # events after epochs 4 and 8, then four more epochs


def synthetic(counts, prototypes: torch.Tensor, generator: torch.Generator):
    """``counts[c]`` noisy copies (N(0, 1) per pixel) of class ``c``'s random prototype, and their labels."""
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return prototypes[labels] + torch.randn(len(labels), *prototypes.shape[1:], generator=generator), labels


def main() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    prototypes = torch.randn(len(COUNTS), 3, 8, 8, generator=g)
    x_train, y_train = synthetic(COUNTS, prototypes, g)
    x_test, y_test = synthetic([50] * len(COUNTS), prototypes, g)  # balanced test set

    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, len(COUNTS)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss()
    growth = Plasticity(model, COUNTS, example_inputs=x_train[:1], alpha=0.3)  # the paper's alpha
    params = sum(p.numel() for p in model.parameters())
    print(f"parameters before: {params}")

    for epoch in range(1, EPOCHS + 1):
        event_epoch = epoch % E_MOD == 0 and epoch < EPOCHS
        for idx in torch.randperm(len(y_train), generator=g).split(32):
            x, y = x_train[idx], y_train[idx]
            logits = model(x)
            loss = criterion(logits, y)
            if event_epoch:  # the epoch that ends in an event: accumulate the class-reweighted gradient ranking
                growth.observe(loss, logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if event_epoch:
            record = growth.event(optimizer)  # in place: same parameters, momentum edited alongside
            print(f"event after epoch {epoch} ({record['steps']} steps observed):")
            for name, layer in record["layers"].items():
                twins = record["twins"]["layers"][name]
                print(f"  layer {name}: duplicated {layer['duplicated']}, removed {layer['removed']}, width "
                      f"{layer['width']}; twins {twins['twins']}, effective width {twins['effective']}")
    end = growth.twins()
    for name, twins in end["layers"].items():
        print(f"end: layer {name}: twins {twins['twins']}, effective width {twins['effective']} of {twins['width']}")
    print(f"parameters after: {sum(p.numel() for p in model.parameters())}")
    model.eval()
    with torch.no_grad():
        acc = summarize(model(x_test).argmax(1), y_test, shot_groups(COUNTS))  # many > 100, few < 20 images
    print(f"classes per group: {acc['group_sizes']}")
    print("test accuracy: " + ", ".join(f"{k} {acc[k]:.1f}" for k in ("all", "many", "medium", "few")))


if __name__ == "__main__":
    main()
