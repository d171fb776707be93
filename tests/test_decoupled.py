"""``method: do``: stage plan and lr, compensation loss, samplers, frozen entries, end-to-end run and resume."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tailwise.config import config_from_dict
from tailwise.engine.rundir import prepare_run_dir
from tailwise.engine.trainer import Trainer
from tailwise.errors import ConfigError
from tailwise.methods.do import DOMethod
from tailwise.methods.do.loss import compensation_loss, reversed_frequency, stage_alpha
from tailwise.methods.do.masks import FreezeMasks, decoupled_parameters, select_pruned
from tailwise.methods.do.plan import Stage, stage_epochs, stage_lr
from tailwise.methods.do.schedule import cubic_ratio, knee

from test_engine import trainer_for


def do_config(epochs: int = 8, **method) -> dict:
    return {
        "data": {"name": "synthetic", "num_classes": 6, "synthetic_per_class": 40, "synthetic_test_per_class": 6,
                 "imbalance_ratio": 10, "image_size": 16, "val_per_class": 3, "cache": False},
        "model": {"name": "resnet20"},
        "loss": {"name": "ce"},
        "method": {"name": "do", "prune_steps": 3, **method},
        "train": {"epochs": epochs, "batch_size": 32, "eval_batch_size": 64, "lr": 0.05, "warmup_epochs": 0},
        "run": {"seed": 5, "progress": "none", "threads": 1},
    }


def make(tmp_path, name="run", epochs=8, **method) -> Trainer:
    return trainer_for(do_config(epochs, **method), tmp_path / name)


# ------------------------------------------------------------------------------------------------ pure pieces
def test_stage_epochs_and_lr():
    assert stage_epochs(200, 3) == [100, 50, 50]
    assert stage_epochs(10, 3) == [6, 2, 2]
    assert stage_epochs(9, 2) == [6, 3]
    first = Stage("many", "many", [0], 100, 0, 0.05, 0.5)
    later = Stage("medium", "medium", [1], 50, 100, 0.005, 0.8)
    assert stage_lr(first, 0, 0) == pytest.approx(0.05)
    assert stage_lr(first, 50, 0) == pytest.approx(0.025)
    assert stage_lr(first, 99, 0) == pytest.approx(0.05 * (1 + math.cos(math.pi * 0.99)) / 2)
    assert stage_lr(first, 1, 5) == pytest.approx(0.05 * 2 / 5)  # warm-up
    assert stage_lr(later, 120, 5) == 0.005


def test_cubic_schedule_endpoints():
    assert cubic_ratio(0, 10, 0.0, 0.8) == 0.0
    assert cubic_ratio(10, 10, 0.0, 0.8) == pytest.approx(0.8)
    values = [cubic_ratio(k, 10, 0.0, 0.8) for k in range(11)]
    assert values == sorted(values)
    assert values[1] - values[0] > values[10] - values[9]  # fast first, slow last


def test_compensation_loss_by_hand():
    z = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    y = torch.tensor([0, 2])
    alpha = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    expected = 0.0
    for i in range(2):
        adj = [float(z[i, c]) - math.log(float(alpha[c])) for c in range(3)]
        expected += -(adj[int(y[i])] - math.log(sum(math.exp(a) for a in adj)))
    assert float(compensation_loss(z, y, alpha.log())) == pytest.approx(expected / 2, rel=1e-6)


def test_alpha_per_stage():
    counts = [50, 20, 10, 4]
    assert torch.equal(stage_alpha("many", [0], counts, 0.7), torch.ones(4, dtype=torch.float64))
    tau = reversed_frequency(counts)
    assert tau.tolist() == pytest.approx([4 / 84, 10 / 84, 20 / 84, 50 / 84])
    # rank-based reversal: unsorted labels give each class the frequency of its mirror rank
    assert reversed_frequency([4, 50, 10, 20]).tolist() == pytest.approx([50 / 84, 4 / 84, 20 / 84, 10 / 84])
    med = stage_alpha("medium", [1, 2], counts, 0.7)
    assert med.tolist() == pytest.approx([0.3, 0.7, 0.7, 0.3])
    assert stage_alpha("medium", [1, 2], counts, 0.7, "constant").tolist() == pytest.approx([0.7] * 4)


def test_select_pruned_nested_and_scoped():
    scores = [torch.tensor([5.0, 1.0, 3.0, 2.0]), torch.tensor([10.0, 20.0])]
    free = [torch.tensor([True, True, True, False]), torch.tensor([True, True])]
    layer = select_pruned(scores, free, 0.5, "layer")
    assert layer[0].tolist() == [False, True, True, False]  # 0.5 * 3 free = 1.5 -> 2 (half up), lowest two
    assert layer[1].tolist() == [True, False]
    glob = select_pruned(scores, free, 0.4, "global")  # 5 free entries -> 2 lowest: 1.0 and 3.0
    assert glob[0].tolist() == [False, True, True, False] and glob[1].tolist() == [False, False]
    small = select_pruned(scores, free, 0.2, "global")
    assert all(bool((s <= b).all()) for s, b in zip(small, glob))


# ------------------------------------------------------------------------------------------------ in a trainer
def test_plan_sampler_and_config_checks(tmp_path):
    trainer = make(tmp_path, epochs=8)
    m = trainer.method
    assert isinstance(m, DOMethod)
    groups = trainer.data.groups
    assert [s.name for s in m.stages] == ["many", "medium", "few"]
    assert [s.classes for s in m.stages] == [groups.indices(g) for g in ("many", "medium", "few")]
    assert [(s.start, s.epochs) for s in m.stages] == [(0, 4), (4, 2), (6, 2)]
    assert [s.lr for s in m.stages] == pytest.approx([0.05, 0.005, 0.005])
    assert trainer.train_loader.sampler.kind == "instance"
    s1, s2 = m.sampler_for(trainer.ctx, 1), m.sampler_for(trainer.ctx, 2)
    assert s1.kind == "group_preferred" and s1.rho == 0.7 and s2.kind == "class_balanced"
    labels = trainer.data.train.labels
    idx = s1.epoch_indices(0)[:32]
    in_medium = torch.isin(labels[idx], torch.tensor(m.stages[1].classes))
    assert int(in_medium.sum()) == round(0.7 * 32)
    with pytest.raises(ConfigError):
        config_from_dict({**do_config(), "loss": {"name": "balanced_softmax"}})
    with pytest.raises(ConfigError):
        config_from_dict(do_config(8, stage_epochs=[4, 2, 1]))
    with pytest.raises(ConfigError, match="no free parameters"):
        config_from_dict(do_config(8, gamma=[0.0, 0.5]))
    with pytest.raises(ConfigError, match="tta_floor"):
        config_from_dict(do_config(8, aggregation="group", tta_floor=0.4))
    two = make(tmp_path, "two", 6, stages=2)
    assert [s.name for s in two.method.stages] == ["many", "few"]
    swapped = make(tmp_path, "swap", 8, order="many-few-medium")
    assert [s.kind for s in swapped.method.stages] == ["many", "few", "medium"]


def test_frozen_entries_bit_identical_through_sgd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(2, 3, 6, 6))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
    params = decoupled_parameters(model)
    assert [n for n, _ in params] == ["0.weight", "0.bias", "3.weight", "3.bias"]
    masks = FreezeMasks(params)
    gen = torch.Generator().manual_seed(1)
    masks.freeze([torch.rand(p.shape, generator=gen) < 0.5 for _, p in params], stage=1)
    before = [p.detach().clone() for _, p in params]
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 3, (8,))
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        masks.mask_gradients()
        opt.step()
        masks.enforce(opt)
    for (name, p), b, o in zip(params, before, masks.owner):
        frozen = o != 0
        assert torch.equal(p.detach()[frozen], b[frozen]), name
        if (~frozen).any():
            assert not torch.equal(p.detach()[~frozen], b[~frozen]), name  # the free entries did train
        assert bool((opt.state[p]["momentum_buffer"][frozen] == 0).all()), name


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    trainer = make(tmp_path_factory.mktemp("do_full"))
    return trainer, trainer.fit()


def test_end_to_end(full_run):
    trainer, result = full_run
    m = trainer.method
    desc = result["method"]
    assert desc["name"] == "do" and len(desc["stages_table"]) == 2 and len(m.submodels) == 2
    records = trainer.metrics.records()
    assert [r["do"]["stage"] for r in records] == [1, 1, 1, 1, 2, 2, 3, 3]
    assert [r["do"]["lr"] for r in records][4:] == pytest.approx([0.005] * 4)
    assert "decoupling" in records[3]["do"] and "decoupling" in records[5]["do"]
    # frozen fractions: stage 1 keeps 50% of all entries, stage 2 20% of the other half
    table = desc["stages_table"]
    assert table[0]["frozen_fraction"] == pytest.approx(0.5, abs=0.01)
    assert table[1]["frozen_fraction"] == pytest.approx(0.6, abs=0.01)
    # the frozen entries of stage 1 are the sub-model-1 entries, unchanged to the end
    sub1 = m.submodels[0]
    state = trainer.ctx.model.state_dict()
    for i, (name, _) in enumerate(m.decoupler.params):
        frozen1 = m.decoupler.masks.owner[i] == 1
        assert torch.equal(state[name][frozen1], sub1[name][frozen1]), name
        assert bool((sub1[name][m.decoupler.masks.owner[i] == 0] == 0).all()), name
    assert 0.0 <= result["accuracy"]["all"] <= 100.0
    assert trainer.train_loader.sampler.kind == "class_balanced"
    # validation before a decoupling does not describe the model after it: epochs 4 and 6 never become best
    assert [m.selectable(e) for e in range(8)] == [True, True, True, False, True, False, True, True]
    assert result["best_on_val"]["epoch"] not in (3, 5)


def planted_views(y: torch.Tensor, k: int, t: int, planted: int, g: torch.Generator):
    """Two views' ``T x B x K`` softmax outputs: sub-model ``planted`` is stable (confident on ``y`` in both
    views), the others are noise that changes between the views."""
    b = len(y)

    def stable():
        z = torch.zeros(b, k)
        z[torch.arange(b), y] = 3.0
        return (z + 0.3 * torch.randn(b, k, generator=g)).softmax(1)

    def unstable():
        return (2.0 * torch.randn(b, k, generator=g)).softmax(1)

    return (torch.stack([stable() if i == planted else unstable() for i in range(t)]),
            torch.stack([stable() if i == planted else unstable() for i in range(t)]))


def test_instance_aggregation_recovers_planted_submodel():
    from tailwise.models.ensemble import instance_weights

    g = torch.Generator().manual_seed(0)
    t, b, k = 3, 64, 10
    y = torch.randint(0, k, (b,), generator=g)
    for planted in range(t):
        v1, v2 = planted_views(y, k, t, planted, g)
        lam = instance_weights(v1, v2, steps=10, lr=1.0, floor=0.05)
        assert torch.allclose(lam.sum(1), torch.ones(b))
        assert bool((lam >= 0.05 - 1e-6).all())
        assert float((lam.argmax(1) == planted).float().mean()) > 0.9
        assert int(lam.mean(0).argmax()) == planted


def test_group_weights_find_the_stable_submodel_for_the_whole_set():
    from tailwise.models.ensemble import group_weights

    g = torch.Generator().manual_seed(1)
    t, k = 3, 10

    def batch(b, planted):
        return planted_views(torch.randint(0, k, (b,), generator=g), k, t, planted, g)

    lam = group_weights([batch(32, 2), batch(20, 2)], steps=10, lr=1.0, floor=0.05)
    assert lam.shape == (3,) and float(lam.sum()) == pytest.approx(1.0) and int(lam.argmax()) == 2
    assert float(lam.min()) >= 0.05 - 1e-6


@pytest.mark.parametrize("aggregation", ["instance", "group"])
def test_deployed_ensemble_reproduces_the_reported_accuracy(tmp_path, aggregation):
    """model/ holds every sub-model: tailwise eval (the loaded ensemble) gives result.json's accuracy."""
    import tailwise
    from tailwise.eval.evaluate import evaluate_run
    from tailwise.models.ensemble import SubModelEnsemble

    trainer = make(tmp_path, epochs=6, aggregation=aggregation, tta_steps=3)
    result = trainer.fit()
    model = tailwise.load_model(trainer.out)
    assert isinstance(model, SubModelEnsemble) and len(model.members) == 3
    assert evaluate_run(trainer.out) == result["accuracy"]
    by_mode = result["method"]["final"]["test_by_aggregation"]
    assert set(by_mode) == {"average", "instance", "group"}
    assert by_mode[aggregation] == {k: result["accuracy"][k] for k in ("all", "many", "medium", "few", "balanced")}
    single = sum(p.numel() for p in model.members[0].parameters())
    assert result["cost"]["params"] == 3 * single
    # three passes; instance-level aggregation also runs both views through every sub-model
    assert result["cost"]["F"] == (pytest.approx(300.0) if aggregation == "group" else pytest.approx(900.0, rel=0.01))
    # the members are the sub-models: sub-model 1 keeps only stage 1's entries of the decoupled tensors
    names = [n for n, _ in trainer.method.decoupler.params]
    sub1 = trainer.method.submodels[0]
    for key, value in model.members[0].state_dict().items():
        assert torch.equal(value.cpu(), sub1[key].cpu()), key
    owner = dict(zip(names, trainer.method.decoupler.masks.owner))
    for name in names:
        assert torch.equal(model.members[0].state_dict()[name] != 0, (sub1[name] != 0))
        assert not bool((sub1[name][owner[name].cpu() != 1] != 0).any())  # only stage 1's entries in sub-model 1
    from tailwise.errors import TailwiseError
    from tailwise.export import export_onnx

    final = result["method"]["final"]  # Table 9's weights whatever the run's aggregation
    instance = final["test_time"] if aggregation == "instance" else final["instance_test_time"]
    assert instance["aggregation"] == "instance" and set(instance["mean_lambda_per_group"]) == {"many", "medium", "few"}
    assert ("instance_test_time" in final) == (aggregation != "instance")
    if aggregation == "group":
        lam = result["method"]["final"]["group_lambda"]
        assert len(lam) == 3 and sum(lam) == pytest.approx(1.0, abs=1e-5)
        assert model.settings["group_lambda"] == lam
        report = export_onnx(trainer.out)  # fixed weights: the ensemble exports, checked against onnxruntime
        assert report["checked"] and report["max_abs_diff"] <= 1e-3
    else:
        with pytest.raises(TailwiseError, match="cannot be exported"):
            export_onnx(trainer.out)


def test_instance_aggregation_end_to_end(tmp_path):
    trainer = make(tmp_path, epochs=6, aggregation="instance", tta_steps=3)
    result = trainer.fit()
    test_time = result["method"]["final"]["test_time"]
    assert test_time["aggregation"] == "instance" and test_time["ms_per_image"] > 0
    table = test_time["mean_lambda_per_group"]
    assert set(table) == {"many", "medium", "few"} and all(len(v) == 3 for v in table.values())
    assert all(sum(v) == pytest.approx(1.0, abs=1e-3) for v in table.values())
    x = trainer.train_loader.normalize(trainer.data.test.images[:8])
    trainer.ctx.model.eval()
    with torch.no_grad():  # a prediction is a pure function of its batch
        assert torch.equal(trainer.method.predict(trainer.ctx, x), trainer.method.predict(trainer.ctx, x))


def test_gamma_knee_and_sweep(tmp_path):
    ratios = [i / 10 for i in range(10)]
    assert knee(ratios, [60, 60, 59.5, 59, 58.5, 58, 40, 30, 20, 10]) == 0.5  # the marked drop comes after 50%
    assert knee(ratios, [50.0] * 10) == 0.0
    trainer = make(tmp_path, epochs=6, gamma_select="sweep", prune_steps=0)
    result = trainer.fit()
    for row in result["method"]["stages_table"]:
        assert row["sweep"]["ratios"] == ratios and len(row["sweep"]["accuracy"]) == 10
        assert row["sweep"]["knee"] == knee(ratios, row["sweep"]["accuracy"])
        assert row["gamma"] == max(0.1, row["sweep"]["knee"])  # never 0: the next stage needs free parameters


def test_four_stages_and_empty_group(tmp_path):
    four = make(tmp_path, "four", epochs=10, stages=4)
    m, counts = four.method, four.data.class_counts
    assert [s.name for s in m.stages] == ["many", "medium-top", "medium-low", "few"]
    medium = four.data.groups.indices("medium")
    assert sorted(m.stages[1].classes + m.stages[2].classes) == medium
    assert min(counts[c] for c in m.stages[1].classes) >= max(counts[c] for c in m.stages[2].classes)
    assert [s.epochs for s in m.stages] == [4, 2, 2, 2]
    # two classes (40 and 4 images): threshold groups, no "many" class -> that stage is dropped, its epochs move on
    raw = do_config(8)
    raw["data"].update(num_classes=2, val_per_class=1)
    cfg = config_from_dict(raw)
    prepare_run_dir(cfg, tmp_path / "two_classes")
    small = Trainer(cfg, tmp_path / "two_classes", log=lambda msg: None)
    assert small.method.dropped == ["many"]
    assert [(s.name, s.start, s.epochs, s.lr, s.gamma) for s in small.method.stages] == [
        ("medium", 0, 6, 0.05, 0.8), ("few", 6, 2, 0.005, None)]
    assert small.train_loader.sampler.kind == "group_preferred"


def test_importance_shared_out_by_whole_batches_adds_up_to_one_process(tmp_path):
    """Under data parallelism each process scores a contiguous run of whole batches of the stage's images and
    the sums are added: the parts (3 processes, the cross-process sum left out) add up to the 1-process scores."""
    from tailwise.engine.dist import Dist

    class Part(Dist):  # rank r of 3, with the cross-process sum left out: this process's part only
        def sum_all_(self, tensors):
            return tensors

    trainer = make(tmp_path, importance_batches=None)
    method, ctx = trainer.method, trainer.ctx
    whole = [s for scores in method.importance(ctx) for s in scores]  # the decoupled tensors', then the probe's
    assert len(whole) == len(method.decoupler.params) + len(method.probe.params)
    parts = []
    for rank in range(3):
        ctx.dist = Part(rank=rank, world=3)
        parts.append([s for scores in method.importance(ctx) for s in scores])
    ctx.dist = Dist()
    assert sum(bool(part[0].abs().sum() > 0) for part in parts) >= 2  # the batches really were shared out
    for i, w in enumerate(whole):
        assert torch.allclose(sum(part[i] for part in parts), w, rtol=1e-9, atol=1e-12)


def test_metrics_log_the_learning_rate_the_method_set(full_run):
    """DO owns the learning rate (stage 1 cosine, later stages constant): metrics.jsonl's lr is the one used,
    not the unused train.schedule's."""
    trainer, _ = full_run
    for record in trainer.metrics.records():
        assert record["lr"] == pytest.approx(record["do"]["lr"]), record["epoch"]


# ------------------------------------------------------------------------------------- issue #22: the fixes
def test_per_increment_schedule_by_hand():
    from tailwise.methods.do.schedule import pruning_ratios

    ratios = pruning_ratios(0.5, 10)  # the paper: Δt = 10 steps after every 10% increment
    assert len(ratios) == 50 and len(pruning_ratios(0.8, 10)) == 80
    assert [ratios[9], ratios[19], ratios[49]] == pytest.approx([0.1, 0.2, 0.5])
    assert ratios[0] == pytest.approx(0.1 - 0.1 * 0.9 ** 3)  # Eq. 4 inside the first increment
    assert ratios == sorted(ratios)
    off_grid = pruning_ratios(0.55, 10)  # a partial last increment 0.5 -> 0.55
    assert len(off_grid) == 60 and off_grid[-1] == pytest.approx(0.55) and off_grid[49] == pytest.approx(0.5)
    spread = pruning_ratios(0.5, 10, "spread")  # the old schedule: 10 steps over the whole ramp
    assert spread == [cubic_ratio(k, 10, 0.0, 0.5) for k in range(1, 11)]
    assert pruning_ratios(0.5, 0) == [0.5]  # one shot


@pytest.mark.parametrize("schedule, expected", [("per_increment", [15, 24]), ("spread", [3, 3])])
def test_decoupling_takes_the_scheduled_training_steps(tmp_path, schedule, expected):
    """prune_steps 3 (Δt) with γ 0.5 then 0.8: 5 x 3 and 8 x 3 training steps through the trainer's own step
    (counted at the trainer), or 3 and 3 spread over each ramp; the loop's step counter counts its own batches."""
    trainer = make(tmp_path, epochs=6, stage_epochs=[2, 2, 2], prune_schedule=schedule, bn_batches=1,
                   compare_aggregations=False)
    calls = []
    step = trainer.ctx._train_step
    trainer.ctx._train_step = lambda x, y: calls.append(trainer.ctx.epoch) or step(x, y)
    result = trainer.fit()
    assert [calls.count(1), calls.count(3)] == expected
    assert [r["prune_steps"] for r in trainer.method.records] == expected
    assert trainer.ctx.step == 6 * len(trainer.train_loader)
    assert result["method"]["choices"]["prune_schedule"].startswith(schedule)


def test_recomputed_batchnorm_matches_a_direct_computation():
    from tailwise.methods.batchnorm import recompute_batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 6, 6))
    model.eval()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "tracked" not in k}
    batches = [3.0 * torch.randn(8, 3, 6, 6) + i for i in range(3)]
    assert recompute_batchnorm(model, batches) == 3
    with torch.no_grad():
        h = [model[0](x) for x in batches]
    mean = sum(v.mean((0, 2, 3)) for v in h) / 3
    var = sum(v.transpose(0, 1).flatten(1).var(1, unbiased=True) for v in h) / 3
    assert torch.allclose(model[1].running_mean, mean, atol=1e-5)
    assert torch.allclose(model[1].running_var, var, rtol=1e-5)
    assert model[1].momentum == 0.1 and not model.training  # settings back as they were
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v), k
    before = model[1].running_mean.clone()
    assert recompute_batchnorm(model, []) == 0 and torch.equal(model[1].running_mean, before)


def test_submodel_statistics_are_those_of_the_stage_batches(full_run):
    """Sub-model t's stored BatchNorm statistics are recomputed on one epoch of stage t's sampler under the
    training augmentation: the first BatchNorm's equal a direct computation on those batches."""
    import itertools

    from tailwise.methods.do.adapter import BATCHNORM_KEY
    from tailwise.methods.batches import training_batches

    trainer, result = full_run
    m, ctx = trainer.method, trainer.ctx
    for t, sub in enumerate(m.submodels):
        batches = itertools.islice(training_batches(ctx, m.sampler_for(ctx, t), BATCHNORM_KEY + t),
                                   len(trainer.train_loader))
        with torch.no_grad():
            h = [nn.functional.conv2d(x, sub["conv1.weight"], padding=1) for x, _ in batches]
        mean = sum(v.mean((0, 2, 3)) for v in h) / len(h)
        var = sum(v.transpose(0, 1).flatten(1).var(1) for v in h) / len(h)
        assert torch.allclose(sub["bn1.running_mean"], mean, atol=1e-5), t
        assert torch.allclose(sub["bn1.running_var"], var, rtol=1e-4), t
        assert not torch.equal(sub["bn1.running_mean"], trainer.ctx.model.state_dict()["bn1.running_mean"])
    # logged per stage: after collaborative optimisation, the new sub-model before and after recomputing
    records = [r["do"]["decoupling"] for r in trainer.metrics.records() if "decoupling" in r["do"]]
    for r in records:
        for key in ("val_cpo", "val_tpd_stale", "val_tpd"):
            assert set(r[key]) == {"all", "many", "medium", "few", "balanced"}, key
    assert [r["val_tpd"] for r in records] == [row["val_tpd"] for row in result["method"]["stages_table"]]
    assert result["method"]["final"]["submodels_val"] == [r["val_tpd"] for r in records]


def test_frozen_entries_bit_identical_across_stages_with_clipping(tmp_path):
    """Every entry frozen at decoupling t keeps its value through every later stage and retraining step (the
    trainer's step with gradient clipping), in the live network and in every later sub-model."""
    raw = do_config(6, stage_epochs=[2, 2, 2], bn_batches=1, compare_aggregations=False)
    raw["train"]["grad_clip"] = 0.5
    trainer = trainer_for(raw, tmp_path / "clip")
    trainer.fit()
    m = trainer.method
    final = trainer.ctx.model.state_dict()
    for i, (name, _) in enumerate(m.decoupler.params):
        owner = m.decoupler.masks.owner[i]
        for t, sub in enumerate(m.submodels):
            mine = owner == t + 1
            assert bool(mine.any()), (name, t)
            assert torch.equal(final[name][mine], sub[name][mine]), (name, t)
            for later in m.submodels[t + 1:]:
                assert torch.equal(later[name][mine], sub[name][mine]), (name, t)


def test_classifier_exemption():
    from tailwise.models import build_model

    model = build_model("resnet20", 6)
    names = lambda exempt: [n for n, _ in decoupled_parameters(model, exempt)]  # noqa: E731
    assert "fc.weight" in names("none") and "fc.bias" in names("none")
    assert "fc.weight" not in names("classifier") and "fc.bias" not in names("classifier")
    assert "fc.weight" in names("classifier_bias") and "fc.bias" not in names("classifier_bias")
    assert len(names("none")) == len(names("classifier")) + 2


def test_exempt_classifier_is_whole_in_every_submodel(full_run):
    trainer, result = full_run
    assert result["method"]["exempt"] == "classifier"
    assert "fc.weight" not in result["method"]["decoupled_tensors"]
    for sub in trainer.method.submodels:
        assert bool((sub["fc.weight"] != 0).all()) and bool((sub["fc.bias"] != 0).all())


def stage_priors_by_hand(counts, medium, rho=0.7) -> list[torch.Tensor]:
    """The label distribution of each default stage's sampler from the class counts alone: instance (N_y / N),
    group-preferred (``rho`` of the draws from the medium classes, each part by its counts), class-balanced."""
    n = torch.tensor(counts, dtype=torch.float64)
    in_group = torch.zeros(len(n), dtype=torch.bool)
    in_group[medium] = True
    pref, rest = n * in_group, n * ~in_group
    return [n / n.sum(), rho * pref / pref.sum() + (1 - rho) * rest / rest.sum(), torch.full_like(n, 1 / len(n))]


def test_predict_is_the_aggregation_of_prior_corrected_submodels_and_live_network(full_run):
    trainer, result = full_run
    m, ctx = trainer.method, trainer.ctx
    x = trainer.train_loader.normalize(trainer.data.test.images[:8])
    priors = stage_priors_by_hand(ctx.class_counts, ctx.data.groups.indices("medium"))
    ctx.model.eval()
    with torch.no_grad():
        logits = [torch.func.functional_call(ctx.model, s, (x,)) for s in m.submodels] + [ctx.model(x)]
        adjusted = [z - p.log().float() for z, p in zip(logits, priors)]
        assert torch.allclose(m.predict(ctx, x), torch.stack(adjusted).mean(0), atol=1e-5)
        # the deployed ensemble carries the same correction in arch.json
        import tailwise
        deployed = tailwise.load_model(trainer.out).eval()
        assert torch.allclose(deployed.with_aggregation("average")(x), torch.stack(adjusted).mean(0), atol=1e-5)
    assert torch.allclose(torch.tensor(deployed.settings["log_priors"]), torch.stack(priors).log().float(), atol=1e-6)
    final = result["method"]["final"]
    assert len(final["members_val_adjusted"]) == 3 and result["method"]["prior_correction"] == "sampler"
    assert final["members_val_adjusted"][2] == final["val_last_stage"]  # the few stage's prior is uniform


def test_prior_correction_none_aggregates_raw_logits(tmp_path):
    trainer = make(tmp_path, epochs=6, prior_correction="none", compare_aggregations=False, exempt_probe=False)
    trainer.fit()
    m, ctx = trainer.method, trainer.ctx
    x = trainer.train_loader.normalize(trainer.data.test.images[:8])
    ctx.model.eval()
    with torch.no_grad():
        logits = [torch.func.functional_call(ctx.model, s, (x,)) for s in m.submodels] + [ctx.model(x)]
        assert torch.allclose(m.predict(ctx, x), torch.stack(logits).mean(0), atol=1e-6)
    import tailwise
    assert tailwise.load_model(trainer.out).settings["log_priors"] is None


def test_few_stage_sampler_readings(tmp_path):
    from tailwise.data.loader import Sampler

    labels = torch.tensor([0] * 100 + [1] * 10)
    share = lambda kind: float((labels[Sampler(labels, kind, 0).epoch_indices(0)] == 1).float().mean())  # noqa: E731
    assert share("class_balanced") == pytest.approx(0.5, abs=0.1)  # per image: p ∝ 1/N_y, classes uniform
    assert share("inverse") == pytest.approx((1 / 10) / (1 / 10 + 1 / 100), abs=0.06)  # per class: p(y) ∝ 1/N_y
    per_class = make(tmp_path, few_sampler="per_class")
    assert per_class.method.sampler_for(per_class.ctx, 2).kind == "inverse"


def test_decoupler_standalone_in_a_plain_loop():
    """The library object without a trainer: Taylor importance by hand, gradual pruning held at zero, freezing
    that returns the sub-model and re-initialises the pruned entries from a fresh model."""
    from tailwise.methods.do import Decoupler, pruning_ratios

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3, bias=False))
    batches = [(torch.randn(4, 5), torch.randint(0, 3, (4,))) for _ in range(2)]
    decoupler = Decoupler(model, exempt="none")  # the one layer is the classifier, exempt by default
    scores = decoupler.importance(batches, nn.functional.cross_entropy)
    w = model[0].weight.detach()
    expected = sum((w * (((x @ w.T).softmax(1) - nn.functional.one_hot(y, 3)).T @ x / len(y))) ** 2
                   for x, y in batches)  # dCE/dW = (softmax - onehot)^T x / B
    assert torch.allclose(scores[0], expected.double(), rtol=1e-5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for ratio in pruning_ratios(0.4, 2):  # 4 increments x 2 steps
        decoupler.prune(scores, ratio, opt)
        opt.zero_grad()
        nn.functional.cross_entropy(model(batches[0][0]), batches[0][1]).backward()
        decoupler.after_backward()
        opt.step()
        decoupler.after_step(opt)
        assert bool((model[0].weight[decoupler.masks.pruning[0]] == 0).all())
    pruned = decoupler.masks.pruning[0].clone()
    assert set(pruned.flatten().nonzero().flatten().tolist()) == set(scores[0].flatten().argsort()[:6].tolist())
    before = model[0].weight.detach().clone()
    fresh = nn.Sequential(nn.Linear(5, 3, bias=False))
    sub = decoupler.freeze(fresh, opt)
    assert torch.equal(sub["0.weight"][~pruned], before[~pruned]) and bool((sub["0.weight"][pruned] == 0).all())
    assert torch.equal(model[0].weight.detach()[pruned], fresh[0].weight.detach()[pruned])
    assert torch.equal(model[0].weight.detach()[~pruned], before[~pruned])
    assert bool((opt.state[model[0].weight]["momentum_buffer"][pruned] == 0).all())
    assert decoupler.decouplings == 1 and decoupler.masks.pruning is None


def test_exempt_probe_equals_a_run_decoupling_the_classifier_at_the_first_decoupling(tmp_path):
    """The probe's 'none' reading keeps exactly the classifier entries that a run with exempt none freezes at its
    first decoupling (both rank the same importance pass, taken before any masking), and its sub-model is the
    run's own with the other classifier entries zeroed."""
    probed = make(tmp_path, "probed", epochs=4, stages=2, stage_epochs=[2, 2])
    probed.fit()
    strict = make(tmp_path, "strict", epochs=4, stages=2, stage_epochs=[2, 2], exempt="none")
    strict.fit()
    probe = probed.method.probe
    assert set(probe.readings) == {"none", "classifier_bias"}
    owner = dict(zip([n for n, _ in strict.method.decoupler.params], strict.method.decoupler.masks.owner))
    for name in ("fc.weight", "fc.bias"):
        kept = probe.kept["none"][name]
        assert torch.equal(kept, (owner[name] != 0).cpu())
        assert 0 < int(kept.sum()) < kept.numel()  # γ 0.5 of the entries: neither none nor all
    assert torch.equal(probe.kept["classifier_bias"]["fc.weight"], probe.kept["none"]["fc.weight"])
    assert "fc.bias" not in probe.kept["classifier_bias"]
    sub = probed.method.submodels[0]
    masked = probe.submodel("none", sub)
    assert torch.equal(masked["fc.weight"], sub["fc.weight"] * probe.kept["none"]["fc.weight"])
    assert torch.equal(masked["conv1.weight"], sub["conv1.weight"])
    record = probed.method.describe()["stages_table"][0]["exempt_probe"]
    assert set(record) == {"none", "classifier_bias"} and all(r["all"] is not None for r in record.values())
    assert "exempt_probe" not in strict.method.describe()["stages_table"][0] or \
        strict.method.describe()["stages_table"][0]["exempt_probe"] is None  # nothing stricter than none


def test_checkpoint_from_before_prior_correction_resumes_with_raw_logits(tmp_path):
    trainer = make(tmp_path)
    m = trainer.method
    assert m.options.prior_correction == "sampler" and float(m.log_priors[0].abs().sum()) > 0
    state = m.state_dict()
    assert state["prior_correction"] == "sampler"
    del state["prior_correction"]  # what a checkpoint written before the option holds
    m.load_state_dict(state)
    assert m.options.prior_correction == "none" and all(float(p.abs().sum()) == 0 for p in m.log_priors)


def test_ensemble_log_priors_accept_tensors_check_shape_and_survive_a_dtype_cast(tmp_path):
    from tailwise.deploy import save_model
    from tailwise.models.ensemble import SubModelEnsemble

    members = [nn.Linear(4, 3), nn.Linear(4, 3)]
    priors = [torch.tensor([0.7, 0.2, 0.1]).log(), torch.full((3,), 1 / 3).log()]
    ensemble = SubModelEnsemble(members, "average", log_priors=priors)
    assert ensemble.settings["log_priors"] == [p.tolist() for p in priors]  # JSON for arch.json, float32 exact
    x = torch.randn(5, 4)
    with torch.no_grad():
        expected = ((members[0](x) - priors[0]) + (members[1](x) - priors[1])) / 2
        assert torch.allclose(ensemble(x), expected, atol=1e-6)
        ensemble.to(torch.bfloat16)  # the members round; the priors stay float32
        assert ensemble.offsets.dtype == torch.float32 and torch.equal(ensemble.offsets[0], priors[0])
    with pytest.raises(ValueError, match="one vector of class log priors per member"):
        SubModelEnsemble(members, "average", log_priors=[priors[0]])
    with pytest.raises(ValueError, match="one vector of class log priors per member"):
        SubModelEnsemble(members, "average", log_priors=[[0.0], [0.0]])
    with pytest.raises(ValueError, match="not built by tailwise"):  # arch.json could not rebuild plain Linears
        save_model(ensemble, tmp_path / "model", {}, ["a", "b", "c"])
    assert not (tmp_path / "model").exists()
