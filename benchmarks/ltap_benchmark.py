"""The LTAP benchmark table (issue #5) in the paper's layout, from finished runs, into docs/benchmarks.md.

    python benchmarks/ltap_benchmark.py DENSE_RUN PRUNED_RUN... [--write-docs]

Columns: F(%) (deployed MACs / dense MACs), Head / Medium / Tail / All (test, last epoch), C(%) = 100 x All / All(dense),
C/F, the parameters kept, the best-on-validation epoch's test accuracy, the criterion weights α the last stage's mix
used (for the trial and paper votes), and the
median epoch time of the dense run, of the masked pruning phase and of the fine-tuning on the shrunk model (the
time columns are from the runs' own metrics.jsonl, all on this machine, so compare them as ratios).
Unfinished runs are listed with their progress.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from common import add_intro_option, publish

from tailwise.eval.report import load_run, method_label

SHORT = {"magnitude": "mag", "avg_magnitude": "avg", "cosine_similarity": "cos", "taylor_first_order": "T1",
         "taylor_second_order": "T2"}


def median_time(metrics: list[dict], lo: int, hi: int) -> float | None:
    times = [m["time_s"] for m in metrics if lo <= m.get("epoch", -1) < hi and "time_s" in m]
    return statistics.median(times) if times else None


def fmt(v, nd=1) -> str:
    return "" if v is None else f"{v:.{nd}f}"


def row(run, dense, stage_end: int, epochs: int) -> str:
    r, d = run.result, dense.result
    acc, cost = r["accuracy"], r["cost"]
    C = 100 * acc["all"] / d["accuracy"]["all"]
    F = cost["F"]
    best = r.get("best_on_val")
    best_txt = f"{best['accuracy']['all']:.2f} (ep {best['epoch'] + 1})" if best else ""
    m = r["method"]
    alpha = (m.get("history") or [{}])[-1].get("alpha") or {}  # the weights the last stage's mix used
    alpha_txt = " ".join(f"{SHORT[k]} {v:.2f}" for k, v in alpha.items()) if m.get("vote") in ("trial", "paper", "adaptive") else \
        ("uniform" if m.get("vote") == "uniform" else "")
    start = m.get("start_epoch", 100) - 1
    times = (median_time(run.metrics, start, stage_end), median_time(run.metrics, stage_end, epochs))
    return (f"| {method_label(run)} | {F:.1f} | {acc['many']:.2f} | {acc['medium']:.2f} | {acc['few']:.2f} | "
            f"**{acc['all']:.2f}** | {C:.1f} | {C / F:.2f} | {100 * cost['params'] / cost['params_dense']:.1f} | "
            f"{best_txt} | {alpha_txt} | {fmt(times[0])} / {fmt(times[1])} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dense")
    ap.add_argument("pruned", nargs="+")
    ap.add_argument("--section", default="LTAP: ResNet-32, CIFAR-10-LT IR 100, Balanced Softmax, 200 epochs")
    add_intro_option(ap)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    dense = load_run(Path(args.dense))
    dense.label = "BS"
    epochs = dense.result["epochs"]
    dense_time = median_time(dense.metrics, 100, epochs)
    lines = [f"## {args.section}", "", args.intro, "",
             "| Method | F(%) | Head | Medium | Tail | All | C(%) | C/F | Params kept (%) | All, best on val | "
             "α of the last stage's mix | s/epoch: pruning phase / shrunk fine-tuning |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
             f"| **BS** (dense baseline) | 100.0 | {dense.acc['many']:.2f} | {dense.acc['medium']:.2f} | "
             f"{dense.acc['few']:.2f} | **{dense.acc['all']:.2f}** | 100.0 | 1.00 | 100.0 | "
             f"{dense.result['best_on_val']['accuracy']['all']:.2f} (ep {dense.result['best_on_val']['epoch'] + 1}) | | "
             f"{fmt(dense_time)} (dense, epochs 101-{epochs}) |"]
    for spec in args.pruned:
        path = Path(spec)
        try:
            run = load_run(path)
        except ValueError as exc:
            metrics = path / "metrics.jsonl"
            n = sum(1 for line in metrics.read_text().splitlines() if line.strip()) if metrics.is_file() else 0
            state = f"in progress, {n}/{epochs} epochs (resumes next session)" if n else "not started"
            lines.append(f"| {path.name}: {state} | | | | | | | | | | | |")
            print(f"not finished: {exc}", file=sys.stderr)
            continue
        m = run.result["method"]
        stage_end = m["stage_epochs"][-1]
        lines.append(row(run, dense, stage_end, epochs))
    text = "\n".join(lines) + "\n"
    publish(text, args.write_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
