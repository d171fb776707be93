"""DO in a plain PyTorch loop (no Trainer): ``tailwise.Decoupler``, ``recompute_batchnorm``, ``SubModelEnsemble``.

A small CNN learns six classes of synthetic 8x8 images from a long-tailed training set (300 down to 10 images per
class) in DO's three stages: many (instance sampling, cross-entropy), medium (group-preferred sampling, 70% of
every batch from the medium classes) and few (class-balanced sampling), the last two with the compensation loss
(Eqs. 2-3). At the end of the first two stages the Decoupler scores every weight by Taylor importance on the
stage's classes, prunes the unimportant ones gradually (Δt = 3 training steps per 10% of γ, Eq. 4) and freezes
the rest: the stage's sub-model, whose BatchNorm statistics are then recomputed on the stage's batches. The
frozen entries stay bit-identical to the end. Prints each sub-model's test accuracy per group with raw logits and
with its stage's label prior removed, and the ensemble of the three sub-models both ways. A few seconds on a CPU:

    python examples/do.py
"""
from __future__ import annotations

import torch
from torch import nn

from tailwise import Decoupler, SubModelEnsemble
from tailwise.data.loader import Sampler
from tailwise.data.longtail import profile_counts, shot_groups
from tailwise.eval.metrics import summarize
from tailwise.methods.batchnorm import recompute_batchnorm
from tailwise.methods.do import pruning_ratios
from tailwise.methods.do.loss import compensation_loss, stage_alpha

COUNTS = profile_counts(300, 6, 30)  # training images per class, exponential profile: 300 down to 10
GROUPS = shot_groups(COUNTS)
# (group, sampler, epochs, lr, gamma): the paper's plan; gamma = the fraction of free weights pruned at the end
STAGES = [("many", "instance", 8, 0.05, 0.5), ("medium", "group_preferred", 4, 0.005, 0.8),
          ("few", "class_balanced", 4, 0.005, None)]


def synthetic(counts, prototypes: torch.Tensor, generator: torch.Generator):
    """``counts[c]`` noisy copies (N(0, 1) per pixel) of class ``c``'s random prototype, and their labels."""
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return prototypes[labels] + torch.randn(len(labels), *prototypes.shape[1:], generator=generator), labels


def accuracy(forward, images: torch.Tensor, labels: torch.Tensor) -> str:
    with torch.no_grad():
        acc = summarize(forward(images).argmax(1), labels, GROUPS)
    return "  ".join(f"{k} {acc[k]:5.1f}" for k in ("all", "many", "medium", "few"))


def main() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    prototypes = torch.randn(len(COUNTS), 3, 8, 8, generator=g)
    x_train, y_train = synthetic(COUNTS, prototypes, g)
    x_test, y_test = synthetic([50] * len(COUNTS), prototypes, g)

    def network() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, len(COUNTS)))

    model = network()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    decoupler = Decoupler(model)  # exempt="classifier": the last linear layer is never frozen or pruned
    submodels, log_priors, frozen = [], [], []

    for t, (group, kind, epochs, lr, gamma) in enumerate(STAGES):
        classes = GROUPS.indices(group)
        sampler = Sampler(y_train, kind, seed=t, batch_size=32, rho=0.7, group_classes=classes)
        log_alpha = stage_alpha(group, classes, COUNTS, rho_m=0.7).log().float()  # ones for the many stage
        log_priors.append(sampler.label_distribution().log().float().tolist())
        for group_ in optimizer.param_groups:
            group_["lr"] = lr

        def step(idx: torch.Tensor) -> None:
            loss = compensation_loss(model(x_train[idx]), y_train[idx], log_alpha)
            optimizer.zero_grad()
            loss.backward()
            decoupler.after_backward()  # frozen and pruned entries get no gradient
            optimizer.step()
            decoupler.after_step(optimizer)  # ... and stay exactly as they are (weight decay, momentum)

        batches = [idx for e in range(epochs) for idx in sampler.epoch_indices(e).split(32)]
        for idx in batches:
            step(idx)
        if gamma is None:  # the last stage: the live network is the last sub-model
            break
        # Taylor-guided decoupling: score on the stage's classes, prune gradually with retraining, freeze the rest
        mine = torch.isin(y_train, torch.tensor(classes))
        scores = decoupler.importance([(x_train[mine], y_train[mine])],
                                      lambda z, y: compensation_loss(z, y, log_alpha))
        for i, ratio in enumerate(pruning_ratios(gamma, steps=3)):
            decoupler.prune(scores, ratio, optimizer)
            step(batches[i % len(batches)])
        state = decoupler.freeze(network(), optimizer)  # pruned entries restart from a fresh network's values
        sub = network()
        sub.load_state_dict(state)
        recompute_batchnorm(sub, (x_train[idx] for idx in sampler.epoch_indices(epochs).split(32)))
        submodels.append(sub.eval())
        frozen.append({name: (state[name], decoupler.masks.owner[i] == t + 1)
                       for i, (name, _) in enumerate(decoupler.params)})
        print(f"stage {t + 1} ({group}): froze {sum(int(m.sum()) for _, m in frozen[-1].values())} of "
              f"{sum(p.numel() for _, p in decoupler.params)} decoupled weights")

    members = [*submodels, model.eval()]
    state = model.state_dict()
    unchanged = all(torch.equal(state[name][mask], value[mask]) for stage in frozen for name, (value, mask)
                    in stage.items())
    print(f"frozen entries unchanged to the end: {unchanged}")
    for t, member in enumerate(members):
        offset = torch.tensor(log_priors[t])
        print(f"sub-model {t + 1} raw:            {accuracy(member, x_test, y_test)}")
        print(f"sub-model {t + 1} prior-corrected: {accuracy(lambda x: member(x) - offset, x_test, y_test)}")
    print(f"ensemble raw:             {accuracy(SubModelEnsemble(members, 'average'), x_test, y_test)}")
    corrected = SubModelEnsemble(members, "average", log_priors=log_priors)
    print(f"ensemble prior-corrected: {accuracy(corrected, x_test, y_test)}")


if __name__ == "__main__":
    main()
