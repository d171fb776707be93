"""Neuron growth and removal (``method: plasticity``; the standalone ``Plasticity`` and its trainer adapter):
function-preserving duplication and exactly what a diverging copy changes, fresh BN affine and reset momentum of
a copy, exemption of the last event's pairs, the split-score rescaling, class-reweighted ranking, the twin
diagnostic, the default event schedule, an end-to-end run and exact resume across a surgery."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from torch import nn

from tailwise.config import config_from_dict
from tailwise.data.dataset import Split
from tailwise.methods.context import MethodContext
from tailwise.engine.dist import Dist
from tailwise.engine.rundir import prepare_run_dir
from tailwise.engine.trainer import Trainer
from tailwise.methods import build_method, validate_method_config
from tailwise.methods.plasticity import Plasticity, class_weights
from tailwise.methods.plasticity.options import base_lr_end
from tailwise.methods.plasticity.surgery import is_incoming
from tailwise.methods.plasticity.twins import twin_layer, twin_report

from test_engine import tiny_config, trainer_for


def plasticity_config(**method) -> dict:
    cfg = tiny_config()  # 3 epochs, LR milestone [2]
    cfg["method"] = {"name": "plasticity", "every_epochs": 1, "last_event_epoch": 2, **method}
    return cfg


def make(tmp_path, name="run", **method) -> Trainer:
    return trainer_for(plasticity_config(**method), tmp_path / name)


def exact_copy() -> dict:
    """Options under which a duplication copies its source exactly (the paper's function-preserving copy)."""
    return {"copy_bn": "perturb", "bn_noise": 0.0}


def ascending(growth: Plasticity) -> list[torch.Tensor]:
    return [torch.arange(g.size, dtype=torch.float64) for g in growth.groups]


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def kill_lowest(growth: Plasticity, scores: list[torch.Tensor]) -> None:
    """Zero the outgoing weights of the channels each group will remove, so removal is function-preserving."""
    with torch.no_grad():
        for gi, (g, s) in enumerate(zip(growth.groups, scores)):
            slots, _ = growth.select(gi, s)
            for sl in g.slices:
                if not is_incoming(g, sl):
                    tensor = getattr(growth.model.get_submodule(sl.module_name), sl.tensor_name)
                    tensor.index_fill_(sl.dim, sl.index[slots], 0.0)


def removal_without_effect(tmp_path, seed: int, **method):
    """A trainer in eval mode with random BN, random scores and inputs, and zero outgoing weights on the channels
    the next event removes: (trainer, growth, scores, inputs)."""
    trainer = make(tmp_path, **method)
    growth = trainer.method.growth
    randomize_bn(growth.model)
    g = torch.Generator().manual_seed(seed)
    scores = [torch.rand(grp.size, generator=g, dtype=torch.float64) for grp in growth.groups]
    x = torch.randn(6, 3, 16, 16, generator=g)
    kill_lowest(growth, scores)
    growth.model.eval()
    return trainer, growth, scores, x


def copy_from_sources(growth: Plasticity, modules: str) -> None:
    """Give every copy its source's BN affine (``modules="norms"``) or incoming rows (``"producers"``) back."""
    with torch.no_grad():
        for g, (slots, sources) in zip(growth.groups, growth.pairs):
            for sl in g.slices:
                if sl.module_name in getattr(g, modules) and sl.dim == 0:
                    t = getattr(growth.model.get_submodule(sl.module_name), sl.tensor_name)
                    t.index_copy_(0, sl.index[slots], t.index_select(0, sl.index[sources]))


@pytest.mark.parametrize("scope", ["internal", "residual"])
def test_an_exact_copy_preserves_the_function(tmp_path, scope):
    # duplication into a slot whose outgoing weights are zero: exactly function-preserving, weight scaling s = 1
    trainer, growth, scores, x = removal_without_effect(tmp_path, 1, scope=scope, **exact_copy())
    with torch.no_grad():
        before = growth.model(x)
    shapes = {k: v.shape for k, v in growth.model.state_dict().items()}
    event = growth.event(trainer.ctx.optimizer, scores)
    with torch.no_grad():
        after = growth.model(x)
    assert event["duplicated"] == event["removed"] > 0
    assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()
    assert {k: v.shape for k, v in growth.model.state_dict().items()} == shapes
    for layer in event["layers"].values():
        assert all(abs(s - 1.0) < 1e-9 for s in layer["scale"].values())
    # the copy's incoming weights and BN entries (running stats included) are its source's
    g0 = growth.groups[0]
    slots, sources = growth.pairs[0]
    conv = growth.model.get_submodule(g0.producers[0])
    assert torch.equal(conv.weight[slots], conv.weight[sources])
    bn = growth.model.get_submodule(g0.norms[0])
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(bn, name)[slots], getattr(bn, name)[sources]), name


@pytest.mark.parametrize("weight_noise", [0.0, 0.1])
def test_an_event_changes_the_output_only_through_the_copies_bn_and_noise(tmp_path, weight_noise):
    """Default copies (fresh BN gamma/beta, optional incoming-weight noise): in eval mode, giving every copy its
    source's gamma/beta (and, with noise, its incoming rows) back restores the pre-event output exactly."""
    trainer, growth, scores, x = removal_without_effect(tmp_path, 2, weight_noise=weight_noise)
    with torch.no_grad():
        before = growth.model(x)
        growth.event(trainer.ctx.optimizer, scores)
        changed = (growth.model(x) - before).abs().max()
        copy_from_sources(growth, "norms")
        bn_restored = (growth.model(x) - before).abs().max()
        copy_from_sources(growth, "producers")
        restored = (growth.model(x) - before).abs().max()
    assert changed > 1e-3  # the copies compute something else
    assert restored < 1e-5  # ... through their own gamma, beta and incoming weights alone
    assert (bn_restored < 1e-5) == (weight_noise == 0)


def test_a_copy_gets_fresh_bn_affine_drawn_from_its_layer(tmp_path):
    trainer = make(tmp_path)  # copy_bn: layer
    growth = trainer.method.growth
    randomize_bn(growth.model)
    scores = ascending(growth)
    bns = {g.norms[0]: growth.model.get_submodule(g.norms[0]) for g in growth.groups}
    before = {name: {k: v.detach().clone() for k, v in bn.state_dict().items()} for name, bn in bns.items()}
    growth.event(trainer.ctx.optimizer, scores)
    z = {"weight": [], "bias": []}
    for g, (slots, sources) in zip(growth.groups, growth.pairs):
        bn = growth.model.get_submodule(g.norms[0])
        old = before[g.norms[0]]
        kept = torch.ones(g.size, dtype=torch.bool)
        kept[slots] = False
        for name in ("weight", "bias"):
            copy, source = getattr(bn, name)[slots].detach().double(), old[name][sources].double()
            assert (copy != source).all(), name  # drawn, not the source's
            assert torch.equal(getattr(bn, name)[sources], old[name][sources])  # the source keeps its own
            layer = old[name][kept].double()
            z[name].append((copy - layer.mean()) / layer.std(unbiased=False))
        for name in ("running_mean", "running_var"):  # its input statistics are its source's
            assert torch.equal(getattr(bn, name)[slots], old[name][sources])
    for name, values in z.items():  # standardised by the layer's own mean and spread: N(0, 1) draws
        values = torch.cat(values)
        assert len(values) == 96  # floor(0.3 x width) over ResNet-20's nine block-internal layers
        assert abs(float(values.mean())) < 0.3 and 0.75 < float(values.std()) < 1.25, name


@pytest.mark.parametrize("source_momentum", ["keep", "halve"])
def test_a_copys_momentum_is_reset(tmp_path, source_momentum):
    trainer = make(tmp_path, source_momentum=source_momentum)
    ctx, growth = trainer.ctx, trainer.method.growth
    for i, (x, y) in enumerate(trainer.train_loader):
        ctx.optimizer.zero_grad()
        trainer.loss_fn(ctx.model(x), y).backward()
        ctx.optimizer.step()
        if i == 2:
            break
    g0 = growth.groups[0]
    conv, bn = ctx.model.get_submodule(g0.producers[0]), ctx.model.get_submodule(g0.norms[0])
    consumer = ctx.model.get_submodule(g0.consumers[0])
    momentum = lambda p: ctx.optimizer.state[p]["momentum_buffer"].clone()  # noqa: E731
    tensors = {"conv": conv.weight, "gamma": bn.weight, "beta": bn.bias, "out": consumer.weight}
    before = {k: momentum(t) for k, t in tensors.items()}
    other_before = momentum(ctx.model.fc.weight)
    optimizer = ctx.optimizer
    event = growth.event(ctx.optimizer, ascending(growth))
    slots, sources = growth.pairs[0]
    assert ctx.optimizer is optimizer  # same parameters, state edited in place
    after = {k: momentum(t) for k, t in tensors.items()}
    factor = 1.0 if source_momentum == "keep" else 0.5
    kept = torch.ones(g0.size, dtype=torch.bool)
    kept[slots] = False
    kept[sources] = False
    for name in ("conv", "gamma", "beta"):
        assert not after[name][slots].any(), name  # the copy starts from rest
        assert torch.equal(after[name][sources], before[name][sources] * factor), name
        assert torch.equal(after[name][kept], before[name][kept]), name  # survivors keep theirs
    s = event["layers"][g0.name]["scale"][f"{g0.consumers[0]}.weight"]
    assert not after["out"][:, slots].any()
    assert torch.allclose(after["out"][:, sources], before["out"][:, sources] * factor * s)
    assert torch.allclose(after["out"][:, kept], before["out"][:, kept] * s)
    assert torch.equal(momentum(ctx.model.fc.weight), other_before)


def test_weight_scaling_formula(tmp_path):
    trainer = make(tmp_path)
    growth = trainer.method.growth
    g0 = growth.groups[0]
    consumer = next(s for s in g0.slices if s.module_name in g0.consumers)
    w = getattr(growth.model.get_submodule(consumer.module_name), consumer.tensor_name).detach().clone()
    scores = ascending(growth)
    slots, sources = growth.select(0, scores[0])
    energy = w.double().pow(2).sum(dim=(0, 2, 3))
    expected = float((energy.sum() / energy[~torch.isin(torch.arange(g0.size), slots)].sum()).sqrt())
    event = growth.event(trainer.ctx.optimizer, scores)
    assert event["layers"][g0.name]["scale"][f"{consumer.module_name}.weight"] == pytest.approx(expected)
    after = getattr(growth.model.get_submodule(consumer.module_name), consumer.tensor_name)
    assert torch.allclose(after[:, sources], w[:, sources] * 0.5 * expected, atol=1e-6)
    assert torch.allclose(after[:, slots], w[:, sources] * 0.5 * expected, atol=1e-6)
    # the effective (merged) outgoing weights keep the consumer's Frobenius norm
    merged = after.clone()
    merged[:, sources] += after[:, slots]
    merged[:, slots] = 0
    assert torch.allclose(merged.norm(), w.norm(), rtol=1e-5)


def second_event_scores(growth: Plasticity, members: list[torch.Tensor]) -> list[torch.Tensor]:
    """Scores for the next event in which ``members`` (per group) score lowest of all."""
    out = []
    for g, m in zip(growth.groups, members):
        s = torch.arange(g.size, dtype=torch.float64) + 100
        s[m] = torch.arange(len(m), dtype=torch.float64)
        out.append(s)
    return out


def test_pairs_are_exempt_from_removal(tmp_path):
    trainer = make(tmp_path)  # exempt: pairs
    growth = trainer.method.growth
    growth.event(trainer.ctx.optimizer, ascending(growth))
    pairs = [torch.cat(p) for p in growth.pairs]
    scores = second_event_scores(growth, pairs)  # both members of every pair score lowest
    growth.event(trainer.ctx.optimizer, scores)
    for gi, (g, (slots, _)) in enumerate(zip(growth.groups, growth.pairs)):
        k = int(0.3 * g.size)
        rest = [c for c in range(g.size) if c not in set(pairs[gi].tolist())]
        assert slots.tolist() == rest[:k]  # the k lowest-scoring channels outside the pairs, none of the pairs
    # exempting the copies alone, their sources (the next-lowest) would go
    growth.options.exempt = "copies"
    growth.pairs = [(p[:len(p) // 2], p[len(p) // 2:]) for p in pairs]
    slots, _ = growth.select(0, scores[0])
    assert set(slots.tolist()) == set(pairs[0][len(pairs[0]) // 2:].tolist())


def test_copies_exempt_and_none(tmp_path):
    trainer = make(tmp_path, exempt="copies", **exact_copy())
    growth = trainer.method.growth
    growth.event(trainer.ctx.optimizer, ascending(growth))
    first = [slots.clone() for slots, _ in growth.pairs]
    second = second_event_scores(growth, first)  # the fresh copies score lowest: they survive, the next go
    growth.event(trainer.ctx.optimizer, second)
    for gi, (slots, _) in enumerate(growth.pairs):
        assert not set(slots.tolist()) & set(first[gi].tolist())
        assert len(slots) == len(first[gi]) == int(0.3 * growth.groups[gi].size)
    growth.options.exempt = "none"  # without exemption the fresh copies would be removed
    growth.pairs = [(f, f) for f in first]
    assert set(growth.select(0, second[0])[0].tolist()) == set(first[0].tolist())


@pytest.mark.parametrize("pair_scores", ["lineage", "rescale", "raw"])
def test_pair_scores_undo_the_split(tmp_path, pair_scores):
    trainer = make(tmp_path, pair_scores=pair_scores)
    growth = trainer.method.growth
    growth.event(trainer.ctx.optimizer, ascending(growth))  # group 0 (16 channels): 0-3 become copies of 12-15
    slots, sources = growth.pairs[0]
    assert slots.tolist() == [0, 1, 2, 3] and sorted(sources.tolist()) == [12, 13, 14, 15]
    scores = [torch.arange(g.size, dtype=torch.float64) + 100 for g in growth.groups]
    scores[0][:4] = torch.tensor([50.0, 51, 52, 53])  # the copies, raw (after the split halved their gradient)
    scores[0][12:] = torch.tensor([60.0, 61, 62, 63])  # the sources, raw; the others 104 ... 111
    event = growth.event(trainer.ctx.optimizer, scores)
    # 16 sorted raw scores 50..53, 60..63, 104..111: lower median 63; the members' (8): lower median 53
    assert event["layers"][growth.groups[0].name]["pair_score_ratio"] == pytest.approx(53 / 63)
    removed, duplicated = growth.pairs[0]
    assert removed.tolist() == [4, 5, 6, 7]  # the non-exempt lowest either way
    # doubled, the sources (120..126) outrank every other channel; raw, the channels 8..11 (108..111) win
    assert set(duplicated.tolist()) == ({8, 9, 10, 11} if pair_scores == "raw" else {12, 13, 14, 15})


@pytest.mark.parametrize("pair_scores", ["lineage", "rescale"])
def test_lineage_factors_undo_every_earlier_split(tmp_path, pair_scores):
    """A channel's score is multiplied by 2 per split in its lineage (``lineage``), so the channels split two
    events ago, which ``exempt: pairs`` no longer protects, are not ranked at half their importance; ``rescale``
    doubles only the previous event's pairs. Group 0 has 16 channels, 4 removed per event."""
    trainer = make(tmp_path, pair_scores=pair_scores)
    growth = trainer.method.growth
    opt = trainer.ctx.optimizer
    filler = [torch.arange(g.size, dtype=torch.float64) + 100 for g in growth.groups]
    growth.event(opt, ascending(growth))  # 0-3 become copies of 12-15: factor 2 for all eight
    second = [f.clone() for f in filler]
    second[0] = torch.tensor([100.0, 101, 102, 103, 1, 2, 3, 4, 900, 901, 50, 51, 500, 501, 100, 101], dtype=torch.float64)
    growth.event(opt, second)  # 4-7 (lowest outside the pairs) become copies of 8, 9, 12, 13 (the highest)
    slots, sources = growth.pairs[0]
    assert slots.tolist() == [4, 5, 6, 7] and set(sources.tolist()) == {8, 9, 12, 13}
    expected = {0: 2, 1: 2, 2: 2, 3: 2, 8: 2, 9: 2, 10: 1, 11: 1, 12: 4, 13: 4, 14: 2, 15: 2}
    for slot, source in zip(slots.tolist(), sources.tolist()):
        expected[slot] = expected[source]
    assert growth.split[0].tolist() == [expected[c] for c in range(16)]
    third = [f.clone() for f in filler]
    third[0][[0, 1, 2, 3, 14, 15, 10, 11]] = torch.tensor([50.0, 51, 52, 53, 54, 55, 90, 91], dtype=torch.float64)
    event = growth.event(opt, third)
    layer = event["layers"][growth.groups[0].name]
    # raw, sorted: 50-55, 90, 91, 104-109, 112, 113; lower medians: layer 91, last pairs (4-9, 12, 13) 107,
    # split at the first event and not since (0-3, 14, 15) 52
    assert layer["pair_score_ratio"] == pytest.approx(107 / 91)
    assert layer["split_score_ratio"] == pytest.approx(52 / 91)
    assert layer["split_channels"] == 14
    removed, _ = growth.pairs[0]
    # lineage: 0-3 and 14, 15 rank at 100-110 and the never-split 10, 11 (90, 91) go first; rescale: 0-3 go
    assert removed.tolist() == ([0, 1, 10, 11] if pair_scores == "lineage" else [0, 1, 2, 3])


def test_split_outgoing_ratio_measures_the_factor(tmp_path):
    """Right after an exact split, a source's outgoing norm times its factor 2 is its norm before the split: with
    every outgoing column planted at norm 1 (and no weight scaling), the split channels' ratio is 1."""
    trainer = make(tmp_path, weight_scaling=False, **exact_copy())
    growth = trainer.method.growth
    g = growth.groups[0]
    with torch.no_grad():
        for sl in g.slices:
            if not is_incoming(g, sl):
                w = getattr(growth.model.get_submodule(sl.module_name), sl.tensor_name)
                cols = w.index_select(sl.dim, sl.index).movedim(sl.dim, 0)
                cols = cols / cols.flatten(1).norm(dim=1).view(-1, *[1] * (cols.dim() - 1))
                w.index_copy_(sl.dim, sl.index, cols.movedim(0, sl.dim).contiguous())
    growth.event(trainer.ctx.optimizer, ascending(growth))
    assert growth._outgoing_norms(0)[growth.pairs[0][1]] == pytest.approx(torch.full((4,), 0.5, dtype=torch.float64))
    event = growth.event(trainer.ctx.optimizer, ascending(growth))
    assert event["layers"][g.name]["split_outgoing_ratio"] == pytest.approx(1.0)


def test_twin_diagnostic_counts_planted_twins():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(10, 50, generator=g, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(50, 3, generator=g, dtype=torch.float64))
    def rotate(deg: float) -> torch.Tensor:  # a unit vector at ``deg`` degrees in the plane of basis 0 and 1
        return math.cos(math.radians(deg)) * basis[:, 0] + math.sin(math.radians(deg)) * basis[:, 1]

    v[1] = 3.0 * v[5]  # an exact twin at another scale
    v[2], v[6], v[7] = rotate(0), rotate(7), rotate(14)  # a chain: cos 0.9925 twice, the ends at cos 0.970
    v[3] = basis[:, 2]
    v[8] = 0.98 * basis[:, 2] + math.sqrt(1 - 0.98**2) * basis[:, 0]  # cos 0.98: not a twin
    v[9] = -v[4]  # cos -1: not a twin
    layer = twin_layer(v, 0.99)
    assert layer == {"width": 10, "twins": 5, "effective": 10 - 1 - 2}  # {1, 5} and {2, 6, 7}
    assert twin_layer(v, 0.993)["twins"] == 2  # only the exact pair at a stricter threshold
    assert twin_layer(v, 0.97)["twins"] == 7  # 3 and 8 join


def test_twin_report_after_an_exact_copy_event(tmp_path):
    trainer = make(tmp_path, **exact_copy())
    growth = trainer.method.growth
    report = twin_report(growth.model, growth.groups)
    assert report["twins"] == 0 and report["effective"] == report["width"]  # a fresh network has none
    event = growth.event(trainer.ctx.optimizer, ascending(growth))
    for g in growth.groups:  # each copy and its source: 2k twins, k channels of width lost
        k = int(0.3 * g.size)
        assert event["twins"]["layers"][g.name] == {"width": g.size, "twins": 2 * k, "effective": g.size - k}
    assert event["twins"]["twins"] == 2 * event["duplicated"]
    assert event["twins_before"] == report  # measured before the surgery: the fresh network's none
    again = growth.event(trainer.ctx.optimizer, ascending(growth))  # no training in between: nothing diverged
    assert again["twins_before"] == event["twins"]

class TwoPath(nn.Module):
    """Channel 0 of conv1 sees only input plane 0 (class-0 images), channel 1 only plane 1 (class 1)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(2)
        self.conv2 = nn.Conv2d(2, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv1.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
            self.conv2.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
            self.fc.weight.copy_(torch.eye(2) * 0.1)
            self.fc.bias.zero_()

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def two_path_ctx(model, counts):
    images = torch.zeros(1, 2, 4, 4, dtype=torch.uint8)
    loss_fn = nn.CrossEntropyLoss()
    data = SimpleNamespace(train=Split(images, torch.zeros(1, dtype=torch.long)), class_counts=counts)
    train = SimpleNamespace(epochs=10, schedule="constant", milestones=[], warmup_epochs=0)
    cfg = SimpleNamespace(run=SimpleNamespace(seed=0), train=train)
    return MethodContext(cfg, model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), loss_fn, data,
                         torch.device("cpu"), None, torch.amp.GradScaler("cuda", enabled=False), Dist(),
                         (0.5, 0.5), (0.25, 0.25))


def test_class_reweighting_changes_the_ranking():
    # Symmetric by construction: a class-0 image lights input plane 0 only, a class-1 image plane 1 only, and
    # (BN in eval mode: the identity) each sample's gradient reaches only its class's conv1 channel, with the
    # same magnitude. A batch of 12 head and 4 tail images; class counts 100:10. Through the trainer adapter.
    n0, n1 = 12, 4
    x = torch.zeros(n0 + n1, 2, 4, 4)
    x[:n0, 0] = 1.0
    x[n0:, 1] = 1.0
    y = torch.tensor([0] * n0 + [1] * n1)
    ranking = {}
    for reweight in (False, True):
        model = TwoPath().eval()
        method = build_method(validate_method_config({"name": "plasticity", "every_epochs": 1,
                                                      "reweight": True, "reweight_power": 1.0 if reweight else 0.0}))
        ctx = two_path_ctx(model, [100, 10])
        method.setup(ctx)
        loss, _ = method.training_loss(ctx, x, y)  # epoch 0 ends in an event: a scoring step
        loss.backward()  # the trainer's backward frees the kept graph
        ranking[reweight] = method.growth.window[[g.name for g in method.growth.groups].index("conv1")]
    assert torch.allclose(ranking[False][0] / ranking[False][1], torch.tensor(3.0, dtype=torch.float64))
    assert ranking[False][0] > ranking[False][1]  # unweighted: the head channel dominates (12 vs 4 samples)
    assert ranking[True][1] > ranking[True][0]  # reweighted (w = 2/11, 20/11): the tail channel does
    assert torch.allclose(ranking[True][1] / ranking[True][0], torch.tensor(4 * 20 / (12 * 2), dtype=torch.float64))
    assert torch.allclose(class_weights([100, 10], 1.0), torch.tensor([2 / 11, 20 / 11], dtype=torch.float64))


def test_reweighted_gradient_is_exact():
    """The standalone object's accumulated scores equal |d(1/N sum w_y l_i)/dW| computed directly."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 2, 4, 4), torch.tensor([0, 0, 0, 0, 0, 1, 1, 0])
    model = TwoPath()
    growth = Plasticity(model, [30, 3], x[:1])
    logits = model(x)
    growth.observe(nn.functional.cross_entropy(logits, y), logits, y)
    w = class_weights([30, 3], 1.0).float()
    reference = TwoPath()
    per_sample = nn.functional.cross_entropy(reference(x), y, reduction="none")
    (per_sample * w[y]).mean().backward()
    gi = [g.name for g in growth.groups].index("conv1")
    expected = reference.conv1.weight.grad.abs().flatten(1).sum(1).double()
    assert torch.allclose(growth.window[gi], expected, rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="reweight"):  # the unweighted .grad would silently rank unweighted
        growth.observe()


def test_end_to_end_keeps_widths_and_logs_events_and_twins(tmp_path):
    trainer = make(tmp_path)
    dense = {k: v.shape for k, v in trainer.ctx.model.state_dict().items()}
    result = trainer.fit()
    assert {k: v.shape for k, v in trainer.ctx.model.state_dict().items()} == dense
    assert result["cost"]["params"] == result["cost"]["params_dense"]
    assert result["cost"]["macs"] == result["cost"]["macs_dense"]
    records = trainer.metrics.records()
    assert ["plasticity" in r for r in records] == [True, True, False]  # events after epochs 1 and 2 of 3
    assert ["twins" in r for r in records] == [False, False, True]  # the final diagnostic
    event = records[0]["plasticity"]
    assert event["steps"] == len(trainer.train_loader) == 5
    assert set(event["layers"]) == {g.name for g in trainer.method.growth.groups}
    for layer in event["layers"].values():
        assert layer["duplicated"] == layer["removed"] == int(0.3 * layer["width"])
        assert set(layer["score"]) == {"min", "q25", "median", "q75", "max", "mean"}
    assert set(event["twins"]["layers"]) == set(event["layers"])
    assert event["twins"]["twins"] >= 2 * event["duplicated"]  # right after the event each copy has a twin
    assert event["twins_before"]["twins"] == 0  # a freshly initialised network has none before its first event
    assert set(records[1]["plasticity"]["twins_before"]["layers"]) == set(event["layers"])
    assert all(r["train_acc"] is not None for r in records)
    saved = json.loads((trainer.out / "result.json").read_text())
    assert saved["method"]["name"] == "plasticity" and saved["method"]["event_epochs"] == [1, 2]
    assert len(saved["method"]["history"]) == 2
    assert saved["method"]["twins"] == records[-1]["twins"] == trainer.method.growth.twins()
    # validation before an event's surgery does not describe the model after it: only epoch 3 may be best
    assert [trainer.method.selectable(e) for e in range(3)] == [False, False, True]
    assert saved["best_on_val"]["epoch"] == 2


def test_default_schedule_stops_before_the_first_lr_decay(tmp_path):
    def train(**k):
        return SimpleNamespace(**{"epochs": 200, "warmup_epochs": 5, "milestones": [160, 180], **k})

    assert base_lr_end(train(schedule="step")) == 159  # E_mod 30: events after 30, ..., 150
    assert base_lr_end(train(schedule="step", milestones=[])) == 199
    assert base_lr_end(train(schedule="step", milestones=[250])) == 199
    assert base_lr_end(train(schedule="cosine")) == 5 + 195 // 2  # the LR is half the base after epoch 102
    assert base_lr_end(train(schedule="constant")) == 199
    raw = plasticity_config(last_event_epoch=None)  # the tiny config decays the LR from epoch 2 (0-based)
    cfg = config_from_dict(raw)
    prepare_run_dir(cfg, tmp_path / "run")
    lines = []
    trainer = Trainer(cfg, tmp_path / "run", log=lines.append)
    assert trainer.method.events == [1]
    assert any("plasticity: growth events after epochs [1]" in line for line in lines)  # logged at the start


def test_last_event_epoch_ends_the_schedule(tmp_path):
    trainer = make(tmp_path, last_event_epoch=1)  # every epoch of 3 could end in an event; only the first does
    result = trainer.fit()
    assert ["plasticity" in r for r in trainer.metrics.records()] == [True, False, False]
    assert result["method"]["event_epochs"] == [1] and len(result["method"]["history"]) == 1


@pytest.mark.parametrize("options", [{"ranking": "l1"}, {"accumulate": "last_batch", "reweight": False}])
def test_ablations_run(tmp_path, options):
    trainer = make(tmp_path, **options)
    trainer.cfg.train.epochs = 2
    trainer.fit()
    event = trainer.metrics.records()[0]["plasticity"]
    assert event["steps"] == (0 if options.get("ranking") == "l1" else 1)
    assert event["duplicated"] > 0


def test_config_validation():
    from tailwise.errors import ConfigError

    with pytest.raises(ConfigError, match="alpha"):
        validate_method_config({"name": "plasticity", "alpha": 0.7})
    with pytest.raises(ConfigError, match="copy_bn"):
        validate_method_config({"name": "plasticity", "copy_bn": "source"})
    with pytest.raises(ConfigError, match="every_epochs"):
        validate_method_config({"name": "plasticity", "every_epochs": 5}, config_from_dict(tiny_config()))
    with pytest.raises(ConfigError, match="no growth event before epoch 1"):  # the default: before the LR decay
        validate_method_config({"name": "plasticity", "every_epochs": 2}, config_from_dict(tiny_config()))
    with pytest.raises(ConfigError, match="no growth event before epoch 1"):
        validate_method_config({"name": "plasticity", "every_epochs": 2, "last_event_epoch": 1},
                               config_from_dict(tiny_config()))
    resolved = validate_method_config({"name": "plasticity"})
    assert (resolved["exempt"], resolved["copy_bn"], resolved["source_momentum"]) == ("pairs", "layer", "keep")
