"""Data-parallel speed: the same run with 1 process and with N processes (torchrun), as seconds per epoch.

On a CUDA machine each process gets a GPU (NCCL): ``--procs`` = the GPU count to use. On the CPU (gloo) the
single process gets ``--threads`` torch threads and each of the N processes ``threads / N``, so both use the same
cores. Each configuration trains ``--epochs`` epochs of the recipe into a scratch directory; the first epoch is
reported separately (start-up effects) and the rest averaged. Also checked: both runs end with the same training
loss per epoch up to float rounding (they see the same global batches).

    python benchmarks/ddp_speedup.py --procs 2 --epochs 3 --write-docs
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import log, machine_lines, publish, section_head

from tailwise.engine.log import read_metrics

HEADING = "## Data-parallel training: 1 vs N processes"


def train(recipe: str, overrides: list[str], out: Path, procs: int, threads: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    args = ["-m", "tailwise", "run", recipe, *overrides, f"run.threads={threads}", "run.progress=none", "--out", str(out)]
    cmd = [sys.executable, *args] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *args]
    log(" ".join(cmd))
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return read_metrics(out / "metrics.jsonl")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="cifar10_lt_ir100_resnet32_bs")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="CPU: torch threads of the single process (split over N)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--set", nargs="*", default=[], help="extra recipe overrides")
    ap.add_argument("--note", default="", help="a sentence about the conditions, written under the table")
    ap.add_argument("--write-docs", action="store_true")
    ns = ap.parse_args()
    cuda = torch.cuda.is_available()
    overrides = [f"train.epochs={ns.epochs}", "train.eval_test_every_epoch=false", *ns.set]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for procs in (1, ns.procs):
            threads = 1 if cuda else max(1, ns.threads // procs)
            records = train(ns.recipe, overrides, Path(tmp) / f"p{procs}", procs, threads)
            times = [r["time_s"] for r in records]
            rest = times[1:] or times
            rows.append((procs, threads, times[0], sum(rest) / len(rest), [r["train_loss"] for r in records]))
    base = rows[0][3]
    device = torch.cuda.get_device_name(0) if cuda else "CPU (gloo)"
    lines = section_head(HEADING, "benchmarks/ddp_speedup.py", sys.argv[1:]) + machine_lines(ns.threads) + [
        f"- Device: {device}; recipe `{ns.recipe}`, {ns.epochs} epochs per configuration, seed 0 "
        f"(overrides: {' '.join(overrides)})", "",
        "| processes | threads / process | first epoch (s) | later epochs (s, mean) | speed-up | train loss per epoch |",
        "|---:|---:|---:|---:|---:|---|"]
    for procs, threads, first, mean, losses in rows:
        lines.append(f"| {procs} | {threads} | {first:.1f} | {mean:.1f} | {base / mean:.2f}x | "
                     + ", ".join(f"{v:.5f}" for v in losses) + " |")
    if ns.note:
        lines += ["", ns.note]
    section = "\n".join(lines) + "\n"
    publish(section, ns.write_docs)


if __name__ == "__main__":
    main()
