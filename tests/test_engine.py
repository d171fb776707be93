"""The training loop: exact resume, NaN handling, run artifacts, the deployable model, schedules."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tailwise.config import config_from_dict
from tailwise.deploy import load_model
from tailwise.engine.schedule import LRSchedule
from tailwise.engine.rundir import prepare_run_dir
from tailwise.engine.trainer import Interrupted, Trainer
from tailwise.errors import ConfigError, TrainingError
from tailwise.eval.evaluate import evaluate_run
from tailwise.methods import Method


def tiny_config(**train) -> dict:
    return {
        "data": {"name": "synthetic", "num_classes": 4, "synthetic_per_class": 40, "synthetic_test_per_class": 10,
                 "imbalance_ratio": 10, "image_size": 16, "val_per_class": 5, "cache": False},
        "model": {"name": "resnet20"},
        "loss": {"name": "balanced_softmax"},
        "train": {"epochs": 3, "batch_size": 16, "eval_batch_size": 64, "lr": 0.05, "warmup_epochs": 1,
                  "milestones": [2], **train},
        "run": {"seed": 3, "progress": "none", "threads": 1},
    }


def trainer_for(raw: dict, out) -> Trainer:
    """A Trainer for the raw recipe ``raw`` in a fresh run directory ``out``."""
    cfg = config_from_dict(raw)
    prepare_run_dir(cfg, out)
    return Trainer(cfg, out, log=lambda msg: None)


def make_trainer(tmp_path, name="run", **train) -> Trainer:
    return trainer_for(tiny_config(**train), tmp_path / name)


def weights(trainer: Trainer) -> dict:
    return {k: v.clone() for k, v in trainer.ctx.model.state_dict().items()}


def stop_after(trainer: Trainer, step: int) -> None:
    """Simulate SIGINT arriving during training step ``step``."""
    hook = trainer.method.after_step

    def after_step(ctx):
        hook(ctx)
        if ctx.step + 1 == step:
            trainer._stop_signal = 2

    trainer.method.after_step = after_step


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    trainer = make_trainer(tmp_path_factory.mktemp("full"))
    result = trainer.fit()
    return trainer, result


@pytest.mark.parametrize("stop_step", [3, 8])  # mid-epoch 0 and mid-epoch 1 (5 batches per epoch)
def test_resume_equals_uninterrupted(tmp_path, uninterrupted, stop_step):
    full, full_result = uninterrupted
    first = make_trainer(tmp_path)
    assert len(first.train_loader) == 5
    stop_after(first, stop_step)
    with pytest.raises(Interrupted):
        first.fit()
    resumed = Trainer(first.cfg, first.out, log=lambda msg: None)
    resumed.resume()
    assert resumed.start_epoch == (stop_step - 1) // 5
    result = resumed.fit()
    for key, value in weights(full).items():
        assert torch.equal(value, resumed.ctx.model.state_dict()[key]), key
    assert result["accuracy"] == full_result["accuracy"]
    strip = lambda recs: [{k: v for k, v in r.items() if k != "time_s"} for r in recs]  # noqa: E731
    assert strip(resumed.metrics.records()) == strip(full.metrics.records())


def test_run_directory_contract(uninterrupted):
    trainer, result = uninterrupted
    out = trainer.out
    for name in ("config.yaml", "metrics.jsonl", "result.json", "checkpoints/last.pt", "checkpoints/best.pt",
                 "model/weights.safetensors", "model/arch.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "result.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert set(saved) >= {"dataset", "groups", "accuracy", "selection", "cost", "method", "loss", "time_s", "versions"}
    assert saved["dataset"]["class_counts"] == [35, 18, 8, 4]  # 40, 18, 8, 4 minus the head class's 5 val images
    assert saved["dataset"]["train_size"] == 65 and saved["dataset"]["subset_size"] == 70
    assert saved["cost"]["F"] == 100.0 and saved["cost"]["params"] == saved["cost"]["params_dense"]
    assert saved["selection"] == "last" and 0 <= saved["best_on_val"]["epoch"] < 3
    records = trainer.metrics.records()
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert all(set(r["val"]) >= {"all", "many", "medium", "few", "balanced", "per_class"} for r in records)
    # per-class accuracy on the 4-class test set, recomputed from the reported per-class list
    per_class = saved["accuracy"]["per_class"]
    assert math.isclose(saved["accuracy"]["balanced"], sum(per_class) / 4, abs_tol=1e-3)


def test_saved_model_reloads_and_reevaluates(uninterrupted):
    trainer, result = uninterrupted
    model = load_model(trainer.out)
    x = torch.randn(3, 3, 16, 16)
    trainer.ctx.model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), trainer.ctx.model(x), atol=1e-6)
    assert model.classes == trainer.data.classes and len(model.preprocess["mean"]) == 3
    assert evaluate_run(trainer.out) == result["accuracy"]


class NaNAtEpoch(Method):
    name = "nan-test"

    def training_loss(self, ctx, x, y):
        if ctx.epoch == 1:
            return torch.tensor(float("nan"), requires_grad=True)
        return None


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.method = NaNAtEpoch(Method.Options())
    with pytest.raises(TrainingError, match="nan"):
        trainer.fit()
    state = torch.load(trainer.out / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 1  # the checkpoint written after the last good epoch
    assert not (trainer.out / "result.json").exists()


def test_refuses_to_overwrite_a_run(tmp_path):
    make_trainer(tmp_path)
    with pytest.raises(TrainingError, match="--resume"):
        prepare_run_dir(config_from_dict(tiny_config()), tmp_path / "run")


def test_step_schedule_ldam_recipe():
    s = LRSchedule(0.1, 200, "step", warmup_epochs=5, milestones=[160, 180], lr_decay=0.01)
    assert [round(s(e), 10) for e in range(5)] == [0.02, 0.04, 0.06, 0.08, 0.1]
    assert s(5) == s(159) == 0.1
    assert math.isclose(s(160), 1e-3) and math.isclose(s(179), 1e-3)
    assert math.isclose(s(180), 1e-5) and math.isclose(s(199), 1e-5)


def test_cosine_schedule():
    s = LRSchedule(0.1, 12, "cosine", warmup_epochs=2, min_lr=0.0)
    assert s(0) == 0.05 and s(2) == 0.1
    assert math.isclose(s(7), 0.05)  # halfway through the 10 post-warm-up epochs
    assert s(11) < s(10) < 0.01


def test_rebuild_optimizer_keeps_surviving_state_and_carries_new(tmp_path):
    trainer = make_trainer(tmp_path, epochs=1)
    ctx = trainer.ctx
    x, y = next(iter(trainer.train_loader))
    trainer.loss_fn(ctx.model(x), y).backward()
    ctx.optimizer.step()
    fc_bias = ctx.model.fc.bias
    kept_momentum = ctx.optimizer.state[fc_bias]["momentum_buffer"].clone()
    # a method narrows the classifier's weight: a new Parameter whose momentum is a slice of the old one
    old_weight = ctx.model.fc.weight
    new_weight = torch.nn.Parameter(old_weight.detach()[:, :8].clone())
    carried = {"momentum_buffer": ctx.optimizer.state[old_weight]["momentum_buffer"][:, :8].clone()}
    ctx.model.fc.weight = new_weight
    ctx.rebuild_optimizer({new_weight: carried})
    assert torch.equal(ctx.optimizer.state[fc_bias]["momentum_buffer"], kept_momentum)
    assert torch.equal(ctx.optimizer.state[new_weight]["momentum_buffer"], carried["momentum_buffer"])
    assert old_weight not in ctx.optimizer.state
    assert sum(len(g["params"]) for g in ctx.optimizer.param_groups) == len(list(ctx.model.parameters()))


def test_bf16_on_cpu_trains_with_bfloat16_autocast(tmp_path):
    trainer = make_trainer(tmp_path, epochs=1, precision="bf16")
    dtypes = []
    handle = trainer.ctx.model.conv1.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    result = trainer.fit()
    handle.remove()
    assert torch.bfloat16 in dtypes  # the forward ran under autocast
    assert math.isfinite(trainer.metrics.records()[0]["train_loss"]) and result["accuracy"]["all"] is not None
    assert result["precision"] == "bf16" and not trainer.scaler.is_enabled()  # loss scaling is fp16's alone


def test_precision_auto_and_the_old_amp_key(tmp_path, monkeypatch):
    from tailwise.engine import precision

    assert config_from_dict(tiny_config(amp=True)).train.precision == "auto"
    assert config_from_dict(tiny_config(amp=False)).train.precision == "fp32"
    with pytest.raises(ConfigError, match="old name"):
        config_from_dict(tiny_config(amp=True, precision="bf16"))
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert precision.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert precision.resolve_precision("auto", cpu) == "bf16"
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        precision.resolve_precision("fp16", cpu)
    # bf16 asked for where it is not native: the run says so at the start (it is many times slower than fp32)
    assert precision.precision_warning("bf16", cpu) is None and precision.precision_warning("fp32", cpu) is None
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert "without native bf16 kernels" in precision.precision_warning("bf16", cpu)
    assert precision.precision_warning("fp32", cpu) is None


def test_read_metrics_strict_and_skipping_damaged_lines(tmp_path):
    from tailwise.engine.log import read_metrics

    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == []  # no file yet
    path.write_text('{"epoch": 0}\n\n{"epoch": 1}\n')
    assert read_metrics(path) == [{"epoch": 0}, {"epoch": 1}]
    path.write_text('{"epoch": 0}\n[1]\n{"epoch": 1}\n{"epo')  # a non-record line, then a line cut by a kill
    with pytest.raises(json.JSONDecodeError):
        read_metrics(path)
    assert read_metrics(path, skip_damaged=True) == [{"epoch": 0}, {"epoch": 1}]


def test_metrics_log_mirrors_nested_numbers_to_tensorboard_tags(tmp_path):
    from tailwise.engine.log import MetricsLog

    class Writer:
        def __init__(self):
            self.scalars = {}

        def add_scalar(self, tag, value, step):
            self.scalars[tag] = (value, step)

        def flush(self):
            pass

    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.writer = Writer()
    record = {"epoch": 3, "lr": 0.1, "val": {"all": 50.0, "per_class": [1.0], "group_sizes": {"few": 2}}, "m": "x"}
    log.write(record)
    assert log.writer.scalars == {"lr": (0.1, 3), "val/all": (50.0, 3), "val/group_sizes/few": (2, 3)}
    assert log.records() == [record]


def test_format_groups_line():
    from tailwise.engine.log import format_groups

    acc = {"all": 61.2, "many": 80.1, "medium": None, "few": 40.25, "balanced": 60.0}
    assert format_groups(acc) == "all 61.20 | many 80.10 | few 40.25"
    assert format_groups(acc, balanced=True) == "all 61.20 | many 80.10 | few 40.25 | balanced 60.00"
    assert format_groups(None) == format_groups({}) == "-"
