"""The LTAP benchmark (issue #21) in the paper's layout, over seeds, from finished runs, into docs/benchmarks.md.

    python benchmarks/ltap_benchmark.py RUN_DIR... [--latency RUN_DIR] [--section TITLE] [--intro TEXT | @FILE]
        [--write-docs]

RUN_DIRs: the dense runs and the pruned runs of every seed. Runs that differ only in ``run.seed`` share a row
(``tailwise report``'s grouping and statistics, :mod:`tailwise.eval.report`): F(%), Head / Medium / Tail / All (test,
last epoch), C(%) = 100 x All / All(dense run of the same seed) and C/F, as mean ± sample sd over the seeds. Then
the paired differences, seed by seed: every row against its dense baseline, and the default LTAP row (``vote:
trial``) against every other pruned row, each with every seed's own difference on Tail and All. Then per row: the
parameters kept, the criterion weights α that the last stage's mix used (mean over seeds), the trials' seconds per
stage (``vote: trial``), and the median epoch time of the masked pruning phase and of the fine-tuning on the shrunk
model (from the runs' own metrics.jsonl: compare them as ratios, the runs shared the machine differently).
``--latency RUN_DIR``: batch 1 and 128 latency of that run's deployed model against the dense ResNet-32, measured
now in this process (``tailwise bench-latency``'s measurement, contiguous and channels_last; run it idle).
Unfinished runs are listed with their progress.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from common import add_intro_option, machine_lines, one_precision, per_seed_text, publish, section_head, signed

from tailwise.compress.cost import latency_report
from tailwise.engine.log import read_metrics
from tailwise.eval.report import (PairedDiff, Row, assign_baselines, group_rows, load_run, markdown_diffs,
                                  markdown_table, method_label, summarize)

SHORT = {"magnitude": "mag", "avg_magnitude": "avg", "cosine_similarity": "cos", "taylor_first_order": "T1",
         "taylor_second_order": "T2"}


def median_time(metrics: list[dict], lo: int, hi: int) -> float | None:
    times = [m["time_s"] for m in metrics if lo <= m.get("epoch", -1) < hi and "time_s" in m]
    return statistics.median(times) if times else None


def mean_of(values) -> float | None:
    return summarize(values).mean


def fmt(v, nd=1) -> str:
    return "" if v is None else f"{v:.{nd}f}"


def is_pruned_ltap(row: Row, vote: str) -> bool:
    m = row.first.method
    return m.get("name") == "ltap" and m.get("vote") == vote


def detail_line(row: Row) -> str:
    """Params kept, α of the last stage's mix, trial seconds per stage, pruning-phase / fine-tuning s/epoch."""
    runs = row.runs
    kept = mean_of(100 * r.cost["params"] / r.cost["params_dense"] for r in runs if r.cost.get("params_dense"))
    alpha_txt = ""
    if row.first.method.get("name") == "ltap":
        if row.first.method.get("vote") == "uniform":
            alpha_txt = "uniform"
        else:
            last = [(r.method.get("history") or [{}])[-1].get("alpha") or {} for r in runs]
            keys = list(last[0])
            alpha_txt = " ".join(f"{SHORT.get(k, k)} {mean_of(a.get(k) for a in last):.2f}" for k in keys)
    trial = [statistics.fmean(t) for r in runs if (t := (r.method.get("overhead") or {}).get("trial_s_per_stage"))]
    phases = []
    for r in runs:
        m, epochs = r.method, r.result["epochs"]
        if m.get("stage_epochs"):
            start, end = m.get("start_epoch", 100) - 1, m["stage_epochs"][-1]
            phases.append((median_time(r.metrics, start, end), median_time(r.metrics, end, epochs)))
        else:
            phases.append((None, median_time(r.metrics, 100, epochs)))
    pruning = mean_of(p[0] for p in phases)
    finetune = mean_of(p[1] for p in phases)
    time_txt = f"{fmt(pruning)} / {fmt(finetune)}" if pruning is not None else f"{fmt(finetune)} (epochs 101-)"
    return (f"| {row.label} | n = {len(runs)} | {fmt(kept)} | {alpha_txt} | {fmt(mean_of(trial)) if trial else ''} "
            f"| {time_txt} |")


def goal_line(rows: list[Row]) -> str:
    """Issue #21's goal: ``vote: trial`` beats ``vote: uniform`` on Tail by at least 2 points on the mean of three
    seeds or more, every seed's own difference positive, at C of at least 99% (the trial row's mean)."""
    trial = next((row for row in rows if is_pruned_ltap(row, "trial")), None)
    uniform = next((row for row in rows if is_pruned_ltap(row, "uniform")), None)
    d = PairedDiff(trial, uniform) if trial is not None and uniform is not None else None
    if d is None or not d.seeds:
        return ""
    a, b = trial.values("tail"), uniform.values("tail")
    per_seed = [a[s] - b[s] for s in d.seeds if a[s] is not None and b[s] is not None]
    tail, c = statistics.fmean(per_seed), trial.stat("C").mean
    met = len(per_seed) >= 3 and tail >= 2.0 and min(per_seed) > 0 and c is not None and c >= 99.0
    return (f"**Goal (issue #21): trial − uniform on Tail ≥ +2 points on the mean of at least three seeds, every seed "
            f"positive, at C ≥ 99%: {'met' if met else 'not met'}** -- Tail {signed(tail)} over {len(per_seed)} "
            f"seeds ({per_seed_text(d, 'tail')}), C of the trial row {fmt(c, 2)}%.")


def latency_lines(run_dir: Path) -> list[str]:
    lines = [f"Latency of `{run_dir}`'s deployed model against the dense ResNet-32 (`tailwise bench-latency`: one "
             f"process, the two timed alternately, median of 30), {platform.machine()}, {torch.get_num_threads()} "
             f"threads, fp32, {time.strftime('%Y-%m-%d')}:", "",
             "| Memory format | Batch | Dense ms | Compressed ms | Speed-up | Median pair ratio |",
             "|---|---:|---:|---:|---:|---:|"]
    for channels_last in (False, True):
        rep = latency_report(run_dir, batches=(1, 128), repeats=30, channels_last=channels_last)
        lines += [f"| {rep['memory_format']} | {r['batch']} | {r['dense_ms']:.2f} | {r['deployed_ms']:.2f} | "
                  f"{r['speedup']:.2f}x | {r['speedup_median_of_pairs']:.2f}x |" for r in rep["rows"]]
    return lines


def progress(path: Path) -> str:
    n = len(read_metrics(path / "metrics.jsonl", skip_damaged=True))  # a line being written is no finished epoch
    return f"- `{path}`: " + (f"in progress, {n} epochs done" if n else "not started")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--latency", type=Path, help="a finished pruned run whose deployed model to time")
    ap.add_argument("--section", default="LTAP: ResNet-32, CIFAR-10-LT IR 100, Balanced Softmax, 200 epochs")
    add_intro_option(ap)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    runs, unfinished = [], []
    for spec in args.runs:
        try:
            run = load_run(Path(spec))
        except ValueError:
            unfinished.append(progress(Path(spec)))
            continue
        run.label = method_label(run)
        runs.append(run)
    precision = one_precision(r.result for r in runs)
    rows = group_rows(runs)
    assign_baselines(rows, None)
    diffs = [PairedDiff(row, row.baseline) for row in rows if row.baseline not in (None, row)]
    lead = next((row for row in rows if is_pruned_ltap(row, "trial")), None)
    if lead is not None:
        diffs += [PairedDiff(lead, row) for row in rows if row is not lead and not row.first.is_dense]
    diffs = [d for d in diffs if d.seeds]
    lines = [*section_head(f"## {args.section}", "benchmarks/ltap_benchmark.py", sys.argv[1:] if argv is None
                           else argv), *machine_lines(torch.get_num_threads()),
             f"- Precision of every run: {precision}; seeds: "
             f"{', '.join(str(s) for s in sorted({r.seed for r in runs}))}", "", args.intro, "",
             markdown_table(rows), markdown_diffs(diffs),
             "Every seed's own difference (Row − Reference, percentage points):", "",
             "| Row | Reference | Tail, per seed | All, per seed |", "|---|---|---|---|",
             *(f"| {d.row.label} | {d.ref.label} | {per_seed_text(d, 'tail')} | {per_seed_text(d, 'all')} |"
               for d in diffs), "", goal_line(rows), "",
             "Per row (means over its seeds): parameters kept, the criterion weights α of the last stage's mix, the "
             "trials' seconds per stage, and the median seconds per epoch of the masked pruning phase / the shrunk "
             "fine-tuning:", "",
             "| Method | Seeds | Params kept (%) | α of the last stage's mix | Trial s/stage | s/epoch |",
             "|---|---:|---:|---|---:|---:|", *(detail_line(row) for row in rows), ""]
    if unfinished:
        lines += ["Not finished, so not in the tables:", "", *unfinished, ""]
    if args.latency:
        lines += latency_lines(args.latency) + [""]
    publish("\n".join(lines).replace("\n\n\n", "\n\n"), args.write_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
