"""benchmarks/ltap_benchmark.py: rows over seeds, the paired differences and issue #21's goal, from planted runs."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from test_report import make_run

ROOT = Path(__file__).resolve().parents[1]


def plant(tmp_path: Path, name: str, seed: int, acc: tuple, vote: str | None = None, F: float = 100.0) -> Path:
    method = "ltap" if vote else "none"
    path = make_run(tmp_path / f"{name}_s{seed}", method=method, acc=acc, F=F, seed=seed,
                    config={"method": {"vote": vote}} if vote else None)
    if vote:  # make_run writes vote: uniform into result.json for every LTAP run
        result = json.loads((path / "result.json").read_text())
        result["method"]["vote"] = vote
        (path / "result.json").write_text(json.dumps(result))
    return path


@pytest.fixture
def benchmark(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    script = importlib.import_module("ltap_benchmark")

    def run(paths: list[Path]) -> str:
        assert script.main([*map(str, paths), "--intro", "I"]) == 0
        return capsys.readouterr().out
    return run


@pytest.mark.parametrize("uniform_tail, verdict", [((57.0, 58.5, 55.0), "met"),  # +3.0, +1.5, +5.0: mean +3.17
                                                    ((57.0, 60.5, 55.0), "not met")])  # s1 −0.5
def test_goal_trial_against_uniform_per_seed(tmp_path, benchmark, uniform_tail, verdict):
    paths = []
    for s, u_tail in enumerate(uniform_tail):
        paths.append(plant(tmp_path, "dense", s, (80.0, 70.0, 60.0, 70.0)))
        paths.append(plant(tmp_path, "trial", s, (80.0, 70.0, 60.0, 69.5), vote="trial", F=25.0))  # C 99.29
        paths.append(plant(tmp_path, "uniform", s, (80.0, 70.0, u_tail, 69.0), vote="uniform", F=25.0))
    out = benchmark(paths)
    diffs = [60.0 - u for u in uniform_tail]
    mean = sum(diffs) / 3
    assert f"at C ≥ 99%: {verdict}** -- Tail {mean:+.2f} over 3 seeds".replace("Tail -", "Tail −") in out
    assert ", ".join(f"s{s} {d:+.2f}" for s, d in enumerate(diffs)).replace("-", "−") in out
    assert "C of the trial row 99.29%" in out


def test_goal_needs_three_seeds_and_c(tmp_path, benchmark):
    paths = []
    for s in range(2):  # +5 Tail on both seeds, but two seeds only
        paths += [plant(tmp_path, "dense", s, (80.0, 70.0, 60.0, 70.0)),
                  plant(tmp_path, "trial", s, (80.0, 70.0, 60.0, 69.5), vote="trial", F=25.0),
                  plant(tmp_path, "uniform", s, (80.0, 70.0, 55.0, 69.0), vote="uniform", F=25.0)]
    assert "not met** -- Tail +5.00 over 2 seeds" in benchmark(paths)
    paths.append(plant(tmp_path, "dense", 2, (80.0, 70.0, 60.0, 70.0)))
    paths.append(plant(tmp_path, "trial", 2, (80.0, 70.0, 60.0, 60.0), vote="trial", F=25.0))  # C 85.7
    paths.append(plant(tmp_path, "uniform", 2, (80.0, 70.0, 55.0, 69.0), vote="uniform", F=25.0))
    out = benchmark(paths)
    assert "not met** -- Tail +5.00 over 3 seeds" in out  # C of the trial row (99.29, 99.29, 85.71) < 99
