"""Run a list of recipes x seeds one after another: skip finished runs, resume interrupted ones.

    python benchmarks/matrix.py --out benchmarks/runs RECIPE[:key=value,...] ... [--seeds 0 1] [--set key=value ...]
                                [--branch-from DENSE_RUN_DIR/checkpoints/epoch_099.pt] [--report DIR]

Each run goes to ``<out>/<recipe>_s<seed>`` (plus a tag for per-recipe overrides). A run whose ``result.json``
exists is skipped; one with ``checkpoints/last.pt`` is resumed; otherwise it starts. Runs execute in this process
one at a time (two at once halve each other's speed on 2 cores). ``--branch-from`` starts every new run from a
plain run's checkpoint (``tailwise run --branch-from``; seed 0 only, the checkpoint's seed).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from tailwise.cli import RESUME_OVERRIDES


def run_dir_name(recipe: str, seed: int, extra: list[str]) -> str:
    tag = "".join(f"_{kv.split('=')[0].split('.')[-1]}{kv.split('=')[1]}" for kv in extra)
    return f"{Path(recipe).stem}{tag}_s{seed}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="+", help="recipe name or path, optionally with ':key=value,key=value' overrides")
    ap.add_argument("--out", default="benchmarks/runs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--set", nargs="*", default=[], help="overrides applied to every run")
    ap.add_argument("--branch-from", metavar="CHECKPOINT", help="start new runs from this plain run's checkpoint")
    ap.add_argument("--report", metavar="DIR", help="afterwards, regenerate `tailwise report` of these runs (and of "
                    "--report-with runs) into DIR; unfinished runs are named and skipped")
    ap.add_argument("--report-with", nargs="*", default=[], metavar="RUN_DIR", help="extra runs for --report")
    args = ap.parse_args(argv)
    failures = 0
    run_dirs: list[Path] = []
    for spec in args.recipes:
        recipe, _, extra_text = spec.partition(":")
        extra = [kv for kv in extra_text.split(",") if kv]
        for seed in args.seeds:
            out = Path(args.out) / run_dir_name(recipe, seed, extra)
            run_dirs.append(out)
            if (out / "result.json").is_file():
                print(f"[matrix] {out}: finished, skipping", flush=True)
                continue
            if (out / "checkpoints" / "last.pt").is_file():
                cmd = [sys.executable, "-m", "tailwise", "run", "--resume", str(out),
                       *[kv for kv in args.set if kv.split("=", 1)[0] in RESUME_OVERRIDES]]
            else:
                cmd = [sys.executable, "-m", "tailwise", "run", recipe, f"run.seed={seed}", *args.set, *extra, "--out", str(out)]
                if args.branch_from:
                    cmd += ["--branch-from", args.branch_from]
            print(f"[matrix] {' '.join(cmd)}", flush=True)
            code = subprocess.call(cmd)
            if code != 0:
                print(f"[matrix] {out}: exit code {code}", flush=True)
                failures += 1
                if code == 130:
                    return code
    if args.report:
        from tailwise.eval.report import build_report

        report = build_report([*args.report_with, *run_dirs], Path(args.report),
                              warn=lambda msg: print(f"[matrix] report: {msg}", flush=True))
        print(f"[matrix] report of {len(report['runs'])} runs in {args.report}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
