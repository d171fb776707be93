"""Run a list of recipes x seeds one after another: skip finished runs, resume interrupted ones.

    python benchmarks/matrix.py --out benchmarks/runs [--seeds 0,1,2] [--set key=value ...]
                                [--branch-from DENSE_RUN_s{seed}/checkpoints/epoch_099.pt] [--dry-run]
                                [--report DIR [--report-with RUN_DIR ...]] -- RECIPE[:key=value,...] ...

Each run goes to ``<out>/<recipe>_s<seed>`` (plus a tag for per-recipe overrides). A run whose ``result.json``
exists is skipped; one with ``checkpoints/last.pt`` is resumed; otherwise it starts. Runs execute in this process
one at a time (two at once halve each other's speed on 2 cores), recipe by recipe, each over all seeds.

Seeds: ``--seeds 0,1,2`` (or ``--seeds 0 1 2``, or a mix) runs every recipe once per seed, with ``run.seed=SEED``.

Branching: ``--branch-from`` starts every new run from a plain run's end-of-epoch checkpoint (``tailwise run
--branch-from``, which requires the same data, model, loss, train settings and seed). Since a run must branch from
the dense run of its own seed, the path may contain ``{seed}``, replaced by each run's seed, e.g.
``--branch-from benchmarks/runs/cifar10_lt_ir100_resnet32_bs_s{seed}/checkpoints/epoch_099.pt``; a path without
``{seed}`` is refused with more than one seed. The dense runs come first, from their own invocation without
``--branch-from`` and with ``--set run.keep_checkpoints=[99]``, which keeps the state after 99 epochs as
``checkpoints/epoch_099.pt``. Before anything runs, every checkpoint a new run needs is checked: when one is
missing, the matrix names them all and exits with code 2 (finished and resumable runs need none).

``--dry-run`` prints the plan (skip / resume / command of each run) and runs nothing. ``--report DIR`` afterwards
regenerates ``tailwise report`` of the matrix's runs (and of ``--report-with`` runs): the seeds of a recipe form one
row (mean ± sample sd), each row is compared seed by seed with its dense baseline row.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tailwise.config import RESUME_OVERRIDES
from tailwise.errors import TailwiseError


@dataclass
class PlannedRun:
    recipe: str
    extra: list[str]  # this recipe's own key=value overrides
    seed: int
    out: Path

    @property
    def finished(self) -> bool:
        return (self.out / "result.json").is_file()

    @property
    def resumable(self) -> bool:
        return (self.out / "checkpoints" / "last.pt").is_file()


def run_dir_name(recipe: str, seed: int, extra: list[str]) -> str:
    tag = "".join(f"_{kv.split('=')[0].split('.')[-1]}{kv.split('=')[1]}" for kv in extra)
    return f"{Path(recipe).stem}{tag}_s{seed}"


def parse_seeds(token: str) -> list[int]:
    """The seeds of one ``--seeds`` argument: '0,1,2' -> [0, 1, 2]; '3' -> [3]."""
    try:
        seeds = [int(part) for part in token.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{token!r}: seeds are non-negative integers, e.g. --seeds 0,1,2") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"{token!r}: seeds are non-negative integers, e.g. --seeds 0,1,2")
    return seeds


def branch_checkpoint(pattern: str, seed: int) -> Path:
    """The checkpoint the runs of ``seed`` branch from: ``pattern`` with ``{seed}`` replaced."""
    return Path(pattern.replace("{seed}", str(seed)))


def plan(recipes: list[str], seeds: list[int], out: str) -> list[PlannedRun]:
    """Every (recipe, seed) run in execution order: recipe by recipe, each over all seeds."""
    runs = []
    for spec in recipes:
        recipe, _, extra_text = spec.partition(":")
        extra = [kv for kv in extra_text.split(",") if kv]
        runs += [PlannedRun(recipe, extra, seed, Path(out) / run_dir_name(recipe, seed, extra)) for seed in seeds]
    return runs


def check_branch_points(runs: list[PlannedRun], pattern: str | None, seeds: list[int]) -> None:
    """Refuse, before anything runs, a ``--branch-from`` that cannot serve every seed: no ``{seed}`` with several
    seeds, or a checkpoint missing for a seed that has a run to start."""
    if pattern is None:
        return
    if "{seed}" not in pattern and len(seeds) > 1:
        raise TailwiseError(f"--branch-from {pattern} has no {{seed}} placeholder, but --seeds is "
                            f"{','.join(map(str, seeds))}: each run branches from the dense run of its own seed, e.g. "
                            "--branch-from benchmarks/runs/DENSE_s{seed}/checkpoints/epoch_099.pt")
    starting = sorted({r.seed for r in runs if not r.finished and not r.resumable})
    missing = [f"seed {s}: {branch_checkpoint(pattern, s)}" for s in starting
               if not branch_checkpoint(pattern, s).is_file()]
    if missing:
        raise TailwiseError("--branch-from: no dense checkpoint for " + "; ".join(missing) + ". Train those seeds' "
                            "dense runs first (keeping that epoch's checkpoint: run.keep_checkpoints), then rerun; "
                            "nothing was started")


def command(run: PlannedRun, overrides: list[str], pattern: str | None) -> list[str] | None:
    """The ``tailwise run`` command of a run: None when finished, ``--resume`` when interrupted, else a new run
    (branched from its seed's checkpoint with ``pattern``)."""
    if run.finished:
        return None
    if run.resumable:
        return [sys.executable, "-m", "tailwise", "run", "--resume", str(run.out),
                *[kv for kv in overrides if kv.split("=", 1)[0] in RESUME_OVERRIDES]]
    cmd = [sys.executable, "-m", "tailwise", "run", run.recipe, f"run.seed={run.seed}", *overrides, *run.extra,
           "--out", str(run.out)]
    return cmd + ["--branch-from", str(branch_checkpoint(pattern, run.seed))] if pattern else cmd


def execute(runs: list[PlannedRun], args) -> int:
    """Run the plan one run at a time; 0 when all succeeded, 1 after failures, 130 when interrupted."""
    failures = 0
    for run in runs:
        cmd = command(run, args.set, args.branch_from)
        if cmd is None:
            print(f"[matrix] {run.out}: finished, skipping", flush=True)
            continue
        print(f"[matrix] {' '.join(cmd)}", flush=True)
        if args.dry_run:
            continue
        code = subprocess.call(cmd)
        if code != 0:
            print(f"[matrix] {run.out}: exit code {code}", flush=True)
            failures += 1
            if code == 130:
                return code
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="+", help="recipe name or path, optionally with ':key=value,key=value' overrides")
    ap.add_argument("--out", default="benchmarks/runs")
    ap.add_argument("--seeds", type=parse_seeds, nargs="+", default=[[0]], metavar="SEEDS",
                    help="seeds, comma- or space-separated (default 0): --seeds 0,1,2")
    ap.add_argument("--set", nargs="*", default=[], help="overrides applied to every run")
    ap.add_argument("--branch-from", metavar="CHECKPOINT", help="start new runs from this plain run's checkpoint; "
                    "'{seed}' in the path is replaced by each run's seed (required with several seeds)")
    ap.add_argument("--dry-run", action="store_true", help="print what each run would do; run nothing")
    ap.add_argument("--report", metavar="DIR", help="afterwards, regenerate `tailwise report` of these runs (and of "
                    "--report-with runs) into DIR; unfinished runs are named and skipped")
    ap.add_argument("--report-with", nargs="*", default=[], metavar="RUN_DIR", help="extra runs for --report")
    args = ap.parse_args(argv)
    seeds = list(dict.fromkeys(s for group in args.seeds for s in group))
    runs = plan(args.recipes, seeds, args.out)
    try:
        check_branch_points(runs, args.branch_from, seeds)
    except TailwiseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    code = execute(runs, args)
    if code == 130 or not args.report or args.dry_run:
        return code
    from tailwise.eval.report import build_report

    try:
        report = build_report([*args.report_with, *(r.out for r in runs)], Path(args.report),
                              warn=lambda msg: print(f"[matrix] report: {msg}", flush=True))
    except TailwiseError as exc:
        print(f"error: report: {exc}", file=sys.stderr)
        return 2
    print(f"[matrix] report of {len(report['runs'])} runs in {args.report}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
