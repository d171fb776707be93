"""benchmarks/matrix.py: runs recipes one after another, skips finished runs, and regenerates the report."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from test_engine import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_matrix_runs_skips_and_reports(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    raw = tiny_config(epochs=1)
    recipe.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "matrix.py"), "--out", str(tmp_path / "runs"), "--report",
           str(tmp_path / "report"), "--", str(recipe)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    result = json.loads((tmp_path / "runs" / "tiny_s0" / "result.json").read_text())
    table = (tmp_path / "report" / "table.md").read_text()
    assert f"{result['accuracy']['all']:.1f}" in table and (tmp_path / "report" / "report.html").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "finished, skipping" in again.stdout and "report of 1 runs" in again.stdout
