"""The demo, measured: its wall time as a new user runs it, and its accuracy in fp32 against bf16 over seeds.

    python benchmarks/demo_benchmark.py time [--reps 1] [--precisions default,fp32] [--write-docs] [--note TEXT]
    python benchmarks/demo_benchmark.py parity --seeds 0,1,2 [--precisions fp32,bf16] [--threads 1]
        [--out runs/demo-parity] [--write-docs]

``time`` runs the README's demo command (``.venv/bin/tailwise demo``, nothing else) in a fresh directory, ``--reps``
times one after another, and reports the wall time of each run from process start to exit with the epochs it
trained, the precision it ran in and its table. ``--precisions``: ``default`` is the command exactly as the README
has it (the demo's ``auto``: bf16 where the CPU has it natively); ``fp32`` / ``bf16`` add ``--precision`` to it, e.g.
``fp32`` for what a CPU without native bf16 runs. The budget is 180 s on a 2-core machine; measure it on an idle
machine (the load average is reported).

``parity`` runs the demo's two runs (dense, then LTAP branched from the dense run's checkpoint, exactly
``tailwise.demo.demo_runs``) once per seed and precision, in this process at ``--threads`` torch threads, and
reports per seed the dense and the LTAP accuracy (many / medium / few / all on the demo's 1,000 test images) in each
precision, the paired differences bf16 - fp32 (mean ± sample sd, and min...max over seeds) against the spread of
fp32 itself over the seeds, and each run's training time. Finished seeds (both ``result.json``) are skipped, so an
interrupted parity run continues where it stopped. The demo's runs are short; this is parity at the demo's scale,
not on the 200-epoch schedule.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from common import epoch_times, first_own_epoch, log, machine_lines, publish, section_head

from tailwise.engine.log import read_metrics

TIME_SECTION = "## Demo: wall time of `tailwise demo`"
PARITY_SECTION = "## Demo scale: bf16 against fp32"
GROUPS = ("many", "medium", "few", "all")
BUDGET_S = 180.0


def _tailwise() -> str:
    exe = Path(sys.executable).with_name("tailwise")
    return str(exe) if exe.is_file() else "tailwise"


def _load(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())


def _epoch_times(run_dir: Path) -> list[float]:
    """The times of the epochs the finished run ``run_dir`` trained itself (a branch's metrics.jsonl starts with
    its source's records, which it did not train)."""
    return epoch_times(read_metrics(run_dir / "metrics.jsonl"), first_own_epoch(_load(run_dir)))


# --------------------------------------------------------------------------------------------------- time
class DemoTiming(NamedTuple):
    """One timed ``tailwise demo``: its wall time, both results and the seconds its epochs took."""
    rep: int
    precision: str
    wall_s: float
    dense: dict
    pruned: dict
    train_s: float
    ltap_epochs: int


def measure_time(args) -> str:
    machine = machine_lines(os.cpu_count() or 1)
    rows, tables = [], []
    for rep, precision in ((rep, p) for rep in range(args.reps) for p in args.precisions):
        work = Path(tempfile.mkdtemp(prefix="tailwise-demo-time-"))
        command = [_tailwise(), "demo", "--out", "demo"] + ([] if precision == "default" else ["--precision", precision])
        try:
            log(f"rep {rep + 1}/{args.reps}: {' '.join(command)} (in {work})")
            start = time.perf_counter()
            proc = subprocess.run(command, cwd=work, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                raise SystemExit(f"tailwise demo failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            dense, pruned = _load(work / "demo" / "dense"), _load(work / "demo" / "ltap")
            train_s = sum(_epoch_times(work / "demo" / "dense")) + sum(_epoch_times(work / "demo" / "ltap"))
            rows.append(DemoTiming(rep + 1, precision, wall, dense, pruned, train_s,
                                   len(_epoch_times(work / "demo" / "ltap"))))
            tables.append(proc.stdout.strip())
            log(f"rep {rep + 1}: {wall:.1f} s wall")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    worst = {p: max(r.wall_s for r in rows if r.precision == p) for p in args.precisions}
    lines = [*section_head(TIME_SECTION, "benchmarks/demo_benchmark.py", args.argv), *machine,
             f"- Load average at the end: {os.getloadavg()[0]:.2f}",
             *([f"- Conditions: {args.note}"] if args.note else []),
             "",
             "The README's demo command after the install (`.venv/bin/tailwise demo`), run in a fresh directory; wall "
             "time from process start to exit (imports, the embedded data, both runs, compression, test evaluation "
             f"and the table). Budget: {BUDGET_S:.0f} s on a 2-core machine.",
             "",
             "| Rep | `--precision` | Wall s | Precision | Dense epochs | LTAP epochs (branched) | Training + "
             "validation s | Dense all | LTAP all |",
             "|---:|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.rep} | {'(none)' if r.precision == 'default' else r.precision} | {r.wall_s:.1f} | "
                     f"{r.dense.get('precision', 'fp32')} | {r.dense['epochs']} | {r.ltap_epochs} | {r.train_s:.1f} | "
                     f"{r.dense['accuracy']['all']:.2f} | {r.pruned['accuracy']['all']:.2f} |")
    lines += [""] + [f"Slowest run{'' if p == 'default' else f' with --precision {p}'} {w:.1f} s against the "
                     f"{BUDGET_S:.0f} s budget: **{'within' if w <= BUDGET_S else 'OVER'}**." for p, w in worst.items()]
    lines += ["", "The last run's output:", "", "```", tables[-1], "```", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- parity
def run_parity(args) -> dict:
    """``{(precision, seed): {"dense": result, "ltap": result, "train_s": {...}}}``, running what is missing."""
    import tailwise
    from tailwise.demo import demo_runs

    out = Path(args.out)
    results = {}
    for seed in args.seeds:
        for precision in args.precisions:
            base = out / f"{precision}_s{seed}"
            runs = demo_runs(base, args.epochs, precision, seed)
            if not all((directory / "result.json").is_file() for _, _, directory, _ in runs):
                shutil.rmtree(base, ignore_errors=True)  # a half-finished pair starts over: it is minutes
                for label, overrides, directory, branch_from in runs:
                    log(f"seed {seed} {precision}: {label} -> {directory}")
                    tailwise.run("demo", overrides + [f"run.threads={args.threads}", "run.progress=log",
                                                      "run.tensorboard=false"], directory, branch_from=branch_from)
            dense_dir, ltap_dir = runs[0][2], runs[1][2]
            results[precision, seed] = {"dense": _load(dense_dir), "ltap": _load(ltap_dir),
                                        "train_s": {"dense": sum(_epoch_times(dense_dir)),
                                                    "ltap": sum(_epoch_times(ltap_dir))}}
    return results


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):+.2f} ± {sd:.2f}"


def parity_report(args, results: dict) -> str:
    machine = machine_lines(args.threads)
    first = next(iter(results.values()))["dense"]
    lines = [*section_head(PARITY_SECTION, "benchmarks/demo_benchmark.py", args.argv), *machine,
             f"- Seeds: {', '.join(map(str, args.seeds))}; precisions: {', '.join(args.precisions)}; the demo recipe "
             f"({first['model']['name'] if isinstance(first.get('model'), dict) else 'resnet20'}, "
             f"{first['epochs']} epochs, LTAP branched from the dense run), data: the embedded demo subset "
             f"({first['dataset']['train_size']} training, {first['dataset']['test_size']} test images)",
             "",
             "Test accuracy (%) of the last epoch per seed; Δ = bf16 − fp32 of the same seed.",
             "",
             "| Seed | Run | " + " | ".join(f"{p} {g}" for p in args.precisions for g in GROUPS)
             + " | " + " | ".join(f"{p} train s" for p in args.precisions) + " |",
             "|---:|---|" + "---:|" * (len(args.precisions) * (len(GROUPS) + 1)) + ""]
    for seed in args.seeds:
        for run in ("dense", "ltap"):
            accs = [results[p, seed][run]["accuracy"][g] for p in args.precisions for g in GROUPS]
            times = [results[p, seed]["train_s"][run] for p in args.precisions]
            lines.append(f"| {seed} | {run} | " + " | ".join(f"{a:.2f}" for a in accs) + " | "
                         + " | ".join(f"{t:.0f}" for t in times) + " |")
    if {"fp32", "bf16"} <= set(args.precisions):
        lines += ["", "| Run | Group | Δ bf16 − fp32 (mean ± sd) | min … max | fp32 sd over seeds |",
                  "|---|---|---:|---:|---:|"]
        for run in ("dense", "ltap"):
            for g in GROUPS:
                d = [results["bf16", s][run]["accuracy"][g] - results["fp32", s][run]["accuracy"][g]
                     for s in args.seeds]
                fp = [results["fp32", s][run]["accuracy"][g] for s in args.seeds]
                spread = statistics.stdev(fp) if len(fp) > 1 else float("nan")
                lines.append(f"| {run} | {g} | {_mean_sd(d)} | {min(d):+.2f} … {max(d):+.2f} | {spread:.2f} |")
        speed = [results["fp32", s]["train_s"]["dense"] / results["bf16", s]["train_s"]["dense"] for s in args.seeds]
        lines += ["", f"Dense training time fp32 / bf16 per seed: {', '.join(f'{v:.2f}x' for v in speed)} "
                  f"({args.threads} thread(s), runs one after another)."]
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("time", help="wall time of the README's demo command")
    t.add_argument("--reps", type=int, default=1)
    t.add_argument("--note", default="", help="a sentence on the measuring conditions")
    t.add_argument("--precisions", default="default",
                   help="comma-separated: default (the README's command as is), fp32, bf16, auto")
    p = sub.add_parser("parity", help="the demo's accuracy in fp32 and bf16 over seeds")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--epochs", type=int, default=None, help="the demo's epochs (default: the demo recipe's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/demo-parity")
    for sp in (t, p):
        sp.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.mode == "time":
        args.precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
        if not args.precisions or any(x not in ("default", "fp32", "bf16", "auto") for x in args.precisions):
            parser.error("--precisions: default, fp32, bf16 and/or auto")
        publish(measure_time(args), args.write_docs)
        return 0
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    if any(x not in ("fp32", "bf16") for x in args.precisions):
        parser.error("--precisions: fp32 and/or bf16")
    import torch

    torch.set_num_threads(args.threads)
    publish(parity_report(args, run_parity(args)), args.write_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
