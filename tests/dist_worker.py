"""One tiny run, launched by tests/test_distributed.py under torchrun (or alone, as the 1-process reference).

Usage: ``python dist_worker.py SPEC_JSON`` with SPEC ``{"config": raw recipe, "out": run dir, "resume": bool,
"stop": [step, rank] | null, "perturb": [epoch, rank] | null}``, or ``{"runs": [SPEC, ...]}``: the runs one after
the other in the same processes and process group (one launch instead of one per run). Each process writes what the test compares to ``OUT/rank<R>.pt``: the method's
description and state (masks / structure / stage history), the final weights, the probe evaluation of the test split (:func:`probe`) and the
result (None when the run was interrupted).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tailwise.config import config_from_dict
from tailwise.engine.dist import from_environment
from tailwise.engine.rundir import prepare_run_dir
from tailwise.engine.trainer import Interrupted, Trainer


def forbid_writes(rank: int) -> None:
    """On ranks other than 0, every file-writing function the trainer uses raises (the run then fails)."""
    from tailwise.engine import log, trainer

    def refuse(*args, **kwargs):
        raise RuntimeError(f"rank {rank} wrote a file")

    for name in ("save_checkpoint", "atomic_write_json", "atomic_write_text", "save_model", "write_branch_record",
                 "copy_source_metrics"):
        setattr(trainer, name, refuse)
    write = log.MetricsLog.write
    log.MetricsLog.write = lambda self, record: refuse() if self.enabled else write(self, record)


def probe(trainer: Trainer) -> dict:
    """The test split's summary under a fixed, content-dependent predictor (the first K pixel values of each
    image as its logits): equal in every process layout only if every image is predicted once, in order."""
    from tailwise.eval.evaluate import evaluate_split

    k = trainer.data.num_classes
    return evaluate_split(lambda x: x.flatten(1)[:, :k], trainer.data.test, trainer.data.groups, trainer.mean,
                          trainer.std, 8, trainer.device, dist=trainer.dist)


def main(spec: dict) -> None:
    specs = spec.get("runs", [spec])
    dist, device = from_environment(config_from_dict(specs[0]["config"]).run.device)
    if dist.rank != 0:
        forbid_writes(dist.rank)
    for one in specs:
        run(one, dist, device)
    if dist.enabled:
        torch.distributed.destroy_process_group()


def run(spec: dict, dist, device: str) -> None:
    cfg = config_from_dict(spec["config"])
    out = Path(spec["out"])
    if not spec.get("resume") and dist.is_main:
        prepare_run_dir(cfg, out)
    dist.barrier()
    trainer = Trainer(cfg, out, log=lambda msg: None, dist=dist, device=device)
    if spec.get("resume"):
        trainer.resume()
    before = probe(trainer)
    if spec.get("stop"):  # a signal reaching one process only, during step `step`
        step, rank = spec["stop"]
        hook = trainer.method.after_step

        def after_step(ctx):
            hook(ctx)
            if ctx.step + 1 == step and dist.rank == rank:
                trainer._stop_signal = 15

        trainer.method.after_step = after_step
    if spec.get("perturb"):  # one process's weights drift at the end of one epoch
        epoch, rank = spec["perturb"]
        end = trainer.method.on_epoch_end

        def on_epoch_end(ctx, e, val):
            if e == epoch and dist.rank == rank:
                with torch.no_grad():
                    next(ctx.model.parameters()).add_(1e-3)
            return end(ctx, e, val)

        trainer.method.on_epoch_end = on_epoch_end
    try:
        result = trainer.fit()
    except Interrupted:
        result = None
    torch.save({"rank": dist.rank, "world": dist.world, "method": trainer.method.describe(), "result": result,
                "method_state": trainer.method.state_dict(),
                "model": {k: v.detach().cpu() for k, v in trainer.ctx.model.state_dict().items()},
                "before": before, "step": trainer.ctx.step}, out / f"rank{dist.rank}.pt")
    dist.barrier()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
