"""benchmarks/matrix.py: recipes x seeds, skipping finished runs, branching each seed from its own dense checkpoint,
refusing missing checkpoints before anything runs, and regenerating the report."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tailwise.eval.report import read_csv
from test_engine import tiny_config

ROOT = Path(__file__).resolve().parents[1]
MATRIX = ROOT / "benchmarks" / "matrix.py"
spec = importlib.util.spec_from_file_location("benchmarks_matrix", MATRIX)
matrix = sys.modules["benchmarks_matrix"] = importlib.util.module_from_spec(spec)  # registered: dataclasses need it
spec.loader.exec_module(matrix)


def planned(capsys, *argv) -> tuple[int, list[str]]:
    """Exit code and printed plan lines of ``matrix.py --dry-run ARGV``."""
    code = matrix.main(["--dry-run", *argv])
    return code, capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("seeds", [["0,1,2"], ["0", "1", "2"], ["0,1", "2"], ["0,1,2,1"]])
def test_seeds_comma_or_space_separated(tmp_path, capsys, seeds):
    code, lines = planned(capsys, "--out", str(tmp_path), "--seeds", *seeds, "--", "a.yaml", "b.yaml:method.tau=1")
    assert code == 0
    outs = [line.split("--out ")[1] for line in lines]
    assert outs == [str(tmp_path / name) for name in ("a_s0", "a_s1", "a_s2", "b_tau1_s0", "b_tau1_s1", "b_tau1_s2")]
    assert all(f"run.seed={name[-1]}" in line for line, name in zip(lines, outs))


@pytest.mark.parametrize("bad", ["x", "0,-1", ","])
def test_bad_seeds_exit_2(capsys, bad):
    with pytest.raises(SystemExit) as exc:
        matrix.main(["--seeds", bad, "--", "a.yaml"])
    assert exc.value.code == 2
    assert "seeds are non-negative integers, e.g. --seeds 0,1,2" in capsys.readouterr().err


def dense_checkpoints(root: Path, seeds) -> str:
    """Empty stand-ins for the dense runs' checkpoints (a dry run only checks that they exist); returns the pattern."""
    for seed in seeds:
        (root / f"dense_s{seed}" / "checkpoints").mkdir(parents=True)
        (root / f"dense_s{seed}" / "checkpoints" / "epoch_001.pt").write_bytes(b"")
    return str(root / "dense_s{seed}" / "checkpoints" / "epoch_001.pt")


def test_each_seed_branches_from_its_own_dense_checkpoint(tmp_path, capsys):
    pattern = dense_checkpoints(tmp_path, [0, 1, 2])
    code, lines = planned(capsys, "--out", str(tmp_path), "--seeds", "0,1,2", "--branch-from", pattern, "--", "p.yaml")
    assert code == 0 and len(lines) == 3
    for seed, line in enumerate(lines):
        assert line.endswith(f"--out {tmp_path / f'p_s{seed}'} --branch-from "
                             f"{tmp_path / f'dense_s{seed}' / 'checkpoints' / 'epoch_001.pt'}")


def test_missing_dense_checkpoint_refused_before_anything_runs(tmp_path, capsys):
    pattern = dense_checkpoints(tmp_path, [0])
    code = matrix.main(["--out", str(tmp_path), "--seeds", "0,1,2", "--branch-from", pattern, "--", "p.yaml"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""  # no run started, seed 0's included
    assert captured.err.startswith("error: --branch-from: no dense checkpoint for ")
    for seed in (1, 2):
        assert f"seed {seed}: {tmp_path / f'dense_s{seed}' / 'checkpoints' / 'epoch_001.pt'}" in captured.err
    assert "seed 0" not in captured.err and not (tmp_path / "p_s0").exists()

    # finished and interrupted runs need no checkpoint: only seed 2 is missing now
    (tmp_path / "p_s1").mkdir()
    (tmp_path / "p_s1" / "result.json").write_text("{}")
    (tmp_path / "p_s2" / "checkpoints").mkdir(parents=True)
    (tmp_path / "p_s2" / "checkpoints" / "last.pt").write_bytes(b"")
    code, lines = planned(capsys, "--out", str(tmp_path), "--seeds", "0,1,2", "--branch-from", pattern, "--", "p.yaml")
    assert code == 0 and "finished, skipping" in lines[1] and f"--resume {tmp_path / 'p_s2'}" in lines[2]


def test_several_seeds_need_the_seed_placeholder(tmp_path, capsys):
    checkpoint = dense_checkpoints(tmp_path, [0]).replace("{seed}", "0")
    assert matrix.main(["--out", str(tmp_path), "--seeds", "0,1", "--branch-from", checkpoint, "--", "p.yaml"]) == 2
    assert "has no {seed} placeholder, but --seeds is 0,1" in capsys.readouterr().err
    code, lines = planned(capsys, "--out", str(tmp_path), "--branch-from", checkpoint, "--", "p.yaml")  # one seed
    assert code == 0 and lines[0].endswith(f"--branch-from {checkpoint}")


def test_matrix_of_seeds_branches_skips_and_reports(tmp_path):
    """Real tiny runs: dense seeds 0 and 1, then a pruned recipe branched per seed, then one report of both rows."""
    dense = tiny_config(epochs=3, milestones=[2])
    dense["run"]["keep_checkpoints"] = [1]
    pruned = tiny_config(epochs=3, milestones=[2])
    pruned["method"] = {"name": "magnitude", "target_params": 0.5, "start_epoch": 2, "stages": 1}
    for name, raw in (("dense", dense), ("pruned", pruned)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    runs = tmp_path / "runs"
    base = [sys.executable, str(MATRIX), "--out", str(runs), "--seeds", "0,1"]
    first = subprocess.run([*base, "--", str(tmp_path / "dense.yaml")], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    cmd = [*base, "--branch-from", str(runs / "dense_s{seed}" / "checkpoints" / "epoch_001.pt"),
           "--report", str(tmp_path / "report"), "--report-with", str(runs / "dense_s0"), str(runs / "dense_s1"), "--",
           str(tmp_path / "pruned.yaml")]
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    results = {name: json.loads((runs / name / "result.json").read_text())
               for name in ("dense_s0", "dense_s1", "pruned_s0", "pruned_s1")}
    for seed in (0, 1):
        assert results[f"pruned_s{seed}"]["branched_from"]["source"] == str(runs / f"dense_s{seed}")
        assert results[f"pruned_s{seed}"]["seed"] == seed
    table = (tmp_path / "report" / "table.md").read_text()
    assert "| **BS** (baseline) | n = 2 |" in table
    assert "| BS + Magnitude (params 50%, 1 stages, channels in multiples of 8, 3 ep) | n = 2 |" in table
    csv_c = {row["run"]: row["C"] for row in read_csv(tmp_path / "report" / "table.csv")}
    for seed in (0, 1):  # C against the dense run of the same seed
        expected = 100 * results[f"pruned_s{seed}"]["accuracy"]["all"] / results[f"dense_s{seed}"]["accuracy"]["all"]
        assert csv_c[str(runs / f"pruned_s{seed}")] == pytest.approx(expected)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("finished, skipping") == 2
    assert "report of 4 runs" in again.stdout
