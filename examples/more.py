"""MORE in a plain PyTorch loop (no Trainer): ``tailwise.reparametrize``, ``tailwise.more_loss``, ``tailwise.merge``.

A tiny CNN first learns six classes of synthetic 8x8 images from a long-tailed training set (300 down to 10 images
per class) with cross-entropy: the trained general model ``W_g``. Then every conv / linear weight gets a low-rank
tail branch ``W = W_g + B·A`` (``reparametrize``); ``W_g`` is frozen and only ``B`` and ``A`` train, with the base
loss on the full model plus the prior-weighted discrepancy to the general model (``more_loss``) on the paper's sine
schedule. ``merge`` then folds ``B·A`` into a plain network of the original classes and size. Prints the branch's
size per layer and its share of the logits per class group, the per-group accuracy of the general and the merged
model, and checks that the merged model computes the trained one's logits. Runs in a few seconds on a CPU:

    python examples/more.py
"""
from __future__ import annotations

import math

import torch
from torch import nn

from tailwise import general_logits, merge, more_loss, reparametrize
from tailwise.data.longtail import ShotGroups
from tailwise.eval.metrics import summarize
from tailwise.methods.more import branch_parameters, branch_size, general_parameters

COUNTS = [300, 160, 80, 40, 20, 10]  # training images per class: many (0, 1), medium (2, 3), few (4, 5)
GROUPS = ShotGroups(("many", "many", "medium", "medium", "few", "few"))
PRETRAIN_EPOCHS, PHASE_EPOCHS = 8, 6
AMPLITUDE = 2.0  # normalised A' (the paper's optimum): alpha(tau) = A' * C * sin(pi * tau / T)


def synthetic_task(generator: torch.Generator):
    """Noisy copies of one random 8x8 prototype per class: a long-tailed training set, a balanced test set."""
    prototypes = torch.randn(len(COUNTS), 3, 8, 8, generator=generator)
    sets = []
    for counts in (COUNTS, [50] * len(COUNTS)):
        labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
        sets += [prototypes[labels] + 1.2 * torch.randn(len(labels), 3, 8, 8, generator=generator), labels]
    return sets


def show(name: str, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    model.eval()
    with torch.no_grad():
        acc = summarize(model(images).argmax(1), labels, GROUPS)
    model.train()
    print(f"{name} accuracy: " + ", ".join(f"{k} {acc[k]:.1f}" for k in ("all", "many", "medium", "few")))


def main() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x_train, y_train, x_test, y_test = synthetic_task(g)
    criterion = nn.CrossEntropyLoss()

    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, len(COUNTS)))
    base_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for _ in range(PRETRAIN_EPOCHS):  # 1. the general model, plain training
        for idx in torch.randperm(len(y_train), generator=g).split(32):
            optimizer.zero_grad()
            criterion(model(x_train[idx]), y_train[idx]).backward()
            optimizer.step()
    show("general model", model, x_test, y_test)

    # 2. the MORE phase: W = W_g + B A with B = 0 (the model is unchanged), W_g frozen, B and A trained
    ranks = reparametrize(model, ratio=0.25, generator=torch.Generator().manual_seed(1))
    print("ranks: " + ", ".join(f"layer {name} r={r}" for name, r in ranks.items()))
    for p in general_parameters(model):
        p.requires_grad_(False)
    general_before = [p.detach().clone() for p in general_parameters(model)]
    prior = torch.tensor(COUNTS, dtype=torch.float32) / sum(COUNTS)
    optimizer = torch.optim.SGD(branch_parameters(model), lr=0.05, momentum=0.9)
    steps = math.ceil(len(y_train) / 32)
    for epoch in range(PHASE_EPOCHS):
        for i, idx in enumerate(torch.randperm(len(y_train), generator=g).split(32)):
            x, y = x_train[idx], y_train[idx]
            alpha = AMPLITUDE * len(COUNTS) * math.sin(math.pi * (epoch * steps + i) / (PHASE_EPOCHS * steps))
            z_full = model(x)
            z_gen = general_logits(model, x, detach=True) if alpha else None  # f(x; W_g), BN statistics untouched
            loss, parts = more_loss(z_full, z_gen, y, prior, alpha, criterion)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    unchanged = all(torch.equal(a, b) for a, b in zip(general_before, general_parameters(model)))
    print(f"general weights unchanged: {unchanged}")

    # 3. the branch's size, then merge it away
    size = branch_size(model, x_test, y_test, {g: GROUPS.indices(g) for g in ("many", "medium", "few")})
    for name, ratio in size["weight_ratio"].items():
        print(f"branch ||BA||/||W_g|| layer {name}: {ratio:.4f}")
    print("branch share of the logits: " + ", ".join(f"{k} {v:.4f}" for k, v in size["logit_share_by_group"].items())
          + f" (all {size['logit_share']:.4f})")
    merged = merge(model)
    model.eval(), merged.eval()
    with torch.no_grad():
        a, b = model(x_test), merged(x_test)
    print(f"merged: max relative logit difference {float((a - b).abs().max() / a.abs().max()):.2e}")
    print(f"parameters: base {base_params}, merged {sum(p.numel() for p in merged.parameters())}, "
          f"during the phase {sum(p.numel() for p in model.parameters())}")
    print(f"merged layers: {', '.join(sorted({type(m).__name__ for m in merged.modules()}))}")
    show("merged model", merged, x_test, y_test)


if __name__ == "__main__":
    main()
