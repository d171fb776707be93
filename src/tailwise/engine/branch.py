"""Branching: start a run from another run's end-of-epoch checkpoint instead of from scratch.

Pruning methods do nothing until their first scoring window (LTAP: epoch 100 of 200), so a pruned run and the
plain run of the same recipe are identical up to that point. ``tailwise run RECIPE --branch-from
DENSE_RUN/checkpoints/epoch_099.pt`` starts the pruned run from the plain run's state at the end of epoch 99
(model, optimizer, sampler position, all RNG states, elapsed time) and gives the same result as running it from
epoch 0 (tested bit-for-bit on CPU), so several methods compared on one budget share the dense part of training.

A branch is refused unless the source run used ``method: none`` with the same data, model, loss, train settings
and seed, the checkpoint sits on an epoch boundary, and the new method's first active epoch
(:meth:`tailwise.methods.Method.first_active_epoch`) is not before the checkpoint's epoch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from ..config import Config, load_config
from ..errors import ConfigError, TailwiseError
from ..atomic import atomic_write_json, atomic_write_text
from .checkpoint import load_checkpoint

# sections (and run keys) that determine the training trajectory and must match between source and branch
MATCHED_SECTIONS = ("data", "model", "loss", "train")
MATCHED_RUN_KEYS = ("seed",)


def _differences(a: Config, b: Config) -> list[str]:
    diffs = []
    for section in MATCHED_SECTIONS:
        left, right = dataclasses.asdict(getattr(a, section)), dataclasses.asdict(getattr(b, section))
        diffs += [f"{section}.{k}: {left.get(k)!r} vs {right.get(k)!r}" for k in sorted(set(left) | set(right))
                  if left.get(k) != right.get(k)]
    diffs += [f"run.{k}: {getattr(a.run, k)!r} vs {getattr(b.run, k)!r}" for k in MATCHED_RUN_KEYS
              if getattr(a.run, k) != getattr(b.run, k)]
    return diffs


def load_branch_point(path: str | Path, cfg: Config, first_active_epoch: int) -> tuple[dict, dict]:
    """Check that ``cfg`` may branch from checkpoint ``path``; return ``(checkpoint state, record)``.

    ``record`` (written to ``branch.json`` and ``result.json``) names the source run, the epoch and the
    checkpoint's SHA-256.
    """
    path = Path(path)
    if not path.is_file():
        raise TailwiseError(f"--branch-from {path}: no such checkpoint file")
    source_dir = path.parent.parent
    if not (source_dir / "config.yaml").is_file():
        raise TailwiseError(f"--branch-from {path}: expected RUN_DIR/checkpoints/FILE.pt with RUN_DIR/config.yaml")
    source = load_config(source_dir / "config.yaml")
    if source.method.get("name", "none") != "none":
        raise ConfigError(f"--branch-from {path}: the source run used method {source.method['name']!r}; branch only "
                          "from a plain run (method: none), whose state the new method can take over")
    diffs = _differences(source, cfg)
    if diffs:
        raise ConfigError(f"--branch-from {path}: the source run trained differently, so the branch would not equal "
                          "a run from scratch: " + "; ".join(diffs))
    state = load_checkpoint(path, "cpu")  # a cut, foreign or code-carrying file: a TrainingError naming it
    if state.get("loader", {}).get("position", 0):
        raise ConfigError(f"--branch-from {path}: a mid-epoch checkpoint; branch from an end-of-epoch one")
    epoch = int(state["epoch"])
    if epoch > first_active_epoch:
        raise ConfigError(f"--branch-from {path}: the checkpoint is after epoch {epoch}, but method "
                          f"{cfg.method['name']!r} already acts in epoch {first_active_epoch + 1}; branch from a "
                          f"checkpoint at or before epoch {first_active_epoch}")
    if epoch >= cfg.train.epochs:
        raise ConfigError(f"--branch-from {path}: the checkpoint ends training (epoch {epoch} of {cfg.train.epochs})")
    record = {"source": str(source_dir), "checkpoint": str(path), "epoch": epoch,
              "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return state, record


def copy_source_metrics(source_dir: Path, metrics_path: Path, epoch: int) -> None:
    """Start the branch's ``metrics.jsonl`` with the source's records of epochs before ``epoch``."""
    source = source_dir / "metrics.jsonl"
    lines = source.read_text().splitlines() if source.is_file() else []
    keep = [line for line in lines if line.strip() and json.loads(line).get("epoch", -1) < epoch]
    atomic_write_text(metrics_path, "".join(line + "\n" for line in keep))


def write_branch_record(out: Path, record: dict) -> None:
    atomic_write_json(out / "branch.json", record)


def read_branch_record(out: Path) -> dict | None:
    path = out / "branch.json"
    return json.loads(path.read_text()) if path.is_file() else None
