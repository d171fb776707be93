"""Where LTAP's budget lands: parameters kept and F (% of dense MACs) after five stages from a checkpoint.

    python benchmarks/ltap_budget_probe.py CHECKPOINT [--arch resnet32] [--normalize group-mean l2] \
        [--target target_macs=0.25 target_params=0.3] [--round-to 8]

No training between stages and no data: the magnitudes come from the checkpoint, the gradient criteria from one
backward pass per stage on a random batch (64 images, N(0, 1)), mixed uniformly (``vote: uniform``), so the probe
shows the structure a budget and a normalisation produce, not accuracy. LTAP's docstring quotes its results from
the Balanced Softmax ResNet-32 epoch-99 checkpoint of CIFAR-10-LT IR 100.
"""
from __future__ import annotations

import argparse

import torch

from tailwise.methods.ltap import LTAP
from tailwise.models import build_model


def probe(state: dict, arch: str, classes: int, normalize: str, target: dict, round_to: int) -> dict:
    torch.manual_seed(0)
    model = build_model(arch, classes)
    model.load_state_dict(state)
    x, y = torch.randn(64, 3, 32, 32), torch.arange(64) % classes
    ltap = LTAP(model, x[:1], [1] * classes, vote="uniform", normalize=normalize, round_to=round_to, **target)
    for _ in range(ltap.options.stages):
        model.zero_grad()
        ltap.observe(torch.nn.functional.cross_entropy(model(x), y))
        ltap.step()
    cost = ltap.cost()
    return {"params_pct": round(100 * cost["active_params"] / ltap.dense["params"], 1),
            "F_pct": round(100 * cost["active_macs"] / ltap.dense["macs"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--arch", default="resnet32")
    parser.add_argument("--normalize", nargs="+", default=["group-mean", "l2"])
    parser.add_argument("--target", nargs="+", default=["target_macs=0.25", "target_params=0.3"])
    parser.add_argument("--round-to", type=int, default=8)
    a = parser.parse_args()
    state = torch.load(a.checkpoint, map_location="cpu", weights_only=True)["model"]
    classes = state["fc.weight"].shape[0]
    for spec in a.target:
        key, value = spec.split("=")
        for normalize in a.normalize:
            print(spec, normalize, f"round_to {a.round_to}",
                  probe(state, a.arch, classes, normalize, {key: float(value)}, a.round_to), flush=True)


if __name__ == "__main__":
    main()
