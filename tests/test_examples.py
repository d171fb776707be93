"""The examples in examples/ run in a plain PyTorch loop (no Trainer) and do what they print."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

from tailwise.data.longtail import profile_counts

ROOT = Path(__file__).resolve().parents[1]
# the default criteria: the five but avg_magnitude, which equals magnitude under the default group-mean normalisation
CRITERIA = {"magnitude", "cosine_similarity", "taylor_first_order", "taylor_second_order"}


def run_example(name: str) -> str:
    """Run ``examples/<name>.py`` in a fresh interpreter (one thread); its standard output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py")], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_ltap_example_runs_and_its_claims_hold():
    """examples/ltap.py runs in a plain PyTorch loop and does what it prints: two stages, each with one trial-vote
    round whose suppressed criterion has weight 0 and whose weights sum to 1; the compressed model meets the MAC
    budget (half the dense MACs), has fewer parameters, and computes what the masked model computes."""
    out = run_example("ltap")
    stages = re.findall(r"stage (\d) after epoch (\d+): removed (\d+) channels; votes (.*); suppressed (\w+); "
                        r"alpha (.*)", out)
    assert [(s, e) for s, e, *_ in stages] == [("1", "4"), ("2", "6")]
    for _, _, removed, votes, suppressed, alpha in stages:
        assert int(removed) > 0
        assert {name for name, _ in (v.split() for v in votes.split(", "))} == CRITERIA
        weights = {name: float(a) for name, a in (v.split() for v in alpha.split(", "))}
        assert set(weights) == CRITERIA and weights[suppressed] == 0.0 and abs(sum(weights.values()) - 1) < 0.03
    cost = {unit: (int(a), int(b)) for unit, a, b in re.findall(r"(params|macs): (\d+) -> (\d+)", out)}
    assert cost["macs"][1] <= 0.5 * cost["macs"][0]
    assert cost["params"][1] < cost["params"][0]
    difference = float(re.search(r"max \|logit difference\| ([\d.e+-]+)", out).group(1))
    assert difference < 1e-4
    for label in ("dense", "compressed"):
        line = re.search(rf"^{label} *:(.*)$", out, re.M).group(1)
        acc = dict(re.findall(r"(all|many|medium|few) ([\d.]+)", line))
        assert set(acc) == {"all", "many", "medium", "few"}
        assert float(acc["all"]) > 100 / 6 * 2  # well above chance (six classes)


def test_more_example_runs_and_its_claims_hold():
    """examples/more.py runs in a plain PyTorch loop and does what it prints: the frozen general weights stay bit for bit,
    the branch trained (nonzero size in every layer and group), the merged model has the base model's parameters and
    layer classes and computes the trained model's logits, and it classifies well above chance."""
    out = run_example("more")
    # rank max(1, round(0.25 * min(m, k))): convs 16 x 27 -> 4, 16 x 144 -> 4; the head 6 x 16 -> round(1.5) = 2
    assert re.findall(r"layer (\d+) r=(\d+)", out) == [("0", "4"), ("3", "4"), ("8", "2")]
    assert "general weights unchanged: True" in out
    ratios = re.findall(r"branch \|\|BA\|\|/\|\|W_g\|\| layer (\d+): ([\d.]+)", out)
    assert [name for name, _ in ratios] == ["0", "3", "8"] and all(float(r) > 0 for _, r in ratios)
    shares = dict(re.findall(r"(many|medium|few|all) ([\d.]+)", out.split("branch share of the logits:")[1].split("\n")[0]))
    assert set(shares) == {"many", "medium", "few", "all"} and all(float(v) > 0 for v in shares.values())
    assert float(re.search(r"max relative logit difference ([\d.e+-]+)", out).group(1)) <= 1e-5
    base = 3 * 16 * 9 + 2 * 16 + 16 * 16 * 9 + 2 * 16 + 16 * 6 + 6
    lowrank = (16 * 4 + 4 * 27) + (16 * 4 + 4 * 144) + (6 * 2 + 2 * 16)
    assert re.search(r"parameters: base (\d+), merged (\d+), during the phase (\d+)", out).groups() == (
        str(base), str(base), str(base + lowrank))
    assert "merged layers: AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Flatten, Linear, ReLU, Sequential" in out
    for model in ("general model", "merged model"):
        acc = dict(re.findall(r"(all|many|medium|few) ([\d.]+)", out.split(f"{model} accuracy:")[1].split("\n")[0]))
        assert set(acc) == {"all", "many", "medium", "few"}
        assert float(acc["all"]) > 100 / 6 * 2  # well above chance (six classes)


def test_plasticity_example_runs_and_its_claims_hold():
    """examples/plasticity.py runs in a plain PyTorch loop and does what it prints: widths and the parameter count
    never change, every event duplicates and removes floor(0.3 x 16) = 4 channels per layer, a copy is a twin of its
    source right after the event, and training after it separates twins without making new ones."""
    out = run_example("plasticity")
    before = int(re.search(r"parameters before: (\d+)", out).group(1))
    after = int(re.search(r"parameters after: (\d+)", out).group(1))
    assert before == after == 3 * 16 * 9 + 2 * 16 + 16 * 16 * 9 + 2 * 16 + 16 * 6 + 6
    steps = str(math.ceil(sum(profile_counts(300, 6, 30)) / 32))  # every batch of the epoch before the event
    assert re.findall(r"event after epoch (\d+) \((\d+) steps observed\)", out) == [("4", steps), ("8", steps)]
    layers = re.findall(r"layer (\d+): duplicated (\d+), removed (\d+), width (\d+); twins (\d+), effective width "
                        r"(\d+)", out)
    assert len(layers) == 4  # two events x two layers (the convs "0" and "3")
    for _, duplicated, removed, width, twins, effective in layers:
        assert int(duplicated) == int(removed) == 4 and int(width) == 16
        assert int(twins) >= 8 and int(effective) <= 12  # each copy's incoming weights are its source's
    end = re.findall(r"end: layer (\d+): twins (\d+), effective width (\d+) of 16", out)
    assert [name for name, _, _ in end] == ["0", "3"]
    last_event = {name: int(twins) for name, _, _, _, twins, _ in layers[2:]}
    for name, twins, effective in end:  # training after the last event separates twins, never makes new ones
        twins, effective = int(twins), int(effective)
        assert twins <= last_event[name]
        assert 16 - twins + (twins > 0) <= effective <= 16 - twins / 2  # clusters of two or more twins
    acc = dict(re.findall(r"(all|many|medium|few) ([\d.]+)", out.split("test accuracy:")[1]))
    assert set(acc) == {"all", "many", "medium", "few"}
    assert float(acc["all"]) > 100 / 6 * 2  # well above chance (six classes)


def test_do_example_runs_and_its_claims_hold():
    """examples/do.py runs in a plain PyTorch loop and does what it prints: stage 1 freezes half the decoupled
    weights (gamma 0.5) and stage 2 a fifth of the rest (gamma 0.8); the frozen entries stay bit for bit to the end;
    the few stage's class-balanced prior is uniform, so its sub-model's correction changes nothing; removing the
    head-heavy priors of stages 1 and 2 raises their sub-models' few-shot accuracy and the ensemble's."""
    out = run_example("do")
    decoupled = 32 * 3 * 9 + 32 * 32 * 9  # the two convs; the classifier is exempt
    assert re.findall(r"stage (\d) \((\w+)\): froze (\d+) of (\d+)", out) == [
        ("1", "many", str(decoupled // 2), str(decoupled)), ("2", "medium", str(decoupled // 10), str(decoupled))]
    assert "frozen entries unchanged to the end: True" in out

    def acc(label):
        line = next(line for line in out.splitlines() if line.startswith(label + ":"))
        return {k: float(v) for k, v in re.findall(r"(all|many|medium|few) +([\d.]+)", line)}

    assert acc("sub-model 3 raw") == acc("sub-model 3 prior-corrected")
    for label in ("sub-model 1", "sub-model 2", "ensemble"):
        raw, corrected = acc(f"{label} raw"), acc(f"{label} prior-corrected")
        assert corrected["few"] > raw["few"], label
    assert acc("ensemble prior-corrected")["all"] > 100 / 6 * 2  # well above chance (six classes)
