"""Deployment tools on a finished pruned run: ONNX export checked against onnxruntime, and the latency bench."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tailwise.config import config_from_dict
from tailwise.deploy import load_model
from tailwise.engine.rundir import prepare_run_dir
from tailwise.engine.trainer import Trainer
from tailwise.export import export_onnx

from test_engine import tiny_config


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    raw = tiny_config(epochs=2)
    raw["method"] = {"name": "magnitude", "start_epoch": 1, "stages": 1, "stage_interval": 1, "target_params": 0.5}
    cfg = config_from_dict(raw)
    out = tmp_path_factory.mktemp("pruned") / "run"
    prepare_run_dir(cfg, out)
    Trainer(cfg, out, log=lambda msg: None).fit()
    return out


def test_onnx_export_matches_pytorch(pruned_run):
    ort = pytest.importorskip("onnxruntime")
    report = export_onnx(pruned_run)
    assert report["checked"] and report["max_abs_diff"] <= 1e-4
    model = load_model(pruned_run)
    x = torch.randn(3, 3, 16, 16)
    session = ort.InferenceSession(report["path"], providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": x.numpy()})[0]  # a batch size other than the export's (dynamic axis)
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4, rtol=1e-4)


def test_bench_latency_cli_reports_dense_and_deployed(pruned_run):
    proc = subprocess.run([sys.executable, "-m", "tailwise", "bench-latency", str(pruned_run), "--batch", "1", "4",
                           "--repeats", "3", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [r["batch"] for r in report["rows"]] == [1, 4]
    assert report["params"] < report["params_dense"] and report["macs"] < report["macs_dense"]
    assert all(r["dense_ms"] > 0 and r["deployed_ms"] > 0 for r in report["rows"])
