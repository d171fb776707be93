"""MORE (``method: more``): low-rank reparametrisation, general-only pass, loss, schedule, merge, runs, resume."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tailwise.compress.cost import count_macs, count_params
from tailwise.config import config_from_dict, load_config
from tailwise.deploy import load_model
from tailwise.engine.trainer import Interrupted, Trainer, prepare_run_dir
from tailwise.errors import ConfigError
from tailwise.losses import build_loss
from tailwise.methods.more import (MergeError, MoreOptions, MoreRebalancing, branch_size, check_merge, discrepancy,
                                   general_only, lowrank_layers, lowrank_rank, merge, more_loss, reparametrize,
                                   schedule_value)
from tailwise.models import build_model
from tailwise.recipes import find_recipe

from test_engine import stop_after, tiny_config, trainer_for


def lowrank_model(name="resnet20", num_classes=4, seed=0, randomize_b=False, **kw):
    base = build_model(name, num_classes, **kw)
    model = copy.deepcopy(base)
    reparametrize(model, 0.1, "all", torch.Generator().manual_seed(seed))
    if randomize_b:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for _, m in lowrank_layers(model):
                m.more_B.copy_(torch.randn(m.more_B.shape, generator=g) * 0.05)
    return base, model


def bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


# -------------------------------------------------------------------------------------------- reparametrisation
def test_rank_rule_and_layer_selection():
    assert lowrank_rank(16, 144, 0.1) == 2 and lowrank_rank(32, 288, 0.1) == 3 and lowrank_rank(64, 576, 0.1) == 6
    assert lowrank_rank(10, 64, 0.1) == 1 and lowrank_rank(4, 4, 0.1) == 1  # max(1, .)
    assert lowrank_rank(25, 100, 0.1) == 3  # 2.5 rounds half up
    model = build_model("resnet20", 4)
    ranks = reparametrize(model, 0.1, "all")
    n_conv = sum(isinstance(m, nn.Conv2d) for m in build_model("resnet20", 4).modules())
    assert len(ranks) == n_conv + 1 and ranks["fc"] == 1 and ranks["layer3.0.conv1"] == 6
    assert model.conv1.more_A.shape == (2, 27) and model.conv1.more_B.shape == (16, 2)
    assert torch.count_nonzero(model.conv1.more_B) == 0 and torch.count_nonzero(model.conv1.more_A) > 0
    assert model.conv1.more_A.abs().max() <= 1 / math.sqrt(27)
    assert list(reparametrize(build_model("resnet20", 4), 0.1, "linear")) == ["fc"]
    assert "fc" not in reparametrize(build_model("resnet20", 4), 0.1, "conv")


@pytest.mark.parametrize("normed_head", [False, True])
def test_start_equals_base(normed_head):
    base, model = lowrank_model(normed_head=normed_head)
    x = torch.randn(6, 3, 16, 16)
    for train in (True, False):
        base.train(train), model.train(train)
        with torch.no_grad():
            assert torch.equal(model(x), base(x))
    # the state dict is a superset of the base model's with the same weights
    extra = set(model.state_dict()) - set(base.state_dict())
    assert extra and all(k.endswith(("more_A", "more_B")) for k in extra)


@pytest.mark.parametrize("normed_head", [False, True])
def test_merge_equivalence_and_cost(normed_head):
    base, model = lowrank_model(normed_head=normed_head, randomize_b=True)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 16, 16))  # non-trivial BN statistics
    merged = merge(model)
    assert [type(m) for m in merged.modules()] == [type(m) for m in base.modules()]
    assert set(merged.state_dict()) == set(base.state_dict()) and merged.arch == base.arch
    x = torch.randn(8, 3, 16, 16)
    assert count_params(merged) == count_params(base) and count_macs(merged, x) == count_macs(base, x)
    report = check_merge(model, merged, [x, torch.rand(4, 3, 16, 16)])
    assert report["max_rel_diff"] <= 1e-5
    model.eval(), merged.eval()
    with torch.no_grad():
        a, b = model(x), merged(x)
        assert not torch.allclose(a, base.eval()(x))  # the low-rank term matters ...
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()  # ... and is merged exactly
    with torch.no_grad():
        merged.fc.weight.add_(0.01)
    with pytest.raises(MergeError, match="merge check failed"):
        check_merge(model, merged, [x])


def test_branch_size_against_hand_values():
    _, model = lowrank_model()
    x = torch.randn(6, 3, 16, 16)
    fresh = branch_size(model, x)  # B = 0: no branch
    assert fresh["weight_ratio_max"] == 0.0 and fresh["logit_share"] == 0.0 and fresh["samples"] == 6
    general = copy.deepcopy(model).eval()
    with torch.no_grad():  # one entry of fc's B·A: 0.5 * 3 at (0, 0) -> ratio 1.5 / ||W_fc||
        model.fc.more_A.zero_()
        model.fc.more_A[0, 0] = 3.0
        model.fc.more_B[0, 0] = 0.5
        expected_ratio = 1.5 / float(model.fc.weight.norm())
        model.train()
        model(torch.randn(16, 3, 16, 16))  # moves the BN statistics: the logit share is measured in eval mode
        general.load_state_dict(model.state_dict())
        for _, m in lowrank_layers(general):
            m.more_B.zero_()
        z_full, z_gen = model.eval()(x), general(x)
    model.train()
    size = branch_size(model, x)
    assert size["weight_ratio_max"] == pytest.approx(expected_ratio, rel=1e-5)
    assert size["weight_ratio_max_layer"] == "fc"
    assert size["weight_ratio_median"] == 0.0  # every other layer has B = 0
    share = float((z_full - z_gen).norm(dim=1).mean() / z_full.norm(dim=1).mean())
    assert share > 0 and size["logit_share"] == pytest.approx(share, rel=1e-5)
    assert model.training  # the mode is restored


def test_general_pass_leaves_bn_statistics_and_computes_base_weights():
    base, model = lowrank_model(randomize_b=True)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith(("more_A", "more_B"))})
    model.train(), base.train()
    x = torch.randn(8, 3, 16, 16)
    before = bn_buffers(model)
    with torch.no_grad(), general_only(model):
        z_gen = model(x)
    after = bn_buffers(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # running_mean / var / num_batches_tracked
    assert torch.equal(z_gen, base(x))  # f(x; W_g) with batch statistics, as the plain model in train mode
    assert all(bn.track_running_stats for bn in model.modules() if isinstance(bn, nn.BatchNorm2d))
    with torch.no_grad():
        z_full = model(x)  # the full pass does update them
    assert not torch.equal(z_full, z_gen)
    assert int(model.bn1.num_batches_tracked) == int(before["bn1.num_batches_tracked"]) + 1
    assert not torch.equal(model.bn1.running_mean, before["bn1.running_mean"])


# ----------------------------------------------------------------------------------------------- schedule, loss
def test_schedule_values():
    A, T = 20.0, 200
    assert schedule_value("sine", A, 0, T) == 0.0
    assert schedule_value("sine", A, 100, T) == A
    assert schedule_value("sine", A, 200, T) == 0.0
    assert math.isclose(schedule_value("sine", A, 50, T), A * math.sin(math.pi / 4))
    assert all(schedule_value("constant", A, t, T) == A for t in (0, 100, 200))
    assert schedule_value("cosine", A, 0, T) == A
    assert math.isclose(schedule_value("cosine", A, 100, T), A / 2)
    assert math.isclose(schedule_value("cosine", A, 200, T), 0.0, abs_tol=1e-12)
    assert math.isclose(schedule_value("cosine", A, 50, T), A * (1 + math.cos(math.pi / 4)) / 2)


def tiny_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4))
    reparametrize(model, 0.5, "all")  # rank max(1, round(0.5 * 3)) = 2
    lin = model[0]
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 2.0, 1.0], [-1.0, 1.0, 0.0]]))
        lin.bias.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]))
        lin.more_A.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]))
        lin.more_B.copy_(torch.tensor([[0.5, 0.0], [0.0, -1.0], [0.0, 0.0], [1.0, 1.0]]))
    return model


def test_loss_by_hand():
    model = tiny_linear()
    lin = model[0]
    assert lin.more_A.shape == (2, 3)
    x = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 1.0], [2.0, 0.0, 1.0]])
    y = torch.tensor([0, 2, 3])
    counts = [6, 1, 2, 1]
    prior = torch.tensor(counts, dtype=torch.float32) / 10
    ce = build_loss("ce", counts)
    W_g, BA = lin.weight.detach(), torch.tensor([[0.5, 0, 0], [0, -1, -1], [0, 0, 0], [1, 1, 1]])
    z_full = x @ (W_g + BA).t() + lin.bias.detach()
    z_gen = x @ W_g.t() + lin.bias.detach()
    # by hand: x0 -> delta = BA x0 = (0.5, -2, 0, 3), x1 -> (0, 0, 0, 0), x2 -> (1, -1, 0, 3)
    assert torch.allclose(z_full - z_gen, torch.tensor([[0.5, -2, 0, 3], [0, 0, 0, 0], [1, -1, 0, 3.0]]))
    d2 = torch.tensor([0.25 + 4 + 9, 0.0, 1 + 1 + 9])
    expected_term = float((torch.tensor([0.6, 0.2, 0.1]) * d2).mean())  # pi_y = 0.6, 0.2, 0.1
    assert math.isclose(expected_term, (0.6 * 13.25 + 0.1 * 11) / 3, rel_tol=1e-6)
    alpha = 3.0
    loss, parts = more_loss(model, x, y, ce, prior, alpha, "l2")
    assert torch.allclose(parts["logits"], z_full, atol=1e-6)
    assert math.isclose(float(parts["more"].detach()), expected_term, rel_tol=1e-6)
    assert math.isclose(float(loss.detach()), float(F.cross_entropy(z_full, y)) + alpha * expected_term, rel_tol=1e-6)
    detached, _ = more_loss(model, x, y, ce, prior, alpha, "l2", detach_general=True)
    assert math.isclose(float(detached.detach()), float(loss.detach()), rel_tol=1e-6)
    # KL(softmax(z_gen) || softmax(z_full)) per sample
    p, q = z_gen.softmax(1), z_full.softmax(1)
    kl = (p * (p.log() - q.log())).sum(1)
    assert torch.allclose(discrepancy(z_full, z_gen, "kl"), kl, atol=1e-6)
    _, parts_kl = more_loss(model, x, y, ce, prior, alpha, "kl")
    assert math.isclose(float(parts_kl["more"].detach()), float((prior[y] * kl).mean()), rel_tol=1e-5)


def test_detach_general_blocks_gradient_through_general_pass():
    model = tiny_linear()
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0])
    prior = torch.full((4,), 0.25)
    zero = lambda logits, target: logits.sum() * 0  # noqa: E731  (isolate the MORE term)
    grads = {}
    for detach in (False, True):
        model.zero_grad()
        more_loss(model, x, y, zero, prior, 1.0, "l2", detach)[0].backward()
        grads[detach] = model[0].weight.grad.clone()
    # D = ||x (BA)^T||^2 does not depend on W_g when both passes carry gradients; it does when z_gen is constant
    assert torch.allclose(grads[False], torch.zeros(4, 3), atol=1e-6)
    assert grads[True].abs().max() > 1e-3


def method_for(tmp_path, **options):
    raw = tiny_config()
    raw["method"] = {"name": "more", **options}
    cfg = config_from_dict(raw)
    prepare_run_dir(cfg, tmp_path / "run")
    return Trainer(cfg, tmp_path / "run", log=lambda m: None)


def test_amplitude_zero_is_exactly_the_base_loss(tmp_path):
    trainer = method_for(tmp_path, amplitude=0.0, schedule="constant")
    ctx, method = trainer.ctx, trainer.method
    with torch.no_grad():
        for _, m in lowrank_layers(ctx.model):
            m.more_B.normal_(0, 0.05)
    x, y = next(iter(trainer.train_loader))
    ctx.epoch = 1
    loss = method.training_loss(ctx, x, y)
    reference = trainer.loss_fn(ctx.model(x).float(), y)
    assert method.alpha(ctx) == 0.0 and torch.equal(loss, reference)


def test_method_loss_at_start_equals_base_loss_and_alpha_normalisation(tmp_path):
    trainer = method_for(tmp_path, amplitude=2.0, schedule="constant")
    ctx, method = trainer.ctx, trainer.method
    assert method.amplitude_raw == 8.0 and method.alpha(ctx) == 8.0  # A = A' * C, C = 4
    assert torch.allclose(method.prior, torch.tensor([35, 18, 8, 4.0]) / 65)
    x, y = next(iter(trainer.train_loader))
    before = bn_buffers(ctx.model)
    loss = method.training_loss(ctx, x, y)  # B = 0: the discrepancy is exactly zero
    assert method.epoch_acc["loss_more"] == 0.0
    after = bn_buffers(ctx.model)
    assert all(torch.equal(after[k], before[k] + 1) for k in before if k.endswith("num_batches_tracked"))  # once
    ctx.model.train()
    assert torch.allclose(loss, trainer.loss_fn(ctx.model(x).float(), y))


def test_options_validation_and_recipes():
    raw = tiny_config()
    for bad in ({"ratio": 0.0}, {"ratio": 1.5}, {"amplitude": -1.0}, {"schedule": "linear"}, {"discrepancy": "l1"},
                {"layers": "bn"}, {"rank": 4}):
        raw["method"] = {"name": "more", **bad}
        with pytest.raises(ConfigError):
            config_from_dict(raw)
    for name, loss, amplitude in (("cifar10_lt_ir100_resnet32_bs_more", "balanced_softmax", 2.0),
                                  ("cifar10_lt_ir100_resnet32_ce_more", "ce", 2.0),
                                  ("cifar10_lt_ir100_resnet32_bs_more_a0", "balanced_softmax", 0.0)):
        cfg = load_config(find_recipe(name))
        base = load_config(find_recipe(name.replace("_more", "").replace("_a0", "")))
        assert cfg.method["name"] == "more" and cfg.method["amplitude"] == amplitude and cfg.loss.name == loss
        assert (cfg.data, cfg.model, cfg.loss, cfg.train) == (base.data, base.model, base.loss, base.train)
        assert MoreOptions(**{k: v for k, v in cfg.method.items() if k != "name"}).ratio == 0.1


# ------------------------------------------------------------------------------------------------------- runs
def more_config(**method):
    raw = tiny_config()
    raw["method"] = {"name": "more", **method}
    return raw


def make_more_trainer(tmp_path, name="run", raw=None) -> Trainer:
    return trainer_for(raw or more_config(), tmp_path / name)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    trainer = make_more_trainer(tmp_path_factory.mktemp("more_full"))
    result = trainer.fit()
    return trainer, result


def test_end_to_end_run_deploys_a_plain_dense_model(full_run):
    trainer, result = full_run
    saved = json.loads((trainer.out / "result.json").read_text())
    cost = saved["cost"]
    dense = build_model("resnet20", 4)
    example = torch.zeros(1, 3, 16, 16)
    assert cost["params"] == cost["params_dense"] == count_params(dense)
    assert cost["macs"] == cost["macs_dense"] == count_macs(dense, example) and cost["F"] == 100.0
    method = saved["method"]
    assert method["name"] == "more" and method["amplitude"] == 2.0 and method["amplitude_raw"] == 8.0
    assert method["merge_check"]["max_rel_diff"] <= 1e-5 and method["merge_check"]["samples"] == 8 + 32
    assert method["lowrank_params"] > 0 and method["layers_reparametrised"] == len(method["ranks"])
    assert method["branch"]["weight_ratio_max"] > 0 and method["branch"]["logit_share"] > 0
    overhead = method["overhead"]
    assert overhead["steps_without"] == 4 and overhead["steps_with"] == 10  # epoch 0: alpha = 0 (step 0 untimed)
    assert overhead["ratio"] > 0
    records = trainer.metrics.records()
    assert [r["more_alpha"] for r in records] == [0.0, pytest.approx(8 * math.sin(math.pi / 3)),
                                                  pytest.approx(8 * math.sin(2 * math.pi / 3))]
    assert records[0]["more_loss"] == 0.0 and records[1]["more_loss"] > 0.0
    # the saved model is the plain registry network and reproduces the trained low-rank model's logits
    deployed = load_model(trainer.out)
    assert set(deployed.state_dict()) == set(dense.state_dict())
    x = torch.randn(5, 3, 16, 16)
    trainer.ctx.model.eval()
    with torch.no_grad():
        a, b = trainer.ctx.model(x), deployed(x)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    assert any(m.more_B.abs().sum() > 0 for _, m in lowrank_layers(trainer.ctx.model))  # the branch trained


def test_normed_head_ldam_run(tmp_path):
    raw = more_config(unit="step", discrepancy="kl", detach_general=True)
    raw["loss"] = {"name": "ldam_drw", "drw_epoch": 0}
    raw["train"]["epochs"] = 1
    trainer = make_more_trainer(tmp_path, raw=raw)
    assert type(trainer.ctx.model.fc).__name__ == "MoreNormedLinear"
    result = trainer.fit()
    assert result["cost"]["params"] == result["cost"]["params_dense"] and result["cost"]["F"] == 100.0
    deployed = load_model(trainer.out)
    x = torch.randn(3, 3, 16, 16)
    trainer.ctx.model.eval()
    with torch.no_grad():
        a, b = trainer.ctx.model(x), deployed(x)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_resume_mid_epoch_equals_uninterrupted(tmp_path, full_run):
    full, full_result = full_run
    first = make_more_trainer(tmp_path)
    stop_after(first, 8)  # mid-epoch 1, where the MORE loss is on
    with pytest.raises(Interrupted):
        first.fit()
    resumed = Trainer(first.cfg, first.out, log=lambda msg: None)
    resumed.resume()
    assert resumed.start_epoch == 1 and resumed.train_loader.position == 3
    result = resumed.fit()
    full_state = full.ctx.model.state_dict()
    for key, value in resumed.ctx.model.state_dict().items():
        assert torch.equal(value, full_state[key]), key
    assert result["accuracy"] == full_result["accuracy"]
    timing = ("time_s", "more_step_s", "more_general_fwd_s")
    strip = lambda recs: [{k: v for k, v in r.items() if k not in timing} for r in recs]  # noqa: E731
    assert strip(resumed.metrics.records()) == strip(full.metrics.records())
    assert isinstance(resumed.method, MoreRebalancing)
    assert load_model(resumed.out).state_dict().keys() == load_model(full.out).state_dict().keys()
