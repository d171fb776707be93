"""Structured pruning methods (magnitude, taylor, random) and the StructuredPruning schedule they share.

Tiny synthetic runs as in ``test_engine.py`` (ResNet-20, 4 classes, 16x16 images, 5 batches per epoch); the
selection rule is also tested directly on a set-up method with hand-made scores, and every budget is checked
against the physically compressed model (``sum(p.numel())``, ``FlopCounterMode``), not the mask-aware counter.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import tailwise
from tailwise.compress.masks import ChannelMasks
from tailwise.compress.slim import compress
from tailwise.data.dataset import Split
from tailwise.config import config_from_dict
from tailwise.engine.rundir import prepare_run_dir
from tailwise.engine.trainer import Interrupted, Trainer
from tailwise.errors import ConfigError
from tailwise.methods.pruning import MagnitudePruner, PruningOptions, TaylorPruner
from tailwise.models import build_model

from test_engine import stop_after, tiny_config, weights

# ResNet-20: three stages of three BasicBlocks, widths 16/32/64. Groups: one per block-internal conv (9) and one
# per residual stream (3); channels 3*(16+32+64) + (16+32+64).
RESNET20_CHANNELS = 3 * (16 + 32 + 64) + (16 + 32 + 64)
assert RESNET20_CHANNELS == 448


def pruning_config(method: dict, epochs: int = 3, seed: int = 3) -> dict:
    raw = tiny_config(epochs=epochs)
    raw["method"] = {"start_epoch": 1, "stages": 2, "stage_interval": 1, **method}
    raw["run"]["seed"] = seed
    return raw


def run(tmp_path, method: dict, name="run", **kw) -> Trainer:
    cfg = config_from_dict(pruning_config(method, **kw))
    out = tmp_path / name
    prepare_run_dir(cfg, out)
    trainer = Trainer(cfg, out, log=lambda msg: None)
    trainer.result = trainer.fit()
    return trainer


def live_channels_of(model) -> int:
    """Channels of a (compressed) ResNet-20 counted from its layer shapes: every block's conv1 outputs, plus
    the three residual streams (stem output, the two projection outputs)."""
    blocks = [b for stage in (model.layer1, model.layer2, model.layer3) for b in stage]
    internal = sum(b.conv1.out_channels for b in blocks)
    streams = [model.conv1.out_channels, model.layer2[0].shortcut[0].out_channels,
               model.layer3[0].shortcut[0].out_channels]
    for stage, width in zip((model.layer1, model.layer2, model.layer3), streams):
        assert all(b.conv2.out_channels == width for b in stage)
    assert model.fc.in_features == streams[-1]
    return internal + sum(streams)


# --------------------------------------------------------------------------------------------- tiny runs
TARGETS = {"params": {"target_params": 0.3}, "macs": {"target_macs": 0.4}, "sparsity": {"target_sparsity": 0.45, "round_to": 1}}


@pytest.fixture(scope="module", params=list(TARGETS))
def magnitude_run(request, tmp_path_factory):
    trainer = run(tmp_path_factory.mktemp(request.param), {"name": "magnitude", **TARGETS[request.param]})
    return request.param, trainer


def test_magnitude_run_meets_its_target(magnitude_run):
    kind, trainer = magnitude_run
    out, result = trainer.out, trainer.result
    saved = json.loads((out / "result.json").read_text())
    c = saved["cost"]
    dense_model = build_model("resnet20", 4)
    assert c["params_dense"] == sum(p.numel() for p in dense_model.parameters())
    assert c["F"] < 100 and c["params"] < c["params_dense"]

    model = tailwise.load_model(out)
    params = sum(p.numel() for p in model.parameters())
    assert params == c["params"] < c["params_dense"]
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 16, 16))
    assert counter.get_total_flops() == 2 * c["macs"]
    assert math.isclose(c["F"], 100 * c["macs"] / c["macs_dense"], abs_tol=1e-4)

    target = TARGETS[kind]
    if kind == "params":
        assert c["params"] <= 0.3 * c["params_dense"]
    elif kind == "macs":
        assert c["macs"] <= 0.4 * c["macs_dense"] and c["F"] <= 40 + 1e-4
    else:  # at least 45% of the 448 channels removed, and no more than needed
        live = live_channels_of(model)
        assert live == math.floor((1 - target["target_sparsity"]) * RESNET20_CHANNELS) == 246
        assert saved["method"]["live_channels"] == live and saved["method"]["channels"] == RESNET20_CHANNELS

    history = saved["method"]["history"]
    assert [h["stage"] for h in history] == [1, 2] and [h["epoch"] for h in history] == [0, 1]
    assert saved["method"]["stage_epochs"] == [1, 2]
    assert sum(h["removed_channels"] for h in history) == RESNET20_CHANNELS - live_channels_of(model)

    records = trainer.metrics.records()
    active = [r["active_params"] for r in records]
    assert len(active) == 3 and all(a >= b for a, b in zip(active, active[1:]))
    assert active[0] < c["params_dense"] and active[-1] == c["params"]
    assert records[-1]["active_macs"] == c["macs"]
    assert [r.get("pruning_stage", {}).get("stage") for r in records] == [1, 2, None]
    # the per-producer live widths logged at the end equal the deployed model's layer widths
    widths = records[-1]["live_channels"]
    for name, n in widths.items():
        assert model.get_submodule(name).out_channels == n, name
    assert result["accuracy"] == saved["accuracy"]


# --------------------------------------------------------------------------------- selection on a set-up method
def set_up(cls=MagnitudePruner, **options):
    """A standalone pruner on a fresh ResNet-20 (what the trainer adapters drive)."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    example = Split(images, torch.zeros(len(images), dtype=torch.long)).example(1).float()
    return cls(build_model("resnet20", 4), example, cls.Options(**{"stages": 3, "round_to": 1, **options}))


def hand_scores(method, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(grp.size, generator=g, dtype=torch.float64) for grp in method.groups]


def physical(method, selection=None) -> dict:
    """Params and MACs of the model compressed under the method's masks (plus ``selection``)."""
    model = copy.deepcopy(method.model)
    masks = ChannelMasks(model, method.groups)
    masks.keep = [k.clone() for k in method.masks.keep]
    for gi, ch in (selection or {}).items():
        masks.keep[gi][ch] = False
    slim = compress(model, masks, method.example)
    with FlopCounterMode(display=False) as counter:
        slim(method.example)
    return {"params": sum(p.numel() for p in slim.parameters()), "macs": counter.get_total_flops() // 2,
            "channels": masks.num_live()}


def dense_cost(method) -> dict:
    model = method.model
    with FlopCounterMode(display=False) as counter:
        model.eval()(method.example)
    return {"params": sum(p.numel() for p in model.parameters()), "macs": counter.get_total_flops() // 2,
            "channels": RESNET20_CHANNELS}


@pytest.mark.parametrize("unit,key,r", [("params", "target_params", 0.3), ("macs", "target_macs", 0.45),
                                        ("channels", "target_sparsity", 0.6)])
def test_each_stage_meets_its_budget_with_the_fewest_channels(unit, key, r):
    method = set_up(**{key: r})
    dense = dense_cost(method)
    retained_final = 1 - r if unit == "channels" else r
    P = method.options.stages
    scores = hand_scores(method)
    for k in range(1, P + 1):
        budget = 1 - (1 - retained_final) * k / P
        got_unit, got_budget = method.budget(k)
        assert got_unit == unit and math.isclose(got_budget, budget, rel_tol=1e-12)
        selection = method.select(scores, k)
        assert selection
        after = physical(method, selection)
        assert after[unit] / dense[unit] <= budget
        # removing one channel fewer (the highest-scoring one chosen) would miss the budget
        chosen = [(float(scores[gi][c]), gi, int(c)) for gi, chs in selection.items() for c in chs]
        _, gi_last, c_last = max(chosen)
        fewer = {gi: chs[chs != c_last] if gi == gi_last else chs for gi, chs in selection.items()}
        assert physical(method, fewer)[unit] / dense[unit] > budget
        method.masks.prune(selection)
    if unit == "channels":
        assert method.masks.num_live() == math.floor(0.4 * RESNET20_CHANNELS)


def test_global_selection_honours_scores_and_spares_each_groups_best():
    method = set_up(target_params=0.5, stages=1)
    scores = hand_scores(method, seed=1)
    victim = next(i for i, g in enumerate(method.groups) if g.name == "layer3.1.conv1")
    scores = [s * 1e-3 if i == victim else 1 + s for i, s in enumerate(scores)]
    selection = method.select(scores, 1)
    size = method.groups[victim].size
    best = int(scores[victim].argmax())
    # every channel of the low-scoring group except its best goes
    assert sorted(selection[victim].tolist()) == sorted(set(range(size)) - {best})
    # the chosen channels are exactly the lowest-scoring candidates (each group's best is no candidate)
    chosen, rest = [], []
    for gi, s in enumerate(scores):
        picked = set(selection.get(gi, torch.tensor([], dtype=torch.long)).tolist())
        best_gi = int(s.argmax())
        assert best_gi not in picked
        for c in range(len(s)):
            if c != best_gi:
                (chosen if c in picked else rest).append(float(s[c]))
    assert max(chosen) <= min(rest)
    assert len(chosen) > size - 1  # the budget needed more than the victim group


def test_unreachable_budget_keeps_exactly_each_groups_best_channel():
    method = set_up(target_params=0.001, stages=1)
    scores = hand_scores(method, seed=2)
    method.masks.prune(method.select(scores, 1))
    for gi, s in enumerate(scores):
        assert method.masks.keep[gi].nonzero().flatten().tolist() == [int(s.argmax())]
    assert method.select(scores, 1) == {}  # nothing left to remove


def test_magnitude_scores_are_group_l2_norms():
    method = set_up(target_params=0.5, normalize="none")
    model = method.model
    with torch.no_grad():  # non-trivial BN parameters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-1, 1)
    scores = method.scores()
    gi = next(i for i, g in enumerate(method.groups) if g.name == "layer2.1.conv1")
    b = model.layer2[1]
    want = (b.conv1.weight.pow(2).sum((1, 2, 3)) + b.bn1.weight.pow(2) + b.bn1.bias.pow(2)
            + b.conv2.weight.pow(2).sum((0, 2, 3))).double().sqrt()
    assert torch.allclose(scores[gi], want.detach(), rtol=1e-6)
    # the residual stream of stage 3: projection + three conv2 + their BNs, the next conv1s and the classifier
    gi = next(i for i, g in enumerate(method.groups) if g.name == "layer3.0.shortcut.0")
    l3 = model.layer3
    want = l3[0].shortcut[0].weight.pow(2).sum((1, 2, 3)) + l3[0].shortcut[1].weight.pow(2) + l3[0].shortcut[1].bias.pow(2)
    for blk in l3:
        want = want + blk.conv2.weight.pow(2).sum((1, 2, 3)) + blk.bn2.weight.pow(2) + blk.bn2.bias.pow(2)
    for blk in l3[1:]:
        want = want + blk.conv1.weight.pow(2).sum((0, 2, 3))
    want = want + model.fc.weight.pow(2).sum(0)
    assert torch.allclose(scores[gi], want.detach().double().sqrt(), rtol=1e-6)
    normalized = MagnitudePruner(model, method.example, target_params=0.5).scores()  # default: / group mean
    assert torch.allclose(normalized[gi], scores[gi] / scores[gi].mean(), rtol=1e-9)


def test_taylor_window_accumulates_group_first_order_terms():
    method = set_up(TaylorPruner, target_params=0.5, normalize="none")
    model = method.model
    b = model.layer1[2]
    gi = next(i for i, g in enumerate(method.groups) if g.name == "layer1.2.conv1")
    want = torch.zeros(16, dtype=torch.float64)
    for step in range(2):
        model.zero_grad()
        x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(step))
        torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
        method.observe()
        term = ((b.conv1.weight * b.conv1.weight.grad).sum((1, 2, 3)) + b.bn1.weight * b.bn1.weight.grad
                + b.bn1.bias * b.bn1.bias.grad + (b.conv2.weight * b.conv2.weight.grad).sum((0, 2, 3)))
        want += term.detach().double().abs()
    scores = method.scores()
    assert torch.allclose(scores[gi], want, rtol=1e-5)
    assert method.window is None  # the window restarts after each stage


# ---------------------------------------------------------------------------------------- taylor, random
def test_taylor_and_random_runs(tmp_path):
    one_stage = {"stages": 1, "target_params": 0.5}
    taylor = run(tmp_path, {"name": "taylor", **one_stage}, "taylor", epochs=2)
    first = run(tmp_path, {"name": "random", **one_stage}, "random-a", epochs=2)
    again = run(tmp_path, {"name": "random", **one_stage}, "random-b", epochs=2)
    other = run(tmp_path, {"name": "random", **one_stage}, "random-c", epochs=2, seed=4)
    for t in (taylor, first, again, other):
        c = t.result["cost"]
        assert c["params"] <= 0.5 * c["params_dense"] and len(t.result["method"]["history"]) == 1
        assert sum(p.numel() for p in tailwise.load_model(t.out).parameters()) == c["params"]
    assert taylor.method.pruner.window is None
    assert all(t.method.shrunk for t in (taylor, first, again, other))  # the surviving channels: ``kept``
    assert all(torch.equal(a, b) for a, b in zip(first.method.kept, again.method.kept))
    assert first.result["cost"] == again.result["cost"]
    assert not all(torch.equal(a, b) for a, b in zip(first.method.kept, other.method.kept))
    # taylor and random choose differently
    assert not all(torch.equal(a, b) for a, b in zip(first.method.kept, taylor.method.kept))


# --------------------------------------------------------------------------------------------------- resume
RESUME_CASES = {
    "magnitude-hard": {"name": "magnitude", "target_params": 0.4},
    "random-hard": {"name": "random", "target_sparsity": 0.4},  # stage 2 draws from the restored generator
    # stage 1 decays over the 5 steps of epoch 1, which is also taylor's scoring window for stage 2
    "taylor-progressive": {"name": "taylor", "target_params": 0.4, "zeroing": "progressive"},
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_across_a_stage_equals_uninterrupted(tmp_path, case):
    method = RESUME_CASES[case]
    full = run(tmp_path, method, "full")
    cfg = config_from_dict(pruning_config(method))
    out = tmp_path / "interrupted"
    prepare_run_dir(cfg, out)
    first = Trainer(cfg, out, log=lambda msg: None)
    assert len(first.train_loader) == 5
    stop_after(first, 8)  # mid-epoch 1, after stage 1 (end of epoch 0)
    with pytest.raises(Interrupted):
        first.fit()
    assert len(first.method.history) == 1
    if method.get("zeroing") == "progressive":
        assert first.method.masks.decays and first.method.masks.decays[0].done == 3
        assert first.method.pruner.window is not None
    resumed = Trainer(cfg, out, log=lambda msg: None)
    resumed.resume()
    assert resumed.start_epoch == 1
    result = resumed.fit()
    assert resumed.method.shrunk == (method.get("zeroing") != "progressive")  # the decay ends in the last epoch

    for key, value in weights(full).items():
        assert torch.equal(value, resumed.ctx.model.state_dict()[key]), key
    assert all(torch.equal(a, b) for a, b in zip(full.method.masks.keep, resumed.method.masks.keep))
    assert resumed.method.history == full.method.history
    assert result["accuracy"] == full.result["accuracy"] and result["cost"] == full.result["cost"]
    strip = lambda recs: [{k: v for k, v in r.items() if k != "time_s"} for r in recs]  # noqa: E731
    assert strip(resumed.metrics.records()) == strip(full.metrics.records())
    a, b = tailwise.load_model(full.out), tailwise.load_model(out)
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("method,match", [
    ({"target_params": 0.3, "target_macs": 0.5}, "only one"),
    ({"target_sparsity": 0.5, "target_params": 0.5}, "only one"),
    ({"target_params": 0.0}, "out of range"),
    ({"target_params": 1.0}, "out of range"),
    ({"target_macs": 1.5}, "out of range"),
    ({"target_sparsity": -0.1}, "out of range"),
    ({"zeroing": "soft"}, "method.zeroing: 'soft' is not allowed; allowed: hard, progressive"),
    ({"round_to": 0}, "method.round_to: 0 is out of range; must be >= 1"),
    ({"start_epoch": 2, "stages": 2, "stage_interval": 1}, "last pruning stage"),  # stage 2 after epoch 3 > 2
    ({"start_epoch": 1, "stages": 3, "stage_interval": 1}, "last pruning stage"),  # epoch 3 > 2
])
def test_config_errors(tmp_path, method, match):
    raw = pruning_config({"name": "magnitude", **method}, epochs=2)
    with pytest.raises(ConfigError, match=match):
        config_from_dict(raw)
    # through the public entry point nothing is written
    import yaml

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=match):
        tailwise.run(recipe, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_valid_pruning_config_fills_the_default_target():
    cfg = config_from_dict(pruning_config({"name": "magnitude", "start_epoch": 2, "stages": 2}, epochs=3))
    assert cfg.method["target_params"] == 0.3 and cfg.method["target_macs"] is None
    # the default is the options dataclass's own, and only where no other target is given
    assert PruningOptions().target_params == 0.3 and PruningOptions(target_macs=0.5).target_params is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pruning_run_on_cuda_reloads_its_cpu_state(tmp_path):
    """Checkpoints load onto the run's device; the method's masks, generator and Taylor window must come back
    to the CPU (``finish`` reloads ``best.pt`` through ``method.load_state_dict``)."""
    raw = pruning_config({"name": "taylor", "target_params": 0.5})
    raw["run"]["device"] = "cuda"
    cfg = config_from_dict(raw)
    prepare_run_dir(cfg, tmp_path / "run")
    trainer = Trainer(cfg, tmp_path / "run", log=lambda msg: None)
    result = trainer.fit()
    assert result["cost"]["params"] <= 0.5 * result["cost"]["params_dense"]
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", map_location="cuda", weights_only=True)
    trainer.method.load_state_dict(state["method"])
    assert all(k.device.type == "cpu" for k in trainer.method.masks.keep)
    trainer.method.masks.enforce_weights()


def test_round_to_keeps_live_counts_multiples(tmp_path):
    assert PruningOptions().round_to == 8  # the default of every structured pruner
    raw = tiny_config(epochs=2)
    raw["method"] = {"name": "magnitude", "start_epoch": 1, "stages": 2, "stage_interval": 1, "target_params": 0.3}
    cfg = config_from_dict(raw)
    out = tmp_path / "run"
    prepare_run_dir(cfg, out)
    trainer = Trainer(cfg, out, log=lambda msg: None)
    result = trainer.fit()
    assert result["cost"]["params"] <= 0.3 * result["cost"]["params_dense"]
    live = [int(trainer.method.masks.live(i).sum()) for i in range(len(trainer.method.groups))]
    assert all(n % 8 == 0 and n >= 8 for n in live), live
    assert min(live) < 64  # something was pruned in whole runs of 8


# --------------------------------------------------------------------------------------------------- shrink
@pytest.fixture(scope="module")
def shrink_pair(tmp_path_factory):
    """The same run with fine-tuning on the compressed model (default) and on the masked model."""
    root = tmp_path_factory.mktemp("shrink")
    # round_to 1: at the default 8 the two runs drift apart by up to 7e-4 of a tensor's largest entry (float
    # summation order over 10 steps), beyond this test's elementwise tolerance
    method = {"name": "magnitude", "target_params": 0.4, "round_to": 1}
    return run(root, method, "shrunk", epochs=4), run(root, {**method, "shrink": False}, "masked", epochs=4)


def test_shrunk_fine_tuning_equals_masked_fine_tuning(shrink_pair):
    shrunk, masked = shrink_pair
    assert shrunk.method.shrunk and not masked.method.shrunk
    # during the last two epochs the trained model itself was the small one, its optimizer state too
    n_params = sum(p.numel() for p in shrunk.ctx.model.parameters())
    assert n_params == shrunk.result["cost"]["params"] < shrunk.result["cost"]["params_dense"]
    for p in shrunk.ctx.model.parameters():
        assert shrunk.ctx.optimizer.state[p]["momentum_buffer"].shape == p.shape
    # the shrunk model trains in NCHW (channels-last backward is unsafe at irregular widths, Trainer docs)
    assert not shrunk.ctx.channels_last and not shrunk.train_loader.channels_last and masked.ctx.channels_last
    assert all(p.is_contiguous() for p in shrunk.ctx.model.parameters())
    # the same function as the masked run (up to float summation order), the same masks, the same report
    assert all(torch.equal(a, b) for a, b in zip(shrunk.method.kept, masked.method.masks.keep))
    small, reference = tailwise.load_model(shrunk.out), tailwise.load_model(masked.out)
    for (k, v), (k2, v2) in zip(small.state_dict().items(), reference.state_dict().items()):
        assert k == k2 and v.shape == v2.shape, k
        assert torch.allclose(v.float(), v2.float(), rtol=1e-3, atol=1e-5), k
    records = lambda t: [(r["active_params"], r["active_macs"], r["live_channels"]) for r in t.metrics.records()]  # noqa: E731
    assert records(shrunk) == records(masked)
    assert shrunk.result["cost"] == masked.result["cost"]
    assert shrunk.result["method"]["channels"] == masked.result["method"]["channels"] == RESNET20_CHANNELS
    # result.json's structure: every dense group with its kept indices, the same for both, matching the model
    structure = shrunk.result["method"]["structure"]
    assert structure == masked.result["method"]["structure"]
    assert sum(g["size"] for g in structure) == RESNET20_CHANNELS
    assert sum(len(g["kept"]) for g in structure) == live_channels_of(small)
    for g, keep in zip(structure, masked.method.masks.keep):
        assert g["kept"] == keep.nonzero().flatten().tolist()
        for producer in g["producers"]:
            assert small.get_submodule(producer).out_channels == len(g["kept"])
    # best-on-val only among the compressed epochs (stages after epochs 1 and 2: shrink from epoch index 2)
    assert shrunk.result["best_on_val"]["epoch"] >= 2 and masked.result["best_on_val"]["epoch"] >= 1


def test_resume_after_the_shrink_equals_uninterrupted(tmp_path, shrink_pair):
    full, _ = shrink_pair
    cfg = config_from_dict(pruning_config({"name": "magnitude", "target_params": 0.4, "round_to": 1}, epochs=4))
    out = tmp_path / "interrupted"
    prepare_run_dir(cfg, out)
    first = Trainer(cfg, out, log=lambda msg: None)
    stop_after(first, 13)  # mid-epoch 2, the first epoch on the compressed model
    with pytest.raises(Interrupted):
        first.fit()
    assert first.method.shrunk
    resumed = Trainer(cfg, out, log=lambda msg: None)
    resumed.resume()
    assert resumed.method.shrunk and resumed.train_loader.position == 3
    resumed.fit()
    for key, value in weights(full).items():
        assert torch.equal(value, resumed.ctx.model.state_dict()[key]), key
    assert all(torch.equal(a, b) for a, b in zip(full.method.kept, resumed.method.kept))
