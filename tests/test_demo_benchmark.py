"""benchmarks/demo_benchmark.py: argument checks that must fail before anything runs."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv", [["time", "--precisions", "fp16"], ["time", "--precisions", ","],
                                  ["parity", "--precisions", "auto"]])
def test_unknown_precisions_are_refused_before_any_run(monkeypatch, capsys, argv):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    script = importlib.import_module("demo_benchmark")
    monkeypatch.setattr(script, "measure_time", lambda args: pytest.fail("ran the demo"))
    monkeypatch.setattr(script, "run_parity", lambda args: pytest.fail("ran the demo"))
    with pytest.raises(SystemExit) as exc:
        script.main(argv)
    assert exc.value.code == 2 and "--precisions" in capsys.readouterr().err
