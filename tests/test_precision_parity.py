"""benchmarks/precision_parity.py: the bf16-vs-fp32 verdict and paired differences against hand-computed values."""
from __future__ import annotations

import importlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from test_report import make_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def parity(monkeypatch, capsys):
    """Run the script's main() in this process: (fp32 dirs, bf16 dirs) -> returncode, stdout, stderr."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    script = importlib.import_module("precision_parity")

    def run(fp32: list[Path], bf16: list[Path]) -> SimpleNamespace:
        rc = script.main([*map(str, fp32), "--bf16", *map(str, bf16)])
        out = capsys.readouterr()
        return SimpleNamespace(returncode=rc, stdout=out.out, stderr=out.err)
    return run


def runs(tmp_path: Path, fp32_all: list[float], bf16_all: list[float]) -> tuple[list[Path], list[Path]]:
    fp32 = [make_run(tmp_path / f"fp32_s{s}", acc=(80.0, 70.0, 60.0, a), seed=s) for s, a in enumerate(fp32_all)]
    bf16 = [make_run(tmp_path / f"bf16_s{s}", acc=(81.0, 69.0, 60.5, a), seed=s, precision="bf16")
            for s, a in enumerate(bf16_all)]
    return fp32, bf16


def test_parity_within_the_fp32_spread_with_each_seeds_difference(tmp_path, parity):
    out = parity(*runs(tmp_path, [72.0, 72.5, 71.9], [72.3, 71.8]))
    assert out.returncode == 0, out.stderr
    # fp32 mean 72.1333, spread 72.5 - 71.9 = 0.60; bf16 mean 72.05: |delta| 0.08
    assert ("**Parity holds**: mean All bf16 72.05 (n = 2) vs fp32 72.13 (n = 3), |Δ All| = 0.08 points within "
            "the fp32 seeds' spread of 0.60 (71.90 … 72.50") in out.stdout
    assert "All s0 +0.30, s1 −0.70" in out.stdout and "Tail s0 +0.50, s1 +0.50" in out.stdout
    assert "| bf16 | 1 | 81.00 | 69.00 | 60.50 | 71.80 |" in out.stdout


def test_parity_outside_the_spread_and_refusals(tmp_path, parity):
    fp32, bf16 = runs(tmp_path, [72.0, 72.5], [71.0, 71.2])
    out = parity(fp32, bf16)
    assert out.returncode == 0, out.stderr
    assert "**Parity does not hold**" in out.stdout and "|Δ All| = 1.15 points outside" in out.stdout
    wrong = parity(fp32[:1] + bf16[:1], bf16[1:])  # a bf16 run given as fp32
    assert wrong.returncode == 2 and "trained in bf16, but was given as fp32" in wrong.stderr
    alone = parity(fp32[:1], bf16)  # one fp32 seed has no spread
    assert alone.returncode == 2 and "at least two fp32 seeds" in alone.stderr
