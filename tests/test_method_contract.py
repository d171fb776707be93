"""The method contract, checked for every registered method (``list_methods()``) on one tiny synthetic run each:

- exact resume: a run interrupted mid-epoch while the method is active and resumed ends with the same weights,
  metrics, method record and accuracy as the uninterrupted run;
- ``state_dict`` round trip: a fresh instance of the method, set up on a fresh run and loaded with the state,
  gives back the same state;
- bf16: the method trains and finishes under ``train.precision=bf16`` (CPU autocast) with finite losses;
- distributed consistency: under torchrun (2 gloo processes) both processes end with identical weights and
  method record, without the trainer having to resynchronise them.

A newly registered method fails here until it has a ``CONTRACT`` entry: a configuration under which it is
active (pruning, an event, a stage switch, a second pass) within the run.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from test_distributed import dist_config, launch_runs
from test_engine import stop_after, tiny_config, trainer_for
from tailwise.engine.trainer import Interrupted, Trainer
from tailwise.methods import list_methods

PRUNING = {"start_epoch": 1, "stages": 2, "stage_interval": 1, "target_params": 0.5}
# per method: its options, and the number of epochs that puts its activity inside the run (5 steps per epoch)
CONTRACT = {
    "none": ({}, 3),
    "magnitude": (PRUNING, 3),  # stages after epochs 1 and 2
    "taylor": (PRUNING, 3),
    "random": (PRUNING, 3),
    "ltap": (PRUNING, 3),
    "plasticity": ({"every_epochs": 1, "last_event_epoch": 2}, 3),  # growth events after epochs 1 and 2
    # a decoupling after epochs 1 and 2, three sub-models; Eq. 4 in 2 steps per 10% of γ (the default 10: 130
    # retraining steps, most of this test's time, for no further path)
    "do": ({"stage_epochs": [1, 1, 1], "prune_steps": 2}, 3),
    "more": ({"start_epoch": 1, "general": "slow"}, 3),  # plain epoch 0, then two passes per step, a slow W_g
}
STEPS_PER_EPOCH = 5
# interrupted mid-epoch 1 (before the method acts), mid-epoch 2 (after its first action), mid-epoch 3 (after its second)
STOP_STEPS = (3, 8, 13)


def config(name: str, **train) -> dict:
    options, epochs = CONTRACT[name]
    raw = tiny_config(epochs=epochs, **train)
    raw["method"] = {"name": name, **options}
    if name == "do":
        raw["loss"] = {"name": "ce"}  # DO trains with its own compensation loss
    return raw


def strip_times(records: list[dict]) -> list[dict]:
    """Metrics without wall-clock fields (seconds, named ``*_s``: they differ between any two runs)."""
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in records]


def method_record(result: dict) -> str:
    """The method's ``result.json`` record without its wall-clock measurements, as canonical JSON."""
    record = json.loads(json.dumps(result["method"], default=str))
    record.pop("overhead", None)
    for report in ("test_time", "instance_test_time"):
        record.get("final", {}).get(report, {}).pop("ms_per_image", None)
    return json.dumps(record, sort_keys=True)


def test_every_registered_method_has_a_contract_entry():
    assert set(CONTRACT) == set(list_methods())


@pytest.fixture(scope="module", params=sorted(CONTRACT))
def uninterrupted(request, tmp_path_factory):
    name = request.param
    trainer = trainer_for(config(name), tmp_path_factory.mktemp(name) / "full")
    return name, trainer, trainer.fit()


@pytest.mark.parametrize("stop_step", STOP_STEPS)
def test_resume_mid_epoch_equals_uninterrupted(tmp_path, uninterrupted, stop_step):
    name, full, full_result = uninterrupted
    first = trainer_for(config(name), tmp_path / "interrupted")
    assert len(first.train_loader) == STEPS_PER_EPOCH
    stop_after(first, stop_step)
    with pytest.raises(Interrupted):
        first.fit()
    resumed = Trainer(first.cfg, first.out, log=lambda msg: None)
    resumed.resume()
    assert (resumed.start_epoch, resumed.train_loader.position) == divmod(stop_step, STEPS_PER_EPOCH)
    result = resumed.fit()
    full_state, state = full.ctx.model.state_dict(), resumed.ctx.model.state_dict()
    assert full_state.keys() == state.keys()
    for key, value in full_state.items():
        assert torch.equal(value, state[key]), key
    assert strip_times(resumed.metrics.records()) == strip_times(full.metrics.records())
    assert result["accuracy"] == full_result["accuracy"] and result["cost"] == full_result["cost"]
    assert method_record(result) == method_record(full_result)


def flatten(state, prefix="") -> dict:
    """A nested state (dicts, lists, tensors, numbers) as ``{path: leaf}``."""
    if isinstance(state, dict):
        return {k: v for key, value in state.items() for k, v in flatten(value, f"{prefix}/{key}").items()}
    if isinstance(state, (list, tuple)):
        return {k: v for i, value in enumerate(state) for k, v in flatten(value, f"{prefix}/{i}").items()}
    return {prefix: state}


def test_state_dict_round_trip(tmp_path, uninterrupted):
    name, full, _ = uninterrupted
    saved = flatten(full.method.state_dict())
    fresh = trainer_for(config(name), tmp_path / "fresh")
    fresh.method.load_state_dict(full.method.state_dict())
    restored = flatten(fresh.method.state_dict())
    assert saved.keys() == restored.keys()
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value.cpu(), restored[key].cpu()), key
        else:
            assert value == restored[key], key


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_trains_in_bf16(tmp_path, name):
    trainer = trainer_for(config(name, precision="bf16"), tmp_path / "bf16")
    dtypes = set()
    trainer.ctx.model.conv1.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    result = trainer.fit()
    assert torch.bfloat16 in dtypes and result["precision"] == "bf16"
    assert all(math.isfinite(r["train_loss"]) for r in trainer.metrics.records())
    assert result["accuracy"]["all"] is not None


@pytest.fixture(scope="module")
def torchrun_runs(tmp_path_factory) -> dict:
    """Every method's run under torchrun (2 gloo processes), all in one launch: name -> (run dir, rank records)."""
    root = tmp_path_factory.mktemp("torchrun")
    names = sorted(CONTRACT)
    specs = [{"config": dist_config({"name": n, **CONTRACT[n][0]}, CONTRACT[n][1]), "out": str(root / n)}
             for n in names]
    return {n: (root / n, records) for n, records in zip(names, launch_runs(specs, 2))}


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_processes_end_identical_under_torchrun(torchrun_runs, name):
    out, (r0, r1) = torchrun_runs[name]
    epochs = CONTRACT[name][1]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == epochs and not any("replicas_resynced" in r for r in records)  # equal without help
    assert r0["model"].keys() == r1["model"].keys()
    for key, value in r0["model"].items():
        assert torch.equal(value, r1["model"][key]), key
    assert method_record(r0) == method_record(r1)
    assert r0["result"]["accuracy"] == r1["result"]["accuracy"]


def test_methods_do_not_import_the_engine():
    """The method–trainer boundary: importing every method (and its standalone objects) loads no part of
    ``tailwise.engine``; a method reaches the run only through ``MethodContext``."""
    code = ("import sys, tailwise.methods, tailwise.methods.context; "
            "print(sorted(m for m in sys.modules if m.startswith('tailwise.engine')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
