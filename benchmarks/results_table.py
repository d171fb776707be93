"""Print (or write into docs/benchmarks.md) a many/medium/few/all table of finished runs.

    python benchmarks/results_table.py --section "Baselines: ..." RUN_DIR[=label] ... [--published label=all,...] [--write-docs]

Rows come from each run's result.json (last epoch, test split) and metrics.jsonl; a run still training is
listed with its progress and latest validation accuracy so partial matrices are reported honestly.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from common import add_intro_option, fmt, publish


def row(run_dir: Path, label: str) -> str:
    result_file = run_dir / "result.json"
    if result_file.is_file():
        r = json.loads(result_file.read_text())
        a, c, best = r["accuracy"], r["cost"], r.get("best_on_val", {})
        best_all = fmt(best.get("accuracy", {}).get("all")) + f" (ep {best['epoch'] + 1})" if best else "-"
        return (f"| {label} | {r['epochs']} | {fmt(a['many'])} | {fmt(a['medium'])} | {fmt(a['few'])} | **{fmt(a['all'])}** "
                f"| {best_all} | {c['params']:,} | {c['F']:.1f} | {r['time_s'] / 60:.0f} |")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (run_dir / "metrics.jsonl").is_file() else []
    if not records:
        return f"| {label} | not started | | | | | | | | |"
    last = records[-1]
    total = re.search(r"epochs: (\d+)", (run_dir / "config.yaml").read_text())
    return (f"| {label} | running: {last['epoch'] + 1}/{total.group(1) if total else '?'} | | | | "
            f"(val {fmt(last['val']['all'])}) | | | | |")


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
    for spec in args.runs:
        path, _, label = spec.partition("=")
        lines.append(row(Path(path), label or Path(path).name))
    for spec in args.published:
        label, _, value = spec.partition("=")
        lines.append(f"| {label} (published) | 200 | | | | {value} | | | | |")
    text = "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"
    publish(text, args.write_docs)

if __name__ == "__main__":
    main()
