"""Run logging: ``metrics.jsonl`` (one object per epoch), optional TensorBoard, progress on a terminal."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import TrainingError
from ..atomic import atomic_write_text


class MetricsLog:
    """Appends one JSON object per epoch to ``metrics.jsonl``; mirrors scalars to TensorBoard if asked.
    ``enabled=False`` (processes other than rank 0 of a data-parallel run) writes nothing."""

    def __init__(self, path: str | Path, tensorboard_dir: str | Path | None = None, enabled: bool = True):
        self.path = Path(path)
        self.writer, self.enabled = None, enabled
        if tensorboard_dir is not None and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("run.tensorboard=true but tensorboard is not installed (pip install tailwise[tensorboard]); "
                      "continuing without it", file=sys.stderr)
            else:
                self.writer = SummaryWriter(str(tensorboard_dir))

    def truncate_after(self, epoch: int) -> None:
        """Drop records of epochs >= ``epoch`` (written after the checkpoint a resume starts from), and a cut last
        line (a write interrupted by a kill; its epoch is never before the checkpoint's). Any other line that is not
        a JSON record raises :class:`TrainingError` naming it. The file is rewritten atomically."""
        if not self.enabled or not self.path.exists():
            return
        lines = [line for line in self.path.read_text(errors="replace").splitlines() if line.strip()]
        keep = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except ValueError:
                if number == len(lines):
                    break
                raise TrainingError(f"{self.path} line {number} is not a JSON record (the file was edited or "
                                    "damaged); restore it or remove that line, then resume again") from None
            if not isinstance(record, dict) or not isinstance(record.get("epoch", -1), int):
                raise TrainingError(f"{self.path} line {number} is not an epoch record; restore it or remove that "
                                    "line, then resume again")
            if record.get("epoch", -1) < epoch:
                keep.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in _flatten(record).items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.writer.add_scalar(key, value, record["epoch"])
            self.writer.flush()

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _flatten(record: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        elif not isinstance(value, list):
            out[f"{prefix}{key}"] = value
    return out


def progress_mode(setting: str) -> str:
    """``auto`` → a progress bar on a terminal, plain log lines otherwise."""
    if setting != "auto":
        return setting
    return "bar" if sys.stderr.isatty() else "log"


def format_groups(acc: dict | None) -> str:
    if not acc:
        return "-"
    parts = [f"{k} {acc[k]:.2f}" for k in ("all", "many", "medium", "few") if acc.get(k) is not None]
    return " | ".join(parts)
