"""MORE (``method: more``): low-rank reparametrisation, general-only pass, loss, schedule, merge, runs, resume."""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tailwise.compress.cost import count_macs, count_params
from tailwise.config import config_from_dict, load_config
from tailwise.deploy import load_model
from tailwise.engine.rundir import prepare_run_dir
from tailwise.engine.trainer import Interrupted, Trainer
from tailwise.errors import ConfigError
from tailwise.losses import build_loss
from tailwise.methods.more import (MergeError, MOREMethod, MOREOptions, branch_parameters, branch_size, check_merge,
                                   discrepancy, general_logits, general_only, general_parameters, lowrank_layers,
                                   lowrank_rank, merge, more_loss, reparametrize, schedule_value)
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


def assert_same_state(model, expected):
    """Bit for bit the same parameters and buffers, under the same names."""
    got, want = model.state_dict(), expected.state_dict()
    assert set(got) == set(want)
    for key, value in got.items():
        assert torch.equal(value, want[key]), key


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
    model_full, model_gen = model(x), general_logits(model, x)
    assert torch.allclose(model_full, z_full, atol=1e-6) and torch.allclose(model_gen, z_gen, atol=1e-6)
    loss, parts = more_loss(model_full, model_gen, y, prior, alpha, ce, "l2")
    assert math.isclose(float(parts["more"].detach()), expected_term, rel_tol=1e-6)
    assert math.isclose(float(parts["base"].detach()), float(F.cross_entropy(z_full, y)), rel_tol=1e-6)
    assert math.isclose(float(loss.detach()), float(F.cross_entropy(z_full, y)) + alpha * expected_term, rel_tol=1e-6)
    detached, _ = more_loss(model_full, general_logits(model, x, detach=True), y, prior, alpha, ce, "l2")
    assert math.isclose(float(detached.detach()), float(loss.detach()), rel_tol=1e-6)
    # alpha = 0: exactly the base loss, no general pass needed (the default base loss is cross-entropy)
    base_only, parts0 = more_loss(model_full, None, y, prior, 0.0)
    assert torch.equal(base_only, F.cross_entropy(model_full, y)) and set(parts0) == {"base"}
    # KL(softmax(z_gen) || softmax(z_full)) per sample
    p, q = z_gen.softmax(1), z_full.softmax(1)
    kl = (p * (p.log() - q.log())).sum(1)
    assert torch.allclose(discrepancy(z_full, z_gen, "kl"), kl, atol=1e-6)
    _, parts_kl = more_loss(model_full, model_gen, y, prior, alpha, ce, "kl")
    assert math.isclose(float(parts_kl["more"].detach()), float((prior[y] * kl).mean()), rel_tol=1e-5)


def test_detach_general_blocks_gradient_through_general_pass():
    model = tiny_linear()
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0])
    prior = torch.full((4,), 0.25)
    zero = lambda logits, target: logits.sum() * 0  # noqa: E731  (isolate the MORE term)
    grads = {}
    for detach in (False, True):
        model.zero_grad()
        more_loss(model(x), general_logits(model, x, detach), y, prior, 1.0, zero, "l2")[0].backward()
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
                {"layers": "bn"}, {"rank": 4}, {"general": "fixed"}, {"general_lr_scale": 0.0},
                {"general_lr_scale": 2.0}, {"branch_lr_scale": 0.0}, {"start_epoch": -1}, {"start_epoch": 3},
                {"branch_weight_decay": -1e-4},
                {"general": "frozen"}):  # frozen needs a trained W_g: start_epoch > 0
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
        assert MOREOptions(**{k: v for k, v in cfg.method.items() if k != "name"}).ratio == 0.1


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

# ------------------------------------------------------------------------------ the phase: frozen / slow W_g
def test_branch_share_by_group_on_a_planted_branch():
    model = tiny_linear()  # B·A = [[.5, 0, 0], [0, -1, -1], [0, 0, 0], [1, 1, 1]] planted by hand
    x = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 1.0], [2.0, 0.0, 1.0], [1.0, 2.0, 0.0]])
    y = torch.tensor([0, 2, 3, 1])
    groups = {"many": [0, 1], "medium": [2], "few": [3]}
    size = branch_size(model, x, y, groups)
    # by hand: W_g + BA = [[1.5, 0, -1], [.5, -.5, -1], [0, 2, 1], [0, 2, 1]], bias (.1, -.2, 0, .3)
    # z_full: x0 = x3 -> (1.6, -0.7, 4, 4.3), x1 -> (-.9, -.7, -1, -.7), x2 -> (2.1, -0.2, 1, 1.3)
    # z_full - z_gen = B·A x: x0 = x3 -> (.5, -2, 0, 3), x1 -> 0, x2 -> (1, -1, 0, 3)
    n0, n1, n2 = math.sqrt(1.6**2 + .7**2 + 16 + 4.3**2), math.sqrt(.81 + .49 + 1 + .49), math.sqrt(2.1**2 + .04 + 1 + 1.69)
    d0, d2 = math.sqrt(13.25), math.sqrt(11.0)
    assert size["logit_share_by_group"]["many"] == pytest.approx(d0 / n0, rel=1e-5)  # samples 0 and 3: the same
    assert size["logit_share_by_group"]["medium"] == 0.0  # sample 1: x in the null space of B·A
    assert size["logit_share_by_group"]["few"] == pytest.approx(d2 / n2, rel=1e-5)
    assert size["samples_by_group"] == {"many": 2, "medium": 1, "few": 1}
    assert size["logit_share"] == pytest.approx((2 * d0 + d2) / (2 * n0 + n1 + n2), rel=1e-5)
    assert size["weight_ratio"] == {"0": pytest.approx(math.sqrt(5.25 / 9.5), rel=1e-5)}  # ||BA||_F / ||W_g||_F
    assert branch_size(model, x, y, {"many": [0], "none": []})["logit_share_by_group"]["none"] is None


def phase_config(epochs=4, **method):
    raw = tiny_config(epochs=epochs, milestones=[3])
    raw["method"] = {"name": "more", "start_epoch": 2, "schedule": "constant", **method}
    return raw


def general_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()
            if not k.endswith(("more_A", "more_B", "running_mean", "running_var", "num_batches_tracked"))}


@pytest.fixture(scope="module")
def plain_source(tmp_path_factory):
    raw = tiny_config(epochs=4, milestones=[3])
    raw["run"]["keep_checkpoints"] = [2]
    trainer = trainer_for(raw, tmp_path_factory.mktemp("plain") / "run")
    trainer.fit()
    return trainer


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory, plain_source):
    trainer = trainer_for(phase_config(general="frozen"), tmp_path_factory.mktemp("frozen") / "run")
    trainer.branch(plain_source.out / "checkpoints" / "epoch_002.pt")
    return trainer, trainer.fit()


def test_frozen_keeps_general_weights_bit_identical_and_merges_exactly(frozen_run, plain_source):
    trainer, result = frozen_run
    start = torch.load(plain_source.out / "checkpoints" / "epoch_002.pt", weights_only=True)["model"]
    model = trainer.ctx.model
    end = general_state(model)
    assert set(end) == {k for k in start if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    for key, value in end.items():  # conv / linear weights, biases, BN affine: untouched for two epochs
        assert torch.equal(value, start[key]), key
    assert not torch.equal(model.bn1.running_mean, start["bn1.running_mean"])  # the full path's statistics
    assert all(not p.requires_grad for p in general_parameters(model))
    assert all(p.requires_grad for p in branch_parameters(model))
    assert any(m.more_B.abs().sum() > 0 for _, m in lowrank_layers(model))  # the branch trained
    method = result["method"]
    assert method["merge_check"]["max_rel_diff"] <= 1e-5 and method["phase"]["general"] == "frozen"
    assert method["phase"]["general_pass_grad"] is False and method["branch"]["logit_share"] > 0
    assert set(method["branch"]["logit_share_by_group"]) == {"many", "medium", "few"}
    deployed = load_model(trainer.out)
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        a, b = model(x), deployed(x)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    # alpha's schedule counts the phase: constant A = 8 in both phase epochs; nothing MORE before the phase
    records = trainer.metrics.records()
    assert [r.get("more_alpha") for r in records] == [None, None, 8.0, 8.0]
    assert [p["params"] for p in trainer.ctx.optimizer.param_groups] == [branch_parameters(model)]


def test_phase_from_scratch_equals_the_branch_and_resumes_exactly(tmp_path, frozen_run):
    branched, branched_result = frozen_run
    first = trainer_for(phase_config(general="frozen"), tmp_path / "scratch")
    stop_after(first, 12)  # 5 steps per epoch: mid-epoch 2, inside the phase
    with pytest.raises(Interrupted):
        first.fit()
    assert hasattr(first.ctx.model.fc, "more_B")
    resumed = Trainer(first.cfg, first.out, log=lambda msg: None)
    assert not hasattr(resumed.ctx.model.fc, "more_B")  # a fresh trainer: plain until the checkpoint says otherwise
    resumed.resume()
    assert resumed.start_epoch == 2 and resumed.train_loader.position == 2
    result = resumed.fit()
    assert_same_state(resumed.ctx.model, branched.ctx.model)
    assert result["accuracy"] == branched_result["accuracy"]


@pytest.mark.parametrize("general, branch_scale", [("slow", 1.0), ("joint", 1.0), ("slow", 8.0)])
def test_slow_general_and_branch_train_at_their_scaled_rates(tmp_path, general, branch_scale):
    raw = phase_config(epochs=3, general=general, general_lr_scale=0.25, branch_weight_decay=0.0,
                       branch_lr_scale=branch_scale)
    trainer = trainer_for(raw, tmp_path / "run")
    result = trainer.fit()
    branch_group, general_group = trainer.ctx.optimizer.param_groups
    lr = trainer.schedule(2)  # the last epoch's rate
    scale = 0.25 if general == "slow" else 1.0
    assert general_group["lr"] == pytest.approx(lr * scale) and branch_group["lr"] == pytest.approx(lr * branch_scale)
    assert result["method"]["phase"]["branch_lr_scale"] == branch_scale
    assert branch_group["weight_decay"] == 0.0 and general_group["weight_decay"] == 2e-4  # train.weight_decay
    assert general_group["params"] == general_parameters(trainer.ctx.model)
    assert branch_group["params"] == branch_parameters(trainer.ctx.model)
    assert trainer.metrics.records()[-1]["lr"] == pytest.approx(lr)  # the schedule's rate, not a group's scaled one


def test_merge_of_a_users_model_restores_its_classes_and_leaves_the_source():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 5))  # no .arch: not a registry network
    reparametrize(model, 0.25, "all", torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _, m in lowrank_layers(model):
            m.more_B.normal_(0, 0.1)
    for p in general_parameters(model):
        p.requires_grad_(False)  # as in a frozen phase
    merged = merge(model)
    assert [type(m) for m in merged.modules()] == [nn.Sequential, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Flatten,
                                                   nn.Linear]
    assert sorted(merged.state_dict()) == sorted(k for k in model.state_dict() if "more_" not in k)
    assert all(p.requires_grad for p in merged.parameters())
    expected = model[0].weight + (model[0].more_B @ model[0].more_A).view(8, 3, 3, 3)
    assert torch.equal(merged[0].weight, expected)  # W_g + B·A exactly
    assert len(lowrank_layers(model)) == 2  # the source is still the reparametrised model
    x = torch.randn(4, 3, 6, 6)
    report = check_merge(model, merged, [x])
    assert report["max_rel_diff"] <= 1e-5


def test_phase_recipes_branch_from_the_finetune_recipe():
    source = load_config(find_recipe("cifar10_lt_ir100_resnet32_bs_finetune"))
    plain = load_config(find_recipe("cifar10_lt_ir100_resnet32_bs"))
    assert source.method == {"name": "none"} and source.run.keep_checkpoints == [160]
    assert (source.data, source.model, source.loss, source.train) == (plain.data, plain.model, plain.loss, plain.train)
    for name, general, amplitude in (("cifar10_lt_ir100_resnet32_bs_more_frozen", "frozen", 2.0),
                                     ("cifar10_lt_ir100_resnet32_bs_more_frozen_a0", "frozen", 0.0),
                                     ("cifar10_lt_ir100_resnet32_bs_more_slow", "slow", 2.0)):
        cfg = load_config(find_recipe(name))
        m = cfg.method
        assert (m["name"], m["general"], m["amplitude"], m["start_epoch"]) == ("more", general, amplitude, 160)
        assert m["general_lr_scale"] == 0.1 and m["ratio"] == 0.1 and m["branch_weight_decay"] is None
        assert m["branch_lr_scale"] == 1.0
        # everything a branch must share with its source (tailwise.engine.branch): 40 epochs of phase
        assert (cfg.data, cfg.model, cfg.loss, cfg.train, cfg.run.seed) == (
            source.data, source.model, source.loss, source.train, source.run.seed)
        assert cfg.train.epochs - m["start_epoch"] == 40


def test_alpha_counts_the_phase_in_epochs_and_steps():
    def alpha(unit, epoch, step):
        method = MOREMethod(MOREOptions(start_epoch=2, unit=unit))
        method.num_classes, method.steps_per_epoch = 4, 5  # A = 2 x 4 = 8; the phase: epochs 2..5, steps 10..29
        ctx = SimpleNamespace(epoch=epoch, step=step, cfg=SimpleNamespace(train=SimpleNamespace(epochs=6)))
        return method.alpha(ctx)

    assert alpha("epoch", 2, 10) == 0.0  # the phase's first epoch: sin(0)
    assert alpha("epoch", 4, 20) == pytest.approx(8.0)  # tau / T = 2 / 4
    assert alpha("epoch", 3, 15) == pytest.approx(8 * math.sin(math.pi / 4))
    assert alpha("step", 2, 10) == 0.0
    assert alpha("step", 4, 20) == pytest.approx(8.0)  # 10 of 20 phase steps
    assert alpha("step", 2, 15) == pytest.approx(8 * math.sin(math.pi / 4))  # 5 of 20


def test_overhead_benchmark_times_the_library_loss():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "more_overhead.py"), "--steps", "1", "--batch", "4"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["model"] == "resnet32" and out["batch"] == 4
    assert out["ratio_more_vs_base_only"] == pytest.approx(out["more_step_s"] / out["lowrank_base_only_step_s"], rel=1e-2)
    assert all(out[k] > 0 for k in ("dense_step_s", "lowrank_base_only_step_s", "more_step_s", "more_detached_step_s"))
