"""Print (or write into docs/benchmarks.md) a many/medium/few/all table of finished runs.

    python benchmarks/results_table.py --section "Baselines: ..." RUN_DIR[=label] ... [--published label=all,...] [--write-docs]

Rows come from each run's result.json (last epoch, test split) and metrics.jsonl; a run still training is
listed with its progress and latest validation accuracy so partial matrices are reported honestly. Runs given the
same label are seeds of one configuration: one row per seed, then their mean ± sample sd.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import yaml

from common import add_intro_option, fmt, publish

from tailwise.engine.log import read_metrics
from tailwise.eval.report import summarize


COLUMNS = ("many", "medium", "few", "all")


def finished(run_dir: Path) -> dict | None:
    """The run's result.json, None while it is still training."""
    result_file = run_dir / "result.json"
    return json.loads(result_file.read_text()) if result_file.is_file() else None


def row(run_dir: Path, label: str) -> str:
    r = finished(run_dir)
    if r is not None:
        a, c, best = r["accuracy"], r["cost"], r.get("best_on_val", {})
        best_all = fmt(best.get("accuracy", {}).get("all")) + f" (ep {best['epoch'] + 1})" if best else "-"
        return (f"| {label} | {r['epochs']} | {fmt(a['many'])} | {fmt(a['medium'])} | {fmt(a['few'])} | **{fmt(a['all'])}** "
                f"| {best_all} | {c['params']:,} | {c['F']:.1f} | {r['time_s'] / 60:.0f} |")
    records = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        return f"| {label} | not started | | | | | | | | |"
    last = records[-1]
    total = re.search(r"epochs: (\d+)", (run_dir / "config.yaml").read_text())
    return (f"| {label} | running: {last['epoch'] + 1}/{total.group(1) if total else '?'} | | | | "
            f"(val {fmt(last['val']['all'])}) | | | | |")


def seed_summary_row(label: str, results: list[dict]) -> str:
    """Mean ± sample sd over the seeds of one configuration (``tailwise report``'s statistics)."""
    def cell(values) -> str:
        st = summarize(values)
        return f"{st.mean:.2f} ± {st.sd:.2f}"

    a = [r["accuracy"] for r in results]
    best = [r.get("best_on_val", {}).get("accuracy", {}).get("all") for r in results]
    cells = [cell(x[k] for x in a) for k in COLUMNS]
    best_cell = cell(best) if all(b is not None for b in best) else "-"
    return (f"| **{label}, mean ± sd over {len(results)} seeds** | {results[0]['epochs']} | {cells[0]} | {cells[1]} "
            f"| {cells[2]} | **{cells[3]}** | {best_cell} | {results[0]['cost']['params']:,} "
            f"| {results[0]['cost']['F']:.1f} | {summarize(r['time_s'] / 60 for r in results).mean:.0f} |")


def table_rows(specs: list[str]) -> list[str]:
    """One row per run (``RUN_DIR=label``); runs given the same label are seeds of one configuration: each is
    labelled with its seed, followed by a mean ± sd row once two or more of them have finished."""
    parsed = [(Path(path), label or Path(path).name) for path, _, label in (spec.partition("=") for spec in specs)]
    labels = [label for _, label in parsed]
    lines = []
    for i, (path, label) in enumerate(parsed):
        group = [p for p, lab in parsed if lab == label]
        if len(group) == 1:
            lines.append(row(path, label))
            continue
        seed = yaml.safe_load((path / "config.yaml").read_text())["run"]["seed"]
        lines.append(row(path, f"{label}, seed {seed}"))
        if i == len(labels) - 1 - labels[::-1].index(label):  # the group's last run: its summary
            results = [r for r in map(finished, group) if r is not None]
            if len(results) > 1:
                lines.append(seed_summary_row(label, results))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="RUN_DIR or RUN_DIR=label")
    ap.add_argument("--section", required=True, help="the section heading (without ##)")
    add_intro_option(ap)
    ap.add_argument("--published", nargs="*", default=[], help="'label=all' rows of published numbers")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    lines = [f"## {args.section}", "", args.intro, "",
             "| Run | Epochs | Many | Medium | Few | All (last) | All (best on val) | Params | F % | Train min |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += table_rows(args.runs)
    for spec in args.published:
        label, _, value = spec.partition("=")
        lines.append(f"| {label} (published) | 200 | | | | {value} | | | | |")
    text = "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"
    publish(text, args.write_docs)

if __name__ == "__main__":
    main()
