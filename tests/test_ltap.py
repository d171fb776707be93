"""LTAP: the five criteria against hand computations, LT-Vote on scripted accuracy sequences (with guards against
the public code's three defects), options, recipes, and tiny end-to-end runs (target reached, alpha logged,
compressed model written, ablations run, exact resume across a stage)."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from tailwise.compress.groups import channel_groups
from tailwise.config import config_from_dict, load_config
from tailwise.deploy import load_model
from tailwise.engine.rundir import prepare_run_dir
from tailwise.engine.trainer import Trainer
from tailwise.errors import ConfigError
from tailwise.methods.ltap import (CRITERIA, PUBLIC_CODE_WEIGHTS, ChannelLayout, CriteriaAccumulator, LTVote,
                                   class_weights, mix, normalise)
from tailwise.methods.pruning import per_channel_sums
from tailwise.recipes import list_recipes

from test_engine import tiny_config, trainer_for


# ------------------------------------------------------------------------------------------------ criteria
class Tiny(nn.Module):
    """conv1 (2->3, 1x1) -> BN -> ReLU -> conv2 (3->2, 1x1) -> global mean -> fc (2->2)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 2, 1, bias=False)
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(self.conv2(torch.relu(self.bn1(self.conv1(x)))).mean((2, 3)))


def vec(values: dict, group: str, c: int) -> list[float]:
    """The hand-written channel vector: every member slice of channel ``c``, as plain floats."""
    if group == "conv1":  # conv1 filter c, BN gamma/beta c, conv2's input column c
        parts = [values["conv1.weight"][c].flatten(), values["bn1.weight"][c:c + 1], values["bn1.bias"][c:c + 1],
                 values["conv2.weight"][:, c].flatten()]
    else:  # conv2 filter c, fc's input column c
        parts = [values["conv2.weight"][c].flatten(), values["fc.weight"][:, c]]
    return [float(v) for p in parts for v in p]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def norm(a):
    return math.sqrt(dot(a, a))


NAMES = ("conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight", "fc.weight")
CHANNELS = [("conv1", c) for c in range(3)] + [("conv2", c) for c in range(2)]


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = Tiny()
    groups = channel_groups(model, torch.randn(1, 2, 4, 4))
    assert [g.name for g in groups] == ["conv1", "conv2"] and [g.size for g in groups] == [3, 2]
    return model, groups


def set_state(model, weights: dict, grads: dict) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in NAMES:
            params[name].copy_(weights[name])
            params[name].grad = grads[name].clone()


def random_like(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters() if n in NAMES}


@pytest.mark.parametrize("second_order", ["fisher", "public-code"])
def test_criteria_match_hand_computation(tiny, second_order):
    model, groups = tiny
    layout = ChannelLayout(model, groups)
    acc = CriteriaAccumulator(layout, list(CRITERIA), second_order)
    steps = [(random_like(model, 1), random_like(model, 2)), (random_like(model, 3), random_like(model, 4))]
    for w, g in steps:
        set_state(model, w, g)
        assert acc.accumulate(model)
    final = random_like(model, 5)  # the weights at the end of the window (magnitudes and Fisher use these)
    set_state(model, final, final)
    keep = [torch.ones(3, dtype=torch.bool), torch.ones(2, dtype=torch.bool)]
    got = acc.compute(model, keep)
    for i, (group, c) in enumerate(CHANNELS):
        w_end = vec(final, group, c)
        n = 6 if group == "conv1" else 5
        ws, gs = [vec(w, group, c) for w, _ in steps], [vec(g, group, c) for _, g in steps]
        expected = {
            "magnitude": norm(w_end),
            "avg_magnitude": norm(w_end) / n,
            "cosine_similarity": 1 + sum(dot(w, g) / (norm(w) * norm(g)) for w, g in zip(ws, gs)) / 2,
            "taylor_first_order": sum(abs(dot(w, g)) for w, g in zip(ws, gs)) / 2,
        }
        if second_order == "fisher":
            fisher = [(a * a + b * b) / 2 for a, b in zip(*gs)]
            expected["taylor_second_order"] = 0.5 * sum(h * x * x for h, x in zip(fisher, w_end))
        else:
            expected["taylor_second_order"] = sum(0.5 * dot(w, g) ** 2 for w, g in zip(ws, gs)) / 2
        for name, value in expected.items():
            assert math.isclose(float(got[name][i]), value, rel_tol=1e-5), (name, group, c)


def test_avg_magnitude_counts_live_elements_only(tiny):
    model, groups = tiny
    layout = ChannelLayout(model, groups)
    acc = CriteriaAccumulator(layout, ["magnitude", "avg_magnitude"])
    keep = [torch.tensor([True, False, True]), torch.tensor([True, False])]  # conv1 ch 1 and conv2 ch 1 pruned
    got = acc.compute(model, keep)
    # conv1 ch c: its 2 filter weights (conv1's inputs are not governed), gamma, beta, conv2[:, c] of the 1 live row
    # conv2 ch c: 3 filter weights of which 2 read live conv1 channels, + 2 fc weights
    counts = torch.tensor([5, 0, 5, 4, 0], dtype=torch.float64)  # pruned channels own no live element
    assert torch.equal(layout.live_elements(model, keep), counts)
    live = counts > 0
    assert torch.allclose(got["avg_magnitude"][live], got["magnitude"][live] / counts[live])


def test_zero_gradient_gives_zero_cosine_and_taylor(tiny):
    model, groups = tiny
    acc = CriteriaAccumulator(ChannelLayout(model, groups), ["cosine_similarity", "taylor_first_order"])
    w = random_like(model, 1)
    set_state(model, w, {k: torch.zeros_like(v) for k, v in w.items()})
    acc.accumulate(model)
    got = acc.compute(model, [torch.ones(3, dtype=torch.bool), torch.ones(2, dtype=torch.bool)])
    assert torch.equal(got["cosine_similarity"], torch.ones(5, dtype=torch.float64))
    assert torch.equal(got["taylor_first_order"], torch.zeros(5, dtype=torch.float64))


def test_layout_matches_shared_helper_on_residual_groups():
    """On a ResNet (channels tied by residual additions), the flat layout's per-channel sums equal the shared
    ``per_channel_sums`` helper group by group."""
    from tailwise.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet20", 4)
    groups = channel_groups(model, torch.randn(1, 3, 16, 16))
    layout = ChannelLayout(model, groups)
    flat = layout.reduce([torch.stack([t.detach() ** 2]) for t in layout.tensors(model)])[0]
    expected = per_channel_sums(groups, model, lambda t: t.detach() ** 2)
    for got, want in zip(layout.split(flat), expected):
        assert torch.allclose(got, want, rtol=1e-6)


def test_normalise_and_mix_by_hand():
    live = torch.tensor([True, True, False, True])
    values = torch.tensor([3.0, 4.0, 100.0, 0.0], dtype=torch.float64)
    assert torch.allclose(normalise(values, live, "l2"), torch.tensor([0.6, 0.8, 0.0, 0.0], dtype=torch.float64))
    assert torch.allclose(normalise(values, live, "mean"), torch.tensor([9 / 7, 12 / 7, 0.0, 0.0], dtype=torch.float64))
    assert torch.allclose(normalise(values, live, "max"), torch.tensor([0.75, 1.0, 0.0, 0.0], dtype=torch.float64))
    # group-mean: each group (offset, size) by its own live mean
    got = normalise(values, live, "group-mean", [(0, 2), (2, 2)])
    assert torch.allclose(got, torch.tensor([3 / 3.5, 4 / 3.5, 0.0, 0.0], dtype=torch.float64))  # group 2: mean 0
    got = normalise(torch.tensor([1.0, 3.0, 5.0, 2.0]), torch.ones(4, dtype=torch.bool), "group-mean", [(0, 1), (1, 3)])
    assert torch.allclose(got, torch.tensor([1.0, 0.9, 1.5, 0.6], dtype=torch.float64))
    a, b = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([4.0, 0.5], dtype=torch.float64)
    mixed = mix({"magnitude": a, "cosine_similarity": b, "avg_magnitude": 100 * a},
                {"magnitude": 0.25, "cosine_similarity": 0.75, "avg_magnitude": 0.0})
    assert torch.allclose(mixed, torch.tensor([0.25 + 3.0, 0.5 + 0.375], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------- vote
def test_class_weights_by_hand():
    counts = [100, 10, 1]
    raw = [(100 / n) / math.log(1 + n) for n in counts]
    assert torch.allclose(class_weights(counts, "tail"), torch.tensor([r / sum(raw) for r in raw], dtype=torch.float64))
    f64 = dict(dtype=torch.float64)
    assert torch.allclose(class_weights(counts, "counts"), torch.tensor([100 / 111, 10 / 111, 1 / 111], **f64))
    inverse = [1 / n for n in counts]  # 0.01, 0.1, 1
    assert torch.allclose(class_weights(counts, "inverse"), torch.tensor([v / sum(inverse) for v in inverse], **f64))
    assert torch.allclose(class_weights(counts, "uniform"), torch.full((3,), 1 / 3, dtype=torch.float64))
    w = class_weights(counts, "tail")
    assert w[2] > w[1] > w[0]  # tail-biased


def hand_alpha(D, w, rounds, tau, suppressed):
    """softmax(D w / rounds / tau) with ``suppressed``'s weight moved uniformly to the others."""
    K = len(D)
    logits = [sum(D[k][c] * w[c] for c in range(len(w))) / max(rounds, 1) / tau for k in range(K)]
    exp = [math.exp(v) for v in logits]
    base = [e / sum(exp) for e in exp]
    out = [b + base[suppressed] / (K - 1) for b in base]
    out[suppressed] = 0.0
    return base, out


ACCURACIES = [  # per-class validation accuracy (percent) after each round; None: no validation sample
    [50.0, 40.0, 10.0],
    [60.0, 40.0, 0.0],  # class 0 improved
    [60.0, 45.0, 30.0],  # classes 1, 2 improved
    [55.0, 50.0, None],  # class 1 improved; class 2 has no samples: no vote
    [70.0, 50.0, 40.0],  # class 0, and class 2 against its last known accuracy (30)
]


def test_vote_rounds_by_hand():
    counts = [100, 10, 1]
    w = class_weights(counts, "tail").tolist()
    vote = LTVote(CRITERIA, torch.tensor(w, dtype=torch.float64), tau=0.5, seed=5)
    K = len(CRITERIA)
    D = [[0.0] * 3 for _ in range(K)]
    # round 0: uniform weights with one criterion suppressed
    _, expected = hand_alpha(D, w, 0, 0.5, vote.suppressed)
    assert torch.allclose(vote.alpha, torch.tensor(expected, dtype=torch.float64))
    assert math.isclose(expected[(vote.suppressed + 1) % K], 0.25)
    assert vote.observe(ACCURACIES[0]) is None and vote.rounds == 0  # the reference only
    improved_sets = [{0}, {1, 2}, {1}, {0, 2}]
    alphas = [vote.alpha.clone()]
    for r, (accuracy, improved) in enumerate(zip(ACCURACIES[1:], improved_sets), start=1):
        suppressed_before = vote.suppressed
        before = vote.D.clone()
        record = vote.observe(accuracy)
        for k in range(K):
            for c in improved:
                if k != suppressed_before:  # only the criteria active in the round vote
                    D[k][c] += 1
        assert torch.equal(vote.D, torch.tensor(D, dtype=torch.float64)), r
        assert not torch.equal(vote.D, before)  # defect (b): the update really lands in D
        assert record["round"] == r and record["improved_classes"] == len(improved)
        assert record["suppressed_used"] == CRITERIA[suppressed_before]
        assert record["votes"][CRITERIA[suppressed_before]] == 0.0
        base, expected = hand_alpha(D, w, r, 0.5, vote.suppressed)
        assert torch.allclose(vote.base_alpha(), torch.tensor(base, dtype=torch.float64))  # hand softmax, tau 0.5
        assert torch.allclose(vote.alpha, torch.tensor(expected, dtype=torch.float64))
        assert math.isclose(float(vote.alpha.sum()), 1.0) and float(vote.alpha[vote.suppressed]) == 0.0
        alphas.append(vote.alpha.clone())
    assert len({tuple(a.tolist()) for a in alphas}) > 2  # alpha changes across rounds
    assert len(set(vote.base_alpha().tolist())) > 1  # defect (a): the softmax is not over a size-1 dimension


def test_votes_are_weighted_towards_the_tail():
    w = class_weights([100, 10, 1], "tail")
    vote = LTVote(["magnitude", "taylor_first_order"], w, tau=0.5, suppress=False)
    vote.observe([10.0, 10.0, 10.0])
    # round 1: only the head class improves; round 2: only the tail class. Both criteria active both times.
    vote.observe([20.0, 10.0, 10.0])
    head_only = vote.importance().clone()
    vote.observe([20.0, 10.0, 20.0])
    assert torch.allclose(head_only, w[0].repeat(2))
    assert torch.allclose(vote.importance(), (w[0] + w[2]).repeat(2) / 2)
    assert float(vote.importance()[0]) > float(head_only[0])  # a tail vote moves I more than a head vote


def test_single_class_softmax_over_criteria():
    """Defect (a): with one class, ``D @ w`` must still be a K-vector and the softmax run over the criteria."""
    vote = LTVote(CRITERIA, torch.ones(1, dtype=torch.float64), tau=0.5, suppress=False)
    vote.D[1, 0] = 1.0
    vote.rounds = 1
    alpha = vote.base_alpha()
    assert alpha.shape == (5,) and math.isclose(float(alpha.sum()), 1.0)
    e = math.exp(2.0)
    assert math.isclose(float(alpha[1]), e / (e + 4)) and math.isclose(float(alpha[0]), 1 / (e + 4))


def test_redistribution_reaches_every_other_criterion():
    """Defect (c): the suppressed weight goes to *all* other criteria (a boolean mask, not an index tensor that
    would only touch rows 0 and 1)."""
    seen = set()
    for seed in range(40):
        vote = LTVote(CRITERIA, torch.tensor([0.7, 0.3], dtype=torch.float64), seed=seed)
        vote.D = torch.tensor([[3, 0], [1, 2], [0, 0], [2, 2], [0, 3]], dtype=torch.float64)
        vote.rounds = 3
        base = vote.base_alpha()
        alpha, m = vote.draw()
        seen.add(m)
        for j in range(5):
            expected = 0.0 if j == m else float(base[j] + base[m] / 4)
            assert math.isclose(float(alpha[j]), expected, abs_tol=1e-15), (seed, m, j)
    assert seen >= {2, 3, 4}


def test_suppression_is_inverse_probability_and_seeded():
    vote = LTVote(CRITERIA, torch.tensor([1.0], dtype=torch.float64), tau=0.5, seed=0)
    vote.D = torch.tensor([[0.0], [1.0], [2.0], [1.0], [0.0]], dtype=torch.float64)
    vote.rounds = 2
    base = vote.base_alpha()
    draws = torch.tensor([vote.draw()[1] for _ in range(4000)])
    freq = torch.bincount(draws, minlength=5).double() / 4000
    inverse = (1 / base) / (1 / base).sum()
    assert torch.allclose(freq, inverse, atol=0.03)
    assert freq[2] < freq[1] < freq[0]  # the strongest criterion is suppressed least often

    def sequence(seed):
        v = LTVote(CRITERIA, class_weights([100, 10, 1]), seed=seed)
        out = [v.suppressed]
        for accuracy in ACCURACIES * 4:
            v.observe(accuracy)
            out.append(v.suppressed)
        return out

    assert sequence(1) == sequence(1)
    assert sequence(1) != sequence(2)


def test_gain_increment_and_state_round_trip():
    w = class_weights([100, 10, 1])
    vote = LTVote(CRITERIA, w, increment="gain", seed=3)
    vote.observe([10.0, 10.0, 10.0])
    m = vote.suppressed
    vote.observe([30.0, 5.0, 60.0])
    active = torch.ones(5, dtype=torch.float64)
    active[m] = 0
    assert torch.allclose(vote.D, active[:, None] * torch.tensor([0.2, 0.0, 0.5], dtype=torch.float64)[None, :])
    clone = LTVote(CRITERIA, w, increment="gain", seed=99)
    clone.load_state_dict(vote.state_dict())
    for accuracy in ACCURACIES:
        assert vote.observe(accuracy) == clone.observe(accuracy)
    assert torch.equal(vote.D, clone.D) and vote.suppressed == clone.suppressed


# ------------------------------------------------------------------------------------------------- options
def ltap_config(**method) -> dict:
    raw = tiny_config()
    raw["method"] = {"name": "ltap", "start_epoch": 1, "stages": 2, "stage_interval": 1, "target_params": 0.5,
                     "normalize": "l2", **method}  # l2: the five criteria (group-mean, the default, has four)
    return raw


def test_options_resolve_and_validate():
    cfg = config_from_dict(ltap_config())
    assert cfg.method["vote"] == "trial" and cfg.method["second_order"] == "fisher" and cfg.method["tau"] == 0.5
    assert cfg.method["class_weights"] == "tail" and cfg.method["criteria"] == list(CRITERIA)
    raw = ltap_config(vote="public-code")
    del raw["method"]["stages"]
    cfg = config_from_dict(raw)
    assert cfg.method["stages"] == 1 and cfg.method["second_order"] == "public-code"  # one-shot, 1/2 (w.g)^2
    assert config_from_dict(ltap_config(normalize="group-mean")).method["normalize"] == "group-mean"
    cfg = config_from_dict(ltap_config(criteria=["taylor_first_order", "magnitude"]))
    assert cfg.method["criteria"] == ["magnitude", "taylor_first_order"]
    for bad, match in (({"criteria": ["l1"]}, "criteria"), ({"criteria": []}, "criteria"), ({"vote": "x"}, "vote"),
                       ({"tau": 0.0}, "tau"), ({"class_weights": "sqrt"}, "class_weights"),
                       ({"normalize": "none"}, "normalize"), ({"score_window": 2}, "score_window"),
                       ({"vote": "public-code", "criteria": ["magnitude"]}, "criteria"),
                       ({"stages": 4}, "last pruning stage")):
        with pytest.raises(ConfigError, match=match):
            config_from_dict(ltap_config(**bad))
    # LTAP's default when no target is given: 25% of the dense MACs (the paper's F), not the baselines' 30% params
    raw = ltap_config()
    del raw["method"]["target_params"]
    method = config_from_dict(raw).method
    assert method["target_params"] is None and method["target_macs"] == 0.25


def test_paper_defaults():
    from tailwise.methods.ltap import LTAPOptions

    o = LTAPOptions()
    assert (o.start_epoch, o.stage_interval, o.tau) == (100, 10, 0.5)
    assert (o.vote, o.class_weights, o.zeroing, o.normalize) == ("trial", "tail", "hard", "group-mean")
    assert (o.target_macs, o.target_params, o.round_to) == (0.25, None, 8)
    cfg = load_config("cifar100_lt_ir100_resnet32_bs_ltap", [])
    m = cfg.method
    assert (m["name"], m["start_epoch"], m["stages"], m["target_macs"]) == ("ltap", 100, 5, 0.25)
    assert (m["normalize"], m["round_to"], m.get("target_params")) == ("group-mean", 8, None)
    assert cfg.train.epochs == 200


@pytest.mark.parametrize("name", [n for n in list_recipes() if "ltap" in n])
def test_ltap_recipes_match_their_baselines(name):
    cfg = load_config(name, [])
    baseline = name.replace("_ltap_uniform_short", "_magnitude_short").replace("_ltap_short", "_magnitude_short")
    base = load_config(baseline.replace("_ltap", ""), [])
    assert cfg.method["name"] == "ltap"
    assert cfg.data == base.data and cfg.model == base.model and cfg.train == base.train and cfg.loss == base.loss
    if name.endswith("_short"):
        for key in ("target_macs", "start_epoch", "stages", "stage_interval", "zeroing"):
            assert cfg.method[key] == base.method[key]
        assert cfg.method["vote"] == ("uniform" if "uniform" in name else "trial")
    assert len([n for n in list_recipes() if "ltap" in n]) == 14  # 2 datasets x 2 IRs x 3 losses + 2 short


# ---------------------------------------------------------------------------------------------- end to end
def make(tmp_path, name="run", drop=(), **method) -> Trainer:
    raw = ltap_config(**method)
    for key in drop:  # leave a key to its default
        del raw["method"][key]
    return trainer_for(raw, tmp_path / name)


@pytest.fixture(scope="module")
def adaptive_run(tmp_path_factory):
    """``vote: paper`` (the literal reading of eq. 6, formerly ``adaptive``)."""
    trainer = make(tmp_path_factory.mktemp("ltap"), vote="paper")
    return trainer, trainer.fit()


def test_end_to_end_reaches_target_and_logs_alpha(adaptive_run):
    trainer, result = adaptive_run
    cost = result["cost"]
    assert cost["params"] <= 0.5 * cost["params_dense"] and cost["params"] > 0.4 * cost["params_dense"]
    on_disk = [json.loads(line) for line in (trainer.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in on_disk] == [0, 1, 2]
    for r in on_disk:
        assert set(r["ltap_alpha"]) == set(CRITERIA) and math.isclose(sum(r["ltap_alpha"].values()), 1.0, abs_tol=1e-5)
        assert r["ltap_alpha"][r["ltap_suppressed"]] == 0.0
        assert {"active_params", "active_macs", "live_channels"} <= set(r)
    assert on_disk[0]["ltap_vote"] == {"round": 0, "reference": True}
    assert on_disk[1]["ltap_vote"]["round"] == 1 and on_disk[2]["ltap_vote"]["round"] == 2
    stages = [r["pruning_stage"] for r in on_disk if "pruning_stage" in r]
    assert [s["stage"] for s in stages] == [1, 2]
    assert stages[1]["alpha"] == on_disk[1]["ltap_vote"]["alpha"]  # stage 2 used the weights round 1 produced
    for s in stages:  # per criterion: the share of the removed channels it alone would have removed
        assert set(s["agreement"]) == set(CRITERIA) and all(0.0 <= v <= 1.0 for v in s["agreement"].values())
    assert on_disk[-1]["active_params"] == cost["params"]  # the compressed model is the masked one
    method = result["method"]
    assert method["name"] == "ltap" and method["vote"] == "paper" and method["second_order"] == "fisher"
    ltap = method["ltap"]
    assert set(ltap["alpha_final"]) == set(CRITERIA) and ltap["vote_matrix"]["rounds"] == 2
    assert set(ltap["vote_matrix"]["votes_total"]) == set(CRITERIA) and len(ltap["rounds"]) == 2
    model = load_model(trainer.out)
    assert sum(p.numel() for p in model.parameters()) == cost["params"]
    saved = json.loads((trainer.out / "result.json").read_text())
    assert saved["method"]["ltap"]["alpha_final"] == ltap["alpha_final"]


@pytest.mark.parametrize("vote", ["uniform", "public-code"])
def test_ablations_run(tmp_path, vote):
    trainer = make(tmp_path, vote=vote, drop=("stages",) if vote == "public-code" else ())
    result = trainer.fit()
    records = trainer.metrics.records()
    assert result["cost"]["params"] <= 0.5 * result["cost"]["params_dense"]
    assert all(r["ltap_suppressed"] is None and "ltap_vote" not in r for r in records)
    history = result["method"]["history"]
    if vote == "uniform":
        assert len(history) == 2 and all(v == 0.2 for v in records[0]["ltap_alpha"].values())
    else:
        assert len(history) == 1 and history[0]["epoch"] == 0  # one-shot
        assert result["method"]["stages"] == 1 and result["method"]["second_order"] == "public-code"
        total = sum(PUBLIC_CODE_WEIGHTS.values())
        assert records[0]["ltap_alpha"] == {k: round(v / total, 6) for k, v in PUBLIC_CODE_WEIGHTS.items()}


def test_criteria_subset_without_gradients(tmp_path):
    trainer = make(tmp_path, criteria=["magnitude", "avg_magnitude"])
    assert not trainer.method.pruner.wants_gradients
    result = trainer.fit()
    assert set(result["method"]["ltap"]["alpha_final"]) == {"magnitude", "avg_magnitude"}
    assert result["cost"]["params"] <= 0.5 * result["cost"]["params_dense"]


def test_vote_cadence_and_scoring_window(tmp_path):
    """Rounds close at the stages (and once more ``stage_interval`` later) by default, every epoch of the pruning
    phase with ``vote_every: epoch``; gradient criteria accumulate only in the ``score_window`` epochs."""
    def built(name, epochs, **method):
        raw = ltap_config(**method)
        raw["train"]["epochs"] = epochs
        cfg = config_from_dict(raw)
        prepare_run_dir(cfg, tmp_path / name)
        return Trainer(cfg, tmp_path / name, log=lambda msg: None).method

    stage = built("a", 5, start_epoch=1, stage_interval=2, vote="paper")
    assert stage.stage_epochs == [1, 3] and stage.vote_epochs == [1, 3, 5]
    assert [e for e in range(5) if stage.in_scoring_window(e)] == [0, 2]
    every = built("b", 5, start_epoch=1, stage_interval=2, vote="paper", vote_every="epoch")
    assert every.vote_epochs == [1, 2, 3, 4, 5]
    wide = built("c", 6, start_epoch=2, stage_interval=3, score_window=2)
    assert wide.stage_epochs == [2, 5] and [e for e in range(6) if wide.in_scoring_window(e)] == [0, 1, 3, 4]


# ---------------------------------------------------------------------------------------------- trial vote
def test_trial_credit_by_hand():
    """Each criterion is credited per class against the mean over criteria (indicator: +1; gain: margin / 100);
    every criterion votes, whichever was suppressed in the previous round; classes without samples do not."""
    w = class_weights([100, 10, 1, 1, 1])
    names = ["magnitude", "cosine_similarity", "taylor_first_order"]
    accuracy = [[50.0, 40.0, 90.0, 10.0, None],  # class means: 40, 40, 30, 40, nan
                [30.0, 40.0, 0.0, 60.0, None],
                [40.0, 40.0, 0.0, 50.0, None]]
    vote = LTVote(names, w, tau=0.5, seed=1)
    record = vote.observe_trials(accuracy)
    expected = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 0]], dtype=torch.float64)
    assert torch.equal(vote.D, expected) and vote.rounds == 1  # every row credited: the suppressed one too
    assert record["votes"] == {"magnitude": 2.0, "cosine_similarity": 1.0, "taylor_first_order": 1.0}
    assert math.isclose(record["weighted_votes"]["magnitude"], float(w[0] + w[2]))
    base = torch.softmax(torch.tensor([float(w[0] + w[2]), float(w[3]), float(w[3])], dtype=torch.float64) / 0.5, 0)
    assert torch.allclose(torch.tensor(list(record["alpha_base"].values()), dtype=torch.float64), base)
    assert record["alpha"][record["suppressed"]] == 0.0 and math.isclose(sum(record["alpha"].values()), 1.0)
    gain = LTVote(names, w, increment="gain", suppress=False)
    gain.observe_trials(accuracy)
    assert torch.allclose(gain.D, torch.tensor([[0.1, 0, 0.6, 0, 0], [0, 0, 0, 0.2, 0], [0, 0, 0, 0.1, 0]],
                                               dtype=torch.float64))

class Wide(nn.Module):
    """conv (2->8, 1x1) -> BN -> ReLU -> conv (8->4) -> BN -> ReLU -> mean -> fc (4->3)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


def planted(vote: str):
    """LTAP (magnitude vs first-order Taylor) on a model whose conv1 channel 0 the rare class needs: it has the
    largest weights (magnitude keeps it) and no gradient (Taylor ranks it last). The evaluator: head and medium
    classes at 80% whatever is pruned, the rare class at 90% while channel 0 is live and 0% once it is zeroed."""
    torch.manual_seed(0)
    model = Wide()
    with torch.no_grad():
        model.conv1.weight[0] *= 20
        model.bn1.weight[0] = 5.0
    from tailwise.methods.ltap import LTAP

    ltap = LTAP(model, torch.randn(1, 2, 4, 4), [500, 50, 5], criteria=["magnitude", "taylor_first_order"],
                vote=vote, target_sparsity=0.5, stages=4, suppression="none", round_to=1, seed=0)
    evaluations = []

    def evaluate():
        alive = bool(model.conv1.weight[0].abs().sum() > 0)
        evaluations.append(alive)
        return [80.0, 80.0, 90.0 if alive else 0.0]

    def observe():
        for p in model.parameters():
            p.grad = p.detach().clone()
        model.conv1.weight.grad[0] = 0
        model.bn1.weight.grad[0] = model.bn1.bias.grad[0] = 0
        model.conv2.weight.grad[:, 0] = 0
        ltap.observe()

    return ltap, model, evaluate, observe, evaluations


CALIBRATION = [torch.randn(6, 2, 4, 4, generator=torch.Generator().manual_seed(5))]


def test_planted_trial_vote_favours_the_criterion_that_protects_the_rare_class():
    ltap, model, evaluate, observe, evaluations = planted("trial")
    records = []
    for _ in range(4):
        observe()
        ltap.step(evaluate, calibration=CALIBRATION)
        records.append(ltap.round_record)
    first = records[0]
    assert first["trials"]["magnitude"]["per_class"][2] == 90.0 and first["trials"]["taylor_first_order"]["per_class"][2] == 0.0
    assert first["votes"] == {"magnitude": 1.0, "taylor_first_order": 0.0}
    for r in records:  # the stage prunes with the alpha its own vote produced, and magnitude leads it
        assert r["alpha"]["magnitude"] > r["alpha"]["taylor_first_order"]
    assert bool(model.conv1.weight[0].abs().sum() > 0)  # the mix kept the rare class's channel
    assert ltap.masks.keep[0][0] and int((~ltap.masks.keep[0]).sum()) > 0
    assert float(ltap.vote.D[0].sum()) == 4.0 and float(ltap.vote.D[1].sum()) == 0.0
    assert max(ltap.alpha(), key=ltap.alpha().get) == "magnitude"
    assert ltap.history[-1]["alpha"] == records[-1]["alpha"]
    assert records[-1]["mixed"]["per_class"] == [80.0, 80.0, 90.0]  # the mixed mask right after pruning
    assert len(evaluations) == 4 * 3  # two trials and the mixed mask per stage


def test_planted_paper_vote_gives_every_criterion_equal_votes():
    """The literal eq. 6 on the same setup: both criteria get the same votes whatever their masks do."""
    ltap, model, evaluate, observe, _ = planted("paper")
    for _ in range(4):
        observe()
        ltap.step(evaluate)
        if ltap.round_record is not None:
            votes = set(ltap.round_record["votes"].values())
            assert len(votes) == 1
    assert torch.equal(ltap.vote.D[0], ltap.vote.D[1])


def test_adaptive_still_loads_as_paper():
    with pytest.warns(FutureWarning, match="'adaptive' is now called 'paper'"):
        cfg = config_from_dict(ltap_config(vote="adaptive"))
    assert cfg.method["vote"] == "paper"


def small_loader(n=24, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, 16, 16, generator=g), torch.arange(n) % classes
    return [(x[:12], y[:12]), (x[12:], y[12:])]


def test_trials_leave_model_masks_bn_statistics_and_rng_untouched():
    from tailwise.methods.ltap import LTAP
    from tailwise.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet20", 4)
    loader = small_loader()
    ltap = LTAP(model, loader[0][0][:1], [40, 20, 8, 4], target_params=0.5, stages=2, seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for x, y in loader:  # training: BN statistics move, momentum exists, the window has gradients
        opt.zero_grad()
        ltap.observe(torch.nn.functional.cross_entropy(model(x), y))
        opt.step()
        ltap.enforce(opt)
    ltap.step(loader)  # stage 1 pruned: the next trials start from a masked model
    for x, y in loader:
        opt.zero_grad()
        ltap.observe(torch.nn.functional.cross_entropy(model(x), y))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    keep = [k.clone() for k in ltap.masks.keep]
    momentum = {p: opt.state[p]["momentum_buffer"].clone() for p in model.parameters()}
    rng = torch.get_rng_state()
    zeroed = []
    evaluate = ltap.evaluator(loader)

    def watching():
        zeroed.append(sum(int((m.weight.abs().sum((1, 2, 3)) == 0).sum()) for m in model.modules()
                          if isinstance(m, nn.Conv2d)))
        return evaluate()

    model.train()
    ltap.scores(watching)  # the four trials (group-mean: four distinct criteria) and the vote, no pruning
    assert len(zeroed) == len(ltap.options.criteria) == 4 and min(zeroed) > sum(int((~k).sum()) for k in keep)  # the trials did zero channels
    assert model.training
    for k, v in model.state_dict().items():  # weights and BatchNorm running statistics, bit for bit
        assert torch.equal(v, state[k]), k
    assert all(torch.equal(a, b) for a, b in zip(ltap.masks.keep, keep))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], m) for p, m in momentum.items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert ltap.vote.rounds == 2


def trained_resnet(seed=0, criteria=None, **options):
    """A ResNet-20 after one pass over ``small_loader`` (statistics moved, a scoring window of gradients)."""
    from tailwise.methods.ltap import LTAP
    from tailwise.models import build_model

    torch.manual_seed(seed)
    model = build_model("resnet20", 4)
    loader = small_loader()
    ltap = LTAP(model, loader[0][0][:1], [40, 20, 8, 4], target_params=0.5, stages=2, seed=3, criteria=criteria,
                **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for x, y in loader:
        opt.zero_grad()
        ltap.observe(torch.nn.functional.cross_entropy(model(x), y))
        opt.step()
        ltap.enforce(opt)
    return ltap, model, loader


def test_trial_statistics_are_recomputed_on_the_calibration_batches_then_restored():
    """One criterion, so the vote cannot change what is pruned: the stage with the statistics pass leaves the
    model, masks and RNG exactly as the stage without it; inside the mixed mask's trial the stem BatchNorm holds
    the hand-computed average of the calibration batches' per-channel mean and unbiased variance (the first two
    batches: trial_bn_batches 2), not the running statistics."""
    g = torch.Generator().manual_seed(11)
    calibration = [(torch.randn(8, 3, 16, 16, generator=g), None) for _ in range(3)]
    ends = {}
    for n in (2, 0):
        ltap, model, loader = trained_resnet(criteria=["magnitude"], trial_bn_batches=n)
        evaluate, seen = ltap.evaluator(loader), []

        def watching():
            seen.append((model.bn1.running_mean.clone(), model.bn1.running_var.clone(), model.conv1.weight.clone()))
            return evaluate()

        running = (model.bn1.running_mean.clone(), model.bn1.running_var.clone())
        rng = torch.get_rng_state()
        ltap.step(watching, calibration=calibration)
        assert torch.equal(torch.get_rng_state(), rng)
        assert ltap.round_record["trial_bn_batches"] == n
        ends[n] = ({k: v.clone() for k, v in model.state_dict().items()}, [k.clone() for k in ltap.masks.keep])
        mean, var, conv1 = seen[-1]  # the mixed mask: the model as pruned
        if n == 0:
            assert torch.equal(mean, running[0]) and torch.equal(var, running[1])
            continue
        with torch.no_grad():
            stem = [torch.nn.functional.conv2d(x, conv1, padding=1) for x, _ in calibration[:2]]
        expected_mean = sum(h.mean((0, 2, 3)) for h in stem) / 2
        expected_var = sum(h.var((0, 2, 3), unbiased=True) for h in stem) / 2
        assert torch.allclose(mean, expected_mean, atol=1e-5) and torch.allclose(var, expected_var, atol=1e-5)
        assert not torch.allclose(mean, running[0])
    (state2, keep2), (state0, keep0) = ends[2], ends[0]
    assert all(torch.equal(a, b) for a, b in zip(keep2, keep0)) and int(sum((~k).sum() for k in keep2)) > 0
    for k, v in state2.items():
        assert torch.equal(v, state0[k]), k


def test_trial_statistics_need_calibration_batches():
    ltap, model, loader = trained_resnet()
    evaluate = ltap.evaluator(loader)
    with pytest.raises(ValueError, match="calibration"):
        ltap.step(evaluate)  # a function gives no inputs to recompute the statistics on
    ltap.options.trial_bn_batches = 0
    ltap.step(evaluate)
    assert ltap.round_record["trial_bn_batches"] == 0


def test_standalone_ltap_compresses_to_the_masked_function():
    from tailwise.methods.ltap import LTAP
    from tailwise.methods.batchnorm import recompute_batchnorm
    from tailwise.methods.ltap.trial import loader_accuracy
    from tailwise.models import build_model

    torch.manual_seed(1)
    model = build_model("resnet20", 4)
    loader = small_loader(seed=1)
    ltap = LTAP(model, loader[0][0][:1], [40, 20, 8, 4], target_macs=0.4, stages=2)
    for _ in range(2):
        for x, y in loader:
            ltap.observe(torch.nn.functional.cross_entropy(model(x), y))
        event = ltap.step(loader)
        assert set(event["alpha"]) == set(CRITERIA) - {"avg_magnitude"} and event["removed_channels"] > 0
        mixed = ltap.round_record["mixed"]["per_class"]
        pruned = copy.deepcopy(model)  # the model right after pruning, its statistics recomputed on the loader's x
        recompute_batchnorm(pruned, (x for x, _ in loader))
        assert mixed == [round(float(a), 4) for a in loader_accuracy(pruned, loader, 4)()]
    with pytest.raises(RuntimeError, match="stages are done"):
        ltap.step(loader)
    small = ltap.compress()
    assert ltap.cost()["active_macs"] <= 0.4 * ltap.dense["macs"]
    assert sum(p.numel() for p in small.parameters()) == ltap.cost()["active_params"]
    model.eval()
    small.eval()
    x = loader[0][0]
    assert torch.allclose(model(x), small(x), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def trial_run(tmp_path_factory):
    """The defaults but the schedule and budget: trial vote, group-mean, the four distinct criteria."""
    trainer = make(tmp_path_factory.mktemp("trial"), drop=("normalize",))
    return trainer, trainer.fit()


def test_trial_run_records_every_stage(trial_run):
    trainer, result = trial_run
    assert result["method"]["vote"] == "trial"
    on_disk = [json.loads(line) for line in (trainer.out / "metrics.jsonl").read_text().splitlines()]
    stages = [r for r in on_disk if "pruning_stage" in r]
    assert [r["epoch"] for r in stages] == [0, 1] and all("ltap_vote" not in r for r in on_disk[2:])
    for r in stages:
        v = r["ltap_vote"]
        assert set(v["trials"]) == set(v["votes"]) == set(CRITERIA) - {"avg_magnitude"}
        for trial in [*v["trials"].values(), v["mixed"]]:
            assert len(trial["per_class"]) == 4 and set(trial["groups"]) == {"many", "medium", "few"}
        assert math.isclose(sum(v["alpha_base"].values()), 1.0) and v["alpha"][v["suppressed"]] == 0.0
        assert r["pruning_stage"]["alpha"] == v["alpha"] == {k: pytest.approx(a, abs=1e-6) for k, a in r["ltap_alpha"].items()}
        assert v["trial_bn_batches"] == 20  # recomputed on training batches (the default)
    assert result["method"]["ltap"]["vote_matrix"]["rounds"] == 2
    assert "recomputed on 20 calibration batches" in result["method"]["ltap"]["choices"]["vote"]
    assert len(result["method"]["overhead"]["trial_s_per_stage"]) == 2  # wall clock, kept out of metrics.jsonl
    assert result["cost"]["params"] <= 0.5 * result["cost"]["params_dense"]


def test_group_mean_makes_avg_magnitude_a_copy_of_magnitude():
    """Why the default criteria drop avg_magnitude under group-mean: with some channels pruned, the two normalised
    vectors are equal under group-mean and differ under the global l2 normalisation."""
    from tailwise.methods.ltap import LTAPOptions
    from tailwise.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet20", 4)
    groups = channel_groups(model, torch.randn(1, 3, 16, 16))
    layout = ChannelLayout(model, groups)
    keep = [torch.rand(g.size) > 0.3 for g in groups]
    for k in keep:
        k[0] = True
    raw = CriteriaAccumulator(layout, ["magnitude", "avg_magnitude"]).compute(model, keep)
    live, segments = torch.cat(keep), [(o, g.size) for o, g in zip(layout.offsets, groups)]
    same = [normalise(raw[k], live, "group-mean", segments) for k in ("magnitude", "avg_magnitude")]
    assert torch.allclose(same[0], same[1], rtol=1e-9)
    differ = [normalise(raw[k], live, "l2") for k in ("magnitude", "avg_magnitude")]
    assert not torch.allclose(differ[0] / differ[0].max(), differ[1] / differ[1].max(), rtol=1e-3)
    assert LTAPOptions(normalize="group-mean").criteria == [c for c in CRITERIA if c != "avg_magnitude"]
    assert LTAPOptions(normalize="l2").criteria == list(CRITERIA)
    with pytest.warns(UserWarning, match="counts one criterion twice"):
        assert LTAPOptions(normalize="group-mean", criteria=list(CRITERIA)).criteria == list(CRITERIA)
