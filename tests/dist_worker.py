"""One tiny run, launched by tests/test_distributed.py under torchrun (or alone, as the 1-process reference).

Usage: ``python dist_worker.py SPEC_JSON`` with SPEC ``{"config": raw recipe, "out": run dir, "resume": bool,
"stop": [step, rank] | null}``. Each process writes what the test compares to ``OUT/rank<R>.pt``: the method's
description and state (masks / structure / stage history), the final weights, the test evaluation before training and the
result (None when the run was interrupted).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tailwise.config import config_from_dict
from tailwise.engine.dist import from_environment
from tailwise.engine.trainer import Interrupted, Trainer, prepare_run_dir


def main(spec: dict) -> None:
    cfg = config_from_dict(spec["config"])
    dist, device = from_environment(cfg.run.device)
    out = Path(spec["out"])
    if not spec.get("resume") and dist.is_main:
        prepare_run_dir(cfg, out)
    dist.barrier()
    trainer = Trainer(cfg, out, log=lambda msg: None, dist=dist, device=device)
    if spec.get("resume"):
        trainer.resume()
    before = trainer.evaluate("test")
    if spec.get("stop"):  # a signal reaching one process only, during step `step`
        step, rank = spec["stop"]
        hook = trainer.method.after_step

        def after_step(ctx):
            hook(ctx)
            if ctx.step + 1 == step and dist.rank == rank:
                trainer._stop_signal = 15

        trainer.method.after_step = after_step
    try:
        result = trainer.fit()
    except Interrupted:
        result = None
    torch.save({"rank": dist.rank, "world": dist.world, "method": trainer.method.describe(), "result": result,
                "method_state": trainer.method.state_dict(),
                "model": {k: v.detach().cpu() for k, v in trainer.ctx.model.state_dict().items()},
                "before": before, "step": trainer.ctx.step}, out / f"rank{dist.rank}.pt")
    dist.barrier()
    if dist.enabled:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
