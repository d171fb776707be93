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


def test_time_table_reads_each_rep_by_name(monkeypatch, tmp_path):
    """A stand-in for the demo process writes known results and epoch times; the table and the verdict against the
    180 s budget follow from them (the slowest rep per precision decides)."""
    import json
    import subprocess
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    script = importlib.import_module("demo_benchmark")
    walls = iter([10.0, 200.0, 30.0, 40.0])  # perf_counter pairs: rep 1 took 190 s, rep 2 took 10 s
    monkeypatch.setattr(script.time, "perf_counter", lambda: next(walls))
    precisions = []

    real_run = subprocess.run

    def fake_demo(command, cwd=None, **kwargs):
        if "demo" not in command:  # the machine description's own probes
            return real_run(command, cwd=cwd, **kwargs)
        precisions.append(command[command.index("--precision") + 1] if "--precision" in command else "default")
        for name, acc, times, branched in (("dense", 61.5, [1.5, 2.5], None), ("ltap", 55.25, [1.0, 2.0, 4.0], 1)):
            run = Path(cwd) / "demo" / name
            run.mkdir(parents=True)
            result = {"epochs": 5, "precision": "bf16", "accuracy": {"all": acc}}
            if branched is not None:
                result["branched_from"] = {"epoch": branched}
            (run / "result.json").write_text(json.dumps(result))
            (run / "metrics.jsonl").write_text("\n".join(json.dumps({"epoch": e, "time_s": t})
                                                         for e, t in enumerate(times)) + "\n")
        return SimpleNamespace(returncode=0, stdout=f"table {len(precisions)}", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_demo)
    args = SimpleNamespace(reps=1, precisions=["default", "fp32"], note="", argv=["time"])
    text = script.measure_time(args)
    assert precisions == ["default", "fp32"]
    # ltap branched from the epoch-1 checkpoint (saved after epoch 0; epoch 1 is the next to train): its own epochs
    # are 1 and 2 (2.0 + 4.0 s), plus the dense 4.0 s
    assert "| 1 | (none) | 190.0 | bf16 | 5 | 2 | 10.0 | 61.50 | 55.25 |" in text
    assert "| 1 | fp32 | 10.0 | bf16 | 5 | 2 | 10.0 | 61.50 | 55.25 |" in text
    assert "Slowest run 190.0 s against the 180 s budget: **OVER**." in text
    assert "Slowest run with --precision fp32 10.0 s against the 180 s budget: **within**." in text
    assert "table 2" in text
