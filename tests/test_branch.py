"""Branching a pruned run from a plain run's checkpoint: equal to running it from scratch, refused otherwise.

Tiny synthetic runs as in ``test_engine.py`` (ResNet-20, 4 classes, 5 batches per epoch), 5 epochs; the pruning
methods start at epoch 3 (LTAP's scoring window: epoch index 2), so the plain run's checkpoint at the end of
epoch index 1 (``epoch == 2``) is the latest one a branch may start from.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from tailwise.config import config_from_dict
from tailwise.engine.trainer import Interrupted
from tailwise.errors import ConfigError

from test_engine import stop_after, tiny_config, trainer_for, weights

PRUNERS = {"ltap": {"name": "ltap", "target_params": 0.5}, "magnitude": {"name": "magnitude", "target_params": 0.5}}


def raw_config(method: dict | None = None, **train) -> dict:
    raw = tiny_config(epochs=5, milestones=[4], **train)
    if method:
        raw["method"] = {"start_epoch": 3, "stages": 2, "stage_interval": 1, **method}
    return raw


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    raw = raw_config()
    raw["run"]["keep_checkpoints"] = [2, 3]  # the end-of-epoch checkpoints kept as epoch_002.pt, epoch_003.pt
    trainer = trainer_for(raw, tmp_path_factory.mktemp("dense") / "run")
    trainer.fit()
    last = torch.load(trainer.out / "checkpoints" / "last.pt", weights_only=True)
    assert torch.load(trainer.out / "checkpoints" / "epoch_002.pt", weights_only=True)["epoch"] == 2
    assert last["epoch"] == 5 and not (trainer.out / "checkpoints" / "epoch_004.pt").exists()
    return trainer


def result_of(trainer) -> dict:
    return json.loads((trainer.out / "result.json").read_text())


def without_times(records):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in records]


@pytest.mark.parametrize("name", list(PRUNERS))
def test_branch_equals_the_run_from_scratch(tmp_path, dense, name):
    full = trainer_for(raw_config(PRUNERS[name]), tmp_path / "full")
    full.fit()
    branch = trainer_for(raw_config(PRUNERS[name]), tmp_path / "branch")
    checkpoint = dense.out / "checkpoints" / "epoch_002.pt"
    branch.branch(checkpoint)
    assert branch.start_epoch == 2
    branch.fit()

    for key, value in weights(full).items():
        assert torch.equal(value, branch.ctx.model.state_dict()[key]), key
    assert all(torch.equal(a, b) for a, b in zip(full.method.masks.keep, branch.method.masks.keep))
    assert full.method.history == branch.method.history and len(full.method.history) == 2
    a, b = result_of(full), result_of(branch)
    assert a["accuracy"] == b["accuracy"] and a["cost"] == b["cost"]
    core = lambda recs: [{k: r[k] for k in ("epoch", "lr", "train_loss", "train_acc", "val")} for r in recs]  # noqa: E731
    assert core(full.metrics.records()) == core(branch.metrics.records())
    # from the branch point on, the method's own fields too (before it, the copied plain records have none)
    assert without_times(full.metrics.records()[2:]) == without_times(branch.metrics.records()[2:])
    assert b["branched_from"]["epoch"] == 2 and b["branched_from"]["source"] == str(dense.out)
    assert "branched_from" not in a
    # the first two epochs of the branch's metrics are the dense run's own records
    assert without_times(branch.metrics.records()[:2]) == without_times(dense.metrics.records()[:2])


def test_best_on_val_only_at_the_final_budget(tmp_path):
    trainer = trainer_for(raw_config(PRUNERS["magnitude"]), tmp_path / "run")
    result = trainer.fit()
    # stages after epochs 3 and 4 (1-based): only epoch indices 3 and 4 carry the final budget
    assert result["best_on_val"]["epoch"] >= 3


def test_resume_of_a_branch_continues_it(tmp_path, dense):
    method = PRUNERS["ltap"]
    whole = trainer_for(raw_config(method), tmp_path / "whole")
    whole.branch(dense.out / "checkpoints" / "epoch_002.pt")
    whole.fit()
    cut = trainer_for(raw_config(method), tmp_path / "cut")
    cut.branch(dense.out / "checkpoints" / "epoch_002.pt")
    stop_after(cut, 18)  # mid-epoch 3, after the first stage
    with pytest.raises(Interrupted):
        cut.fit()
    resumed = trainer_for_resume(raw_config(method), tmp_path / "cut")
    resumed.fit()
    for key, value in weights(whole).items():
        assert torch.equal(value, resumed.ctx.model.state_dict()[key]), key
    assert result_of(resumed)["branched_from"] == result_of(whole)["branched_from"]
    assert without_times(resumed.metrics.records()) == without_times(whole.metrics.records())


def trainer_for_resume(raw, out):
    from tailwise.engine.trainer import Trainer

    trainer = Trainer(config_from_dict(raw), out, log=lambda msg: None)
    trainer.resume()
    return trainer


@pytest.mark.parametrize("change, match", [
    ({"checkpoint": "epoch_003.pt"}, "already acts in epoch 3"),
    ({"loss": "ce"}, "loss.name: 'balanced_softmax' vs 'ce'"),
    ({"lr": 0.1}, "train.lr: 0.05 vs 0.1"),
    ({"seed": 4}, "run.seed: 3 vs 4"),
])
def test_branch_refuses_a_different_trajectory(tmp_path, dense, change, match):
    raw = raw_config(PRUNERS["ltap"])
    if "loss" in change:
        raw["loss"]["name"] = change["loss"]
    if "lr" in change:
        raw["train"]["lr"] = change["lr"]
    if "seed" in change:
        raw["run"]["seed"] = change["seed"]
    trainer = trainer_for(raw, tmp_path / "run")
    with pytest.raises(ConfigError, match=match.replace("(", r"\(")):
        trainer.branch(dense.out / "checkpoints" / change.get("checkpoint", "epoch_002.pt"))


def test_branch_refuses_a_pruned_source_and_a_mid_epoch_checkpoint(tmp_path, dense):
    pruned = trainer_for(raw_config(PRUNERS["magnitude"]), tmp_path / "pruned")
    pruned.fit()
    trainer = trainer_for(raw_config(PRUNERS["ltap"]), tmp_path / "a")
    with pytest.raises(ConfigError, match="used method 'magnitude'"):
        trainer.branch(pruned.out / "checkpoints" / "last.pt")
    plain = trainer_for(raw_config(), tmp_path / "plain")
    stop_after(plain, 7)
    with pytest.raises(Interrupted):
        plain.fit()
    trainer = trainer_for(raw_config(PRUNERS["ltap"]), tmp_path / "b")
    with pytest.raises(ConfigError, match="mid-epoch"):
        trainer.branch(plain.out / "checkpoints" / "last.pt")


def test_cli_branch_errors_exit_2_and_leave_nothing(tmp_path, dense):
    recipe = tmp_path / "ltap.yaml"
    recipe.write_text(yaml.safe_dump(raw_config(PRUNERS["ltap"])))
    for checkpoint, message in ((dense.out / "checkpoints" / "epoch_003.pt", "already acts in epoch 3"),
                                (tmp_path / "missing.pt", "no such checkpoint file")):
        out = tmp_path / "out"
        proc = subprocess.run([sys.executable, "-m", "tailwise", "run", str(recipe), "--out", str(out),
                               "--branch-from", str(checkpoint)], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert not out.exists()


def test_plasticity_branch_equals_the_run_from_scratch(tmp_path, dense):
    """Growth events after epochs 3 (E_mod 3, the LR decays at 4): epoch index 2 scores, so a branch may start from
    the plain run's epoch_002.pt and must then equal the run from scratch; epoch_003.pt is refused."""
    raw = raw_config()
    raw["method"] = {"name": "plasticity", "every_epochs": 3, "alpha": 0.25}
    full = trainer_for(raw, tmp_path / "full")
    full.fit()
    branch = trainer_for(raw, tmp_path / "branch")
    branch.branch(dense.out / "checkpoints" / "epoch_002.pt")
    branch.fit()

    for key, value in weights(full).items():
        assert torch.equal(value, branch.ctx.model.state_dict()[key]), key
    assert len(full.method.history) == 1 and full.method.history == branch.method.history
    assert result_of(full)["accuracy"] == result_of(branch)["accuracy"]
    assert without_times(full.metrics.records()) == without_times(branch.metrics.records())
    with pytest.raises(ConfigError, match="at or before epoch 2"):
        trainer_for(raw, tmp_path / "late").branch(dense.out / "checkpoints" / "epoch_003.pt")
