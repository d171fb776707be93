"""Regenerate the report of the benchmark matrix: `tailwise report` over finished runs into docs/report/, the
headless-Chromium check and screenshot, and its section in docs/benchmarks.md.

    python benchmarks/matrix_report.py RUN_DIR... [--out docs/report] [--title "..."] [--write-docs]

Unfinished runs are named (with their progress) and left out, as `tailwise report` does.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, publish

from tailwise.errors import TailwiseError
from tailwise.eval.report import build_report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", default=str(ROOT / "docs" / "report"))
    ap.add_argument("--title", default="Report of the CIFAR-10-LT IR 100 matrix (ResNet-32)")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    try:
        report = build_report(args.runs, out, warn=lambda msg: print(msg, file=sys.stderr))
    except TailwiseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    check = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "check_report_html.py"), str(out),
                            "--screenshot", str(out / "report_screenshot.png")], capture_output=True, text=True)
    print(check.stdout + check.stderr, file=sys.stderr)
    rel = out.relative_to(ROOT / "docs") if out.is_relative_to(ROOT / "docs") else out
    lines = [f"## {args.title}", "",
             f"Command (repository root): `python benchmarks/matrix_report.py {' '.join(args.runs)} --write-docs` "
             f"({time.strftime('%Y-%m-%d')}; the runs' machine, seed and settings are in their own sections). It runs "
             f"`tailwise report` into `{rel}/` (`report.html` self-contained, `table.csv`, `plots/`) and "
             "`benchmarks/check_report_html.py`, which renders the page in headless Chromium, checks that the table "
             "and every image loaded, and takes the screenshot "
             f"([`{rel}/report_screenshot.png`]({rel}/report_screenshot.png)); browser check: "
             f"{'passed' if check.returncode == 0 else f'FAILED (exit {check.returncode})'}.", "",
             "C and C/F are relative to the dense run of the same loss and seed; F is the deployed model's MACs as a "
             "percentage of the dense ResNet-32's. Runs that differ only in their seed share a row (mean ± sample "
             "sd, n seeds); the paired differences below the table compare each row with its baseline seed by seed.",
             "",
             (out / "table.md").read_text().strip(), ""]
    if report["warnings"]:
        lines += ["Not in the table (unfinished or unreadable):", ""] + [f"- {w}" for w in report["warnings"]] + [""]
    lines += ["Plots:", ""] + [f"- [{title}]({rel}/plots/{path.name})" for title, path in report["plots"]] + [""]
    text = "\n".join(lines)
    publish(text, args.write_docs)
    return check.returncode


if __name__ == "__main__":
    sys.exit(main())
