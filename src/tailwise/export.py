"""Export a run's deployed (compressed) model to ONNX and check it against onnxruntime when installed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .deploy import load_model
from .errors import TailwiseError


def export_onnx(run_dir: str | Path, out: str | Path | None = None, opset: int = 17, atol: float = 1e-4) -> dict:
    """Write ``model.onnx`` (input ``images`` N x C x H x W normalised float, output ``logits``; dynamic batch).

    Uses the TorchScript-based exporter (``dynamo=False``), which needs only the ``onnx`` package. If
    onnxruntime is installed, the ONNX logits are compared with PyTorch's on a random batch (max abs
    difference must be <= ``atol``). Returns ``{"path", "checked", "max_abs_diff"}``.
    """
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise TailwiseError("ONNX export needs the onnx package: pip install 'tailwise[onnx]'") from None
    model = load_model(run_dir)
    aggregation = getattr(model, "settings", {}).get("aggregation", "average")
    if aggregation == "instance":
        raise TailwiseError(f"{run_dir}: instance-level test-time aggregation optimises weights per image at "
                            "inference; it cannot be exported to ONNX (train with method.aggregation=average or group)")
    out = Path(out) if out else Path(run_dir) / "model" / "model.onnx"
    example = torch.randn(2, *model.preprocess["input_shape"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".onnx.tmp")
    torch.onnx.export(model, (example,), str(tmp), input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset, dynamo=False)
    tmp.replace(out)
    report = {"path": str(out), "checked": False, "max_abs_diff": None}
    try:
        import onnxruntime as ort
    except ImportError:
        return report
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(5, *model.preprocess["input_shape"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x).numpy()
    got = session.run(["logits"], {"images": x.numpy()})[0]
    diff = float(np.abs(got - expected).max())
    if diff > atol:
        raise TailwiseError(f"onnxruntime output differs from PyTorch by {diff:.2e} > {atol}: do not use {out}")
    report.update(checked=True, max_abs_diff=diff)
    return report
