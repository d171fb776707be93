"""DO's classifier-exemption probe read both ways: raw sub-model logits and prior-corrected ones, from checkpoints.

    python benchmarks/do_exempt_probe.py RUN_DIR:CHECKPOINT [RUN_DIR:CHECKPOINT ...] [--threads 2]

A DO run records its ``exempt_probe`` (:mod:`tailwise.methods.do.probe`) at each decoupling with raw logits, the
paper's reading. Since ``prior_correction: sampler`` became the default, the choice of ``exempt`` should be read
with the logits the ensemble actually uses: each sub-model's minus the log label distribution of its stage's
sampler. This probe loads a DO checkpoint (any one written after a decoupling and before the next: the probe's
kept entries are then exactly those of the last decoupling), takes the newest sub-model, and evaluates it on the
validation split as the run's own ``exempt`` left it and as each stricter reading would, raw and corrected. It
trains nothing and writes nothing; CHECKPOINT may be a file extracted from the history (``git show C:P > F``).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from tailwise.config import load_config
from tailwise.engine.checkpoint import load_checkpoint
from tailwise.engine.trainer import Trainer
from tailwise.errors import TailwiseError
from tailwise.methods.do.plan import stage_log_prior


def probe(run_dir: Path, checkpoint: Path, threads: int) -> list[dict]:
    """One row per (reading, logits) of the checkpoint's newest sub-model: validation accuracy per group."""
    cfg = load_config(run_dir / "config.yaml", [f"run.threads={threads}"])
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, out, log=lambda msg: None)
        trainer.resume(load_checkpoint(checkpoint, "cpu"))
        ctx, method = trainer.ctx, trainer.method
        if cfg.method.get("name") != "do" or not method.submodels or method.probe is None:
            raise TailwiseError(f"{checkpoint}: not a DO run after a decoupling with exempt_probe on")
        t, o = len(method.submodels) - 1, method.options
        prior = stage_log_prior(method.stages[t], ctx.data.train.labels, o.rho_m, o.few_sampler).to(ctx.device)
        sub = method.submodels[t]
        networks = {o.exempt + " (the run)": sub, **{r: method.probe.submodel(r, sub) for r in method.probe.readings}}
        rows = []
        for reading, state in networks.items():
            def corrected(x, state=state):
                return torch.func.functional_call(ctx.model, state, (x,), strict=False).float() - prior
            for logits, network in (("raw", state), ("corrected", corrected)):
                acc = method.evaluate_network(ctx, network)
                rows.append({"run": run_dir.name, "seed": cfg.run.seed, "sub_model": t + 1, "reading": reading,
                             "logits": logits, **{g: acc[g] for g in ("many", "medium", "few", "all")}})
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", nargs="+", metavar="RUN_DIR:CHECKPOINT")
    parser.add_argument("--threads", type=int, default=2)
    a = parser.parse_args()
    print("| Seed | Sub-model | Reading | Logits | Many | Medium | Few | All |")
    print("|---:|---:|---|---|---:|---:|---:|---:|")
    for pair in a.pairs:
        run_dir, _, checkpoint = pair.partition(":")
        if not checkpoint:
            parser.error(f"{pair}: expected RUN_DIR:CHECKPOINT")
        try:
            rows = probe(Path(run_dir), Path(checkpoint), a.threads)
        except TailwiseError as exc:  # a missing or foreign run or checkpoint: the message, exit code 2
            parser.error(str(exc))
        for r in rows:
            print(f"| {r['seed']} | {r['sub_model']} | {r['reading']} | {r['logits']} | {r['many']:.2f} | "
                  f"{r['medium']:.2f} | {r['few']:.2f} | {r['all']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
