"""How large is the tail component a MORE run trained? Rebuilds each run from its own ``config.yaml``, loads the
weights of ``checkpoints/last.pt`` (the end of training) and runs the method's own ``finalize`` -- merge, merge
check and :func:`tailwise.methods.more.branch_size` (per layer, and per class group on up to 512 test images
stratified by class) -- on the run's test images; nothing is written to the run. For runs that finished before
``describe()["branch"]`` (or its per-group shares) existed.

    PYTHONPATH=src python benchmarks/more_branch.py benchmarks/runs/<more run> [...]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tailwise.config import load_config
from tailwise.engine.checkpoint import load_checkpoint
from tailwise.engine.trainer import Trainer
from tailwise.errors import TailwiseError


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def checked_config(run: Path, threads: int):
    if not (run / "config.yaml").is_file() or not (run / "checkpoints" / "last.pt").is_file():
        fail(f"{run}: not a run directory with config.yaml and checkpoints/last.pt")
    try:
        cfg = load_config(run / "config.yaml", [f"run.threads={threads}"])
    except TailwiseError as exc:
        fail(f"{run}: {exc}")
    if cfg.method.get("name") != "more":
        fail(f"{run}: not a MORE run (method {cfg.method.get('name')!r})")
    return cfg


def branch_of(run: Path, cfg) -> dict:
    state = load_checkpoint(run / "checkpoints" / "last.pt", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tmp, log=lambda msg: None)
        trainer.method.load_state_dict(state["method"])  # a phase run (method.start_epoch > 0): reparametrise first
        trainer.ctx.model.load_state_dict(state["model"])
        trainer.train_loader.set_normalization(state["normalization"]["mean"], state["normalization"]["std"])
        trainer.method.finalize(trainer.ctx)  # merge, merge check (MergeError if it fails), branch size
    return {"epoch": state["epoch"], "branch": trainer.method.branch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    configs = [checked_config(run, args.threads) for run in args.runs]  # every run checked before any work
    rows = []
    for run, cfg in zip(args.runs, configs):
        out = branch_of(run, cfg)
        b = out["branch"]
        groups = " | ".join(f"{b['logit_share_by_group'][g]:.2e}" for g in ("many", "medium", "few"))
        rows.append(f"| `{run.name}` | {out['epoch']} | {b['weight_ratio_median']:.2e} | {b['weight_ratio_max']:.2e} "
                    f"(`{b['weight_ratio_max_layer']}`) | {b['logit_share']:.2e} ({b['samples']} test images) | "
                    f"{groups} |")
    print("| Run | Epochs | median ‖BA‖/‖W_g‖ | max ‖BA‖/‖W_g‖ (layer) | branch share of the logits | many | medium "
          "| few |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
