"""Run logging: ``metrics.jsonl`` (one object per epoch), optional TensorBoard, progress on a terminal."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..atomic import atomic_write_text
from ..config import dotted_keys
from ..errors import TrainingError


def read_metrics(path: str | Path, skip_damaged: bool = False) -> list[dict]:
    """The records of a ``metrics.jsonl`` (one JSON object per line, one line per epoch) in file order, blank lines
    left out; ``[]`` when the file does not exist. A line that is not JSON raises ``json.JSONDecodeError``, unless
    ``skip_damaged``: then it is left out, as is any line that is not a JSON object (a line cut by an interrupted
    write, or one a running run is still writing)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in filter(str.strip, path.read_text().splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if not skip_damaged:
                raise
            continue
        if isinstance(record, dict) or not skip_damaged:
            records.append(record)
    return records


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
            for key, value in dotted_keys(record, sep="/").items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.writer.add_scalar(key, value, record["epoch"])
            self.writer.flush()

    def records(self) -> list[dict]:
        """The records written so far (:func:`read_metrics`)."""
        return read_metrics(self.path)


def progress_mode(setting: str) -> str:
    """``auto`` → a progress bar on a terminal, plain log lines otherwise."""
    if setting != "auto":
        return setting
    return "bar" if sys.stderr.isatty() else "log"


def format_groups(acc: dict | None, balanced: bool = False) -> str:
    """Accuracies as one line, ``all 61.20 | many 80.10 | medium 55.00 | few 40.30`` (``balanced`` adds
    ``| balanced ...``); keys without a value are left out, no accuracies at all give ``-``."""
    if not acc:
        return "-"
    keys = ("all", "many", "medium", "few") + (("balanced",) if balanced else ())
    return " | ".join(f"{k} {acc[k]:.2f}" for k in keys if acc.get(k) is not None)
