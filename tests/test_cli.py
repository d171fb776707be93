"""The `tailwise` command end to end: exit codes, no tracebacks, the demo, eval and data inspect."""
from __future__ import annotations

import json
import subprocess
import sys

import torch
import yaml


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "tailwise", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_cli_bad_config_exits_2_without_traceback_or_files(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {name: synthetic}\ntrain: {epochs: 2, learning_rate: 0.1}\n")
    proc = run_cli("run", str(recipe), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown key train.learning_rate" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_invalid_yaml_and_missing_recipe(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    proc = run_cli("run", str(bad), cwd=tmp_path)
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("run", "no_such_recipe.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "not found" in proc.stderr


def test_cli_data_inspect_synthetic(tmp_path):
    proc = run_cli("data", "inspect", "data.name=synthetic", "data.num_classes=100", "data.cache=false", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    info = yaml.safe_load(proc.stdout)
    assert info["subset_size"] == 10847 and info["groups"]["many"] == 35 and len(info["index_sha256"]) == 64


def test_cli_demo_then_eval_and_resume(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--epochs", "4", "--precision", "auto", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "many" in proc.stdout and "few" in proc.stdout and f"run directories: {out / 'dense'} and {out / 'ltap'}" in proc.stdout
    dense = json.loads((out / "dense" / "result.json").read_text())
    pruned = json.loads((out / "ltap" / "result.json").read_text())
    assert dense["dataset"]["train_size"] == 2795 and dense["dataset"]["val"]["source"] == "dataset val split"
    per_class = dense["dataset"]["test_size"] / dense["dataset"]["num_classes"]  # the noise note beside the table
    assert (f"the test split has {dense['dataset']['test_size']} images, about {per_class:.0f} images per class, so one "
            f"image is {100 / per_class:.1f} points") in proc.stdout
    # the pruned model sits next to the dense one: LTAP from the dense run's epoch-1 checkpoint, 30% of the params
    assert pruned["method"]["name"] == "ltap" and pruned["branched_from"]["epoch"] == 1
    from tailwise.engine.precision import resolve_precision  # --precision reaches both runs

    assert dense["precision"] == pruned["precision"] == resolve_precision("auto", torch.device("cpu"))
    assert pruned["cost"]["params"] <= 0.3 * dense["cost"]["params"]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("BS (dense)") for line in lines) and any(line.startswith("BS + LTAP") for line in lines)
    for run_dir, result in ((out / "dense", dense), (out / "ltap", pruned)):
        proc = run_cli("eval", str(run_dir), "--json", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == result["accuracy"]
    proc = run_cli("run", "--resume", str(out / "dense"), "train.epochs=3", cwd=tmp_path)
    assert proc.returncode == 2 and "do not pass a recipe or overrides other than" in proc.stderr


def test_cli_eval_of_a_non_run_dir(tmp_path):
    proc = run_cli("eval", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2 and "not a tailwise run directory" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_methods_lists_every_method_and_documents_its_options(tmp_path):
    from tailwise.methods import list_methods
    from tailwise.methods.plasticity import PlasticityOptions

    proc = run_cli("methods", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines()[:len(list_methods())]]
    assert listed == list_methods()
    proc = run_cli("methods", "plasticity", cwd=tmp_path)
    assert proc.returncode == 0 and "Weight scaling" in proc.stdout  # the module docstring
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.startswith("  method.")}
    assert set(rows) == {f"method.{k}" for k in PlasticityOptions.__dataclass_fields__}
    assert rows["method.alpha"][1:] == ["float", "0.3", ">", "0.0", "and", "<=", "0.5"]
    assert rows["method.scope"][1:] == ["str", "internal", "internal,", "residual,", "all"]
    assert rows["method.reweight"][1:] == ["bool", "true"]
    proc = run_cli("methods", "none", cwd=tmp_path)
    assert proc.returncode == 0 and "No options." in proc.stdout
    proc = run_cli("methods", "prune-everything", cwd=tmp_path)
    assert proc.returncode == 2 and "allowed: do, ltap" in proc.stderr and "Traceback" not in proc.stderr


def test_out_of_range_message_names_both_bounds():
    import pytest

    from tailwise.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=r"method\.rho_m: 1\.5 is out of range; must be > 0\.0 and <= 0\.99"):
        config_from_dict({"data": {"name": "synthetic"}, "loss": {"name": "ce"}, "method": {"name": "do", "rho_m": 1.5}})
