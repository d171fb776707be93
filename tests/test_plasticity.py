"""Neuron growth and removal (``method: plasticity``): function-preserving surgery, exemption of fresh copies,
class-reweighted ranking, carried momentum, an end-to-end run and exact resume across a surgery."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from torch import nn

from tailwise.config import config_from_dict
from tailwise.data.dataset import Split
from tailwise.engine.dist import Dist
from tailwise.engine.trainer import Interrupted, Trainer
from tailwise.methods import build_method, validate_method_config
from tailwise.methods.plasticity import Plasticity, class_weights

from test_engine import stop_after, tiny_config, trainer_for, weights


def plasticity_config(**method) -> dict:
    cfg = tiny_config()
    cfg["method"] = {"name": "plasticity", "every_epochs": 1, **method}
    return cfg


def make(tmp_path, name="run", **method) -> Trainer:
    return trainer_for(plasticity_config(**method), tmp_path / name)


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


def kill_lowest(method: Plasticity, model: nn.Module, scores: list[torch.Tensor]) -> None:
    """Zero the outgoing weights of the channels each group will remove, so removal is function-preserving."""
    with torch.no_grad():
        for gi, (g, s) in enumerate(zip(method.groups, scores)):
            slots, _ = method.select(gi, s)
            for sl in g.slices:
                incoming = (sl.module_name in g.producers and sl.dim == 0) or sl.module_name in g.norms
                if not incoming:
                    tensor = getattr(model.get_submodule(sl.module_name), sl.tensor_name)
                    tensor.index_fill_(sl.dim, sl.index[slots], 0.0)


@pytest.mark.parametrize("scope", ["internal", "residual"])
def test_surgery_preserves_function_at_zero_noise(tmp_path, scope):
    trainer = make(tmp_path, bn_noise=0.0, scope=scope)
    model, method = trainer.ctx.model, trainer.method
    randomize_bn(model)
    g = torch.Generator().manual_seed(1)
    scores = [torch.rand(grp.size, generator=g, dtype=torch.float64) for grp in method.groups]
    x = torch.randn(6, 3, 16, 16, generator=g)
    # duplication into a slot whose outgoing weights are zero: exactly function-preserving, weight scaling s = 1
    kill_lowest(method, model, scores)
    model.eval()
    with torch.no_grad():
        before = model(x)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    event = method.apply_event(trainer.ctx, scores, 0)
    with torch.no_grad():
        after = model(x)
    assert event["duplicated"] == event["removed"] > 0
    assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    for layer in event["layers"].values():
        assert all(abs(s - 1.0) < 1e-9 for s in layer["scale"].values())
    # the copy's incoming weights and BN entries (running stats included) are its source's
    g0 = method.groups[0]
    slots, sources = method.last_surgery[0]
    conv = model.get_submodule(g0.producers[0])
    assert torch.equal(conv.weight[slots], conv.weight[sources])
    bn = model.get_submodule(g0.norms[0])
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(bn, name)[slots], getattr(bn, name)[sources]), name


def test_noise_perturbs_only_the_copies_bn_affine(tmp_path):
    trainer = make(tmp_path, bn_noise=0.1)
    model, method = trainer.ctx.model, trainer.method
    scores = [torch.arange(grp.size, dtype=torch.float64) for grp in method.groups]
    method.apply_event(trainer.ctx, scores, 0)
    g0 = method.groups[0]
    slots, sources = method.last_surgery[0]
    assert torch.equal(slots, torch.arange(len(slots)))  # the lowest scores are removed
    assert set(sources.tolist()) == set(range(g0.size - len(slots), g0.size))  # the highest duplicated
    bn = model.get_submodule(g0.norms[0])
    assert not torch.equal(bn.weight[slots], bn.weight[sources])
    assert torch.equal(bn.running_var[slots], bn.running_var[sources])


def test_weight_scaling_formula(tmp_path):
    trainer = make(tmp_path, bn_noise=0.0)
    model, method = trainer.ctx.model, trainer.method
    g0 = method.groups[0]
    consumer = next(s for s in g0.slices if s.module_name in g0.consumers)
    w = getattr(model.get_submodule(consumer.module_name), consumer.tensor_name).detach().clone()
    scores = [torch.arange(grp.size, dtype=torch.float64) for grp in method.groups]
    slots, sources = method.select(0, scores[0])
    energy = w.double().pow(2).sum(dim=(0, 2, 3))
    expected = float((energy.sum() / energy[~torch.isin(torch.arange(g0.size), slots)].sum()).sqrt())
    event = method.apply_event(trainer.ctx, scores, 0)
    assert event["layers"][g0.name]["scale"][f"{consumer.module_name}.weight"] == pytest.approx(expected)
    after = getattr(model.get_submodule(consumer.module_name), consumer.tensor_name)
    assert torch.allclose(after[:, sources], w[:, sources] * 0.5 * expected, atol=1e-6)
    assert torch.allclose(after[:, slots], w[:, sources] * 0.5 * expected, atol=1e-6)
    # the effective (merged) outgoing weights keep the consumer's Frobenius norm
    merged = after.clone()
    merged[:, sources] += after[:, slots]
    merged[:, slots] = 0
    assert torch.allclose(merged.norm(), w.norm(), rtol=1e-5)


def test_removal_exempts_the_previous_events_copies(tmp_path):
    trainer = make(tmp_path, bn_noise=0.0)
    method = trainer.method
    scores = [torch.arange(grp.size, dtype=torch.float64) for grp in method.groups]
    method.apply_event(trainer.ctx, scores, 0)
    first = {gi: slots.clone() for gi, (slots, _) in method.last_surgery.items()}
    # at the next event the fresh copies score lowest: they must survive, the next-lowest go
    second_scores = []
    for gi, grp in enumerate(method.groups):
        s = torch.arange(grp.size, dtype=torch.float64) + 100
        s[first[gi]] = 0.0
        second_scores.append(s)
    method.apply_event(trainer.ctx, second_scores, 1)
    for gi, (slots, _) in method.last_surgery.items():
        assert not set(slots.tolist()) & set(first[gi].tolist())
        assert len(slots) == len(first[gi]) == int(0.3 * method.groups[gi].size)
    # without exemption the fresh copies would be removed
    method.options.exempt = "none"
    method.recent = [f.clone() for f in first.values()]
    assert set(method.select(0, second_scores[0])[0].tolist()) == set(first[0].tolist())


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
    return SimpleNamespace(model=model, loss_fn=loss_fn, device=torch.device("cpu"),
                           data=SimpleNamespace(train=Split(images, torch.zeros(1, dtype=torch.long)), class_counts=counts),
                           cfg=SimpleNamespace(run=SimpleNamespace(seed=0), train=SimpleNamespace(epochs=10)),
                           optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                           trainer=SimpleNamespace(), epoch=0, batch_share=1.0, dist=Dist())


def test_class_reweighting_changes_the_ranking():
    # Symmetric by construction: a class-0 image lights input plane 0 only, a class-1 image plane 1 only, and
    # (BN in eval mode: the identity) each sample's gradient reaches only its class's conv1 channel, with the
    # same magnitude. A batch of 12 head and 4 tail images; class counts 100:10.
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
        loss, _ = method.reweighted_scores(ctx, x, y)
        loss.backward()  # the trainer's backward frees the kept graph
        ranking[reweight] = method.window[[g.name for g in method.groups].index("conv1")]
    assert torch.allclose(ranking[False][0] / ranking[False][1], torch.tensor(3.0, dtype=torch.float64))
    assert ranking[False][0] > ranking[False][1]  # unweighted: the head channel dominates (12 vs 4 samples)
    assert ranking[True][1] > ranking[True][0]  # reweighted (w = 2/11, 20/11): the tail channel does
    assert torch.allclose(ranking[True][1] / ranking[True][0], torch.tensor(4 * 20 / (12 * 2), dtype=torch.float64))
    assert torch.allclose(class_weights([100, 10], 1.0), torch.tensor([2 / 11, 20 / 11], dtype=torch.float64))


def test_reweighted_gradient_is_exact():
    """The accumulated scores equal |d(1/N sum w_y l_i)/dW| computed directly."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 2, 4, 4), torch.tensor([0, 0, 0, 0, 0, 1, 1, 0])
    model = TwoPath()
    method = build_method(validate_method_config({"name": "plasticity", "every_epochs": 1}))
    ctx = two_path_ctx(model, [30, 3])
    method.setup(ctx)
    method.reweighted_scores(ctx, x, y)
    w = class_weights([30, 3], 1.0).float()
    reference = TwoPath()
    per_sample = nn.functional.cross_entropy(reference(x), y, reduction="none")
    (per_sample * w[y]).mean().backward()
    gi = [g.name for g in method.groups].index("conv1")
    expected = reference.conv1.weight.grad.abs().flatten(1).sum(1).double()
    assert torch.allclose(method.window[gi], expected, rtol=1e-5, atol=1e-9)


def test_momentum_is_carried(tmp_path):
    trainer = make(tmp_path, bn_noise=0.0)
    ctx, method = trainer.ctx, trainer.method
    for i, (x, y) in enumerate(trainer.train_loader):
        ctx.optimizer.zero_grad()
        trainer.loss_fn(ctx.model(x), y).backward()
        ctx.optimizer.step()
        if i == 2:
            break
    g0 = method.groups[0]
    conv, bn = ctx.model.get_submodule(g0.producers[0]), ctx.model.get_submodule(g0.norms[0])
    consumer = ctx.model.get_submodule(g0.consumers[0])
    momentum = lambda p: ctx.optimizer.state[p]["momentum_buffer"].clone()  # noqa: E731
    before = {"conv": momentum(conv.weight), "bn": momentum(bn.weight), "out": momentum(consumer.weight)}
    other = ctx.model.fc.weight
    other_before = momentum(other)
    optimizer = ctx.optimizer
    scores = [torch.arange(grp.size, dtype=torch.float64) for grp in method.groups]
    event = method.apply_event(ctx, scores, 0)
    slots, sources = method.last_surgery[0]
    assert ctx.optimizer is optimizer and ctx.optimizer.state[conv.weight]  # same parameters, same state
    after = {"conv": momentum(conv.weight), "bn": momentum(bn.weight), "out": momentum(consumer.weight)}
    assert torch.equal(after["conv"][slots], before["conv"][sources])  # the copy inherits its source's
    assert torch.equal(after["conv"][sources], before["conv"][sources])
    assert torch.equal(after["bn"][slots], before["bn"][sources])
    kept = torch.ones(g0.size, dtype=torch.bool)
    kept[slots] = False
    assert torch.equal(after["conv"][kept], before["conv"][kept])  # survivors keep theirs
    s = event["layers"][g0.name]["scale"][f"{g0.consumers[0]}.weight"]
    assert torch.allclose(after["out"][:, slots], before["out"][:, sources] * 0.5 * s)
    assert torch.allclose(after["out"][:, sources], before["out"][:, sources] * 0.5 * s)
    assert torch.equal(momentum(other), other_before)


def test_end_to_end_keeps_widths_and_logs_events(tmp_path):
    trainer = make(tmp_path)
    dense = {k: v.shape for k, v in trainer.ctx.model.state_dict().items()}
    result = trainer.fit()
    assert {k: v.shape for k, v in trainer.ctx.model.state_dict().items()} == dense
    assert result["cost"]["params"] == result["cost"]["params_dense"]
    assert result["cost"]["macs"] == result["cost"]["macs_dense"]
    records = trainer.metrics.records()
    assert ["plasticity" in r for r in records] == [True, True, False]  # events after epochs 1 and 2 of 3
    event = records[0]["plasticity"]
    assert event["steps"] == len(trainer.train_loader) == 5
    assert set(event["layers"]) == {g.name for g in trainer.method.groups}
    for layer in event["layers"].values():
        assert layer["duplicated"] == layer["removed"] == int(0.3 * layer["width"])
        assert set(layer["score"]) == {"min", "q25", "median", "q75", "max", "mean"}
    assert all(r["train_acc"] is not None for r in records)
    saved = json.loads((trainer.out / "result.json").read_text())
    assert saved["method"]["name"] == "plasticity" and saved["method"]["event_epochs"] == [1, 2]
    assert len(saved["method"]["history"]) == 2


def test_last_event_epoch_ends_the_schedule(tmp_path):
    trainer = make(tmp_path, last_event_epoch=1)  # every epoch of 3 would end in an event; only the first does
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


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    trainer = make(tmp_path_factory.mktemp("plasticity-full"))
    return trainer, trainer.fit()


@pytest.mark.parametrize("stop_step", [3, 8])  # mid scoring epoch 0; mid epoch 1, after the first surgery
def test_resume_across_a_surgery_equals_uninterrupted(tmp_path, uninterrupted, stop_step):
    full, full_result = uninterrupted
    first = make(tmp_path)
    stop_after(first, stop_step)
    with pytest.raises(Interrupted):
        first.fit()
    resumed = Trainer(first.cfg, first.out, log=lambda msg: None)
    resumed.resume()
    result = resumed.fit()
    for key, value in weights(full).items():
        assert torch.equal(value, resumed.ctx.model.state_dict()[key]), key
    assert result["accuracy"] == full_result["accuracy"]
    assert result["method"]["history"] == json.loads(json.dumps(full_result["method"]["history"]))
    strip = lambda recs: [{k: v for k, v in r.items() if k != "time_s"} for r in recs]  # noqa: E731
    assert strip(resumed.metrics.records()) == strip(full.metrics.records())


def test_config_validation():
    from tailwise.errors import ConfigError

    with pytest.raises(ConfigError, match="alpha"):
        validate_method_config({"name": "plasticity", "alpha": 0.7})
    with pytest.raises(ConfigError, match="every_epochs"):
        validate_method_config({"name": "plasticity", "every_epochs": 5}, config_from_dict(tiny_config()))
    with pytest.raises(ConfigError, match="no growth event before epoch 1"):
        validate_method_config({"name": "plasticity", "every_epochs": 2, "last_event_epoch": 1},
                               config_from_dict(tiny_config()))
