"""bf16 vs fp32 accuracy parity of one recipe over seeds (issue #20), from finished runs, into docs/benchmarks.md.

    python benchmarks/precision_parity.py FP32_RUN_DIR... --bf16 BF16_RUN_DIR... [--section TITLE]
        [--intro TEXT | @FILE] [--write-docs]

The runs must be one recipe that differs only in ``train.precision`` and ``run.seed`` (``tailwise report``'s
grouping refuses anything else). Shown: the two rows (Head / Medium / Tail / All as mean ± sample sd, test set,
last epoch), every run's own numbers, the paired differences bf16 − fp32 over the seeds both have (each seed's own
difference too), and the verdict the issue asks for: whether |mean All(bf16) − mean All(fp32)| is within the fp32
seeds' spread (max − min of their All).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from common import add_intro_option, machine_lines, per_seed_text, publish, section_head

from tailwise.eval.report import PairedDiff, group_rows, load_run, markdown_diffs, markdown_table, method_label
from tailwise.errors import TailwiseError

COLUMNS = ("many", "medium", "few", "all")


def load(paths: list[Path], precision: str) -> list:
    runs = []
    for path in paths:
        try:
            run = load_run(path)
        except ValueError as exc:
            raise TailwiseError(f"{path}: not a finished run ({exc})") from None
        if run.precision != precision:
            raise TailwiseError(f"{path} trained in {run.precision}, but was given as {precision}")
        run.label = method_label(run)
        runs.append(run)
    return runs


def run_line(run) -> str:
    a = run.acc
    return (f"| {run.precision} | {run.seed} | " + " | ".join(f"{a[k]:.2f}" for k in COLUMNS)
            + f" | `{run.path}` |")


def verdict(fp32_row, bf16_row) -> str:
    ref, new = fp32_row.stat("all"), bf16_row.stat("all")
    spread = ref.hi - ref.lo
    delta = new.mean - ref.mean
    within = abs(delta) <= spread
    return (f"**Parity {'holds' if within else 'does not hold'}**: mean All bf16 {new.mean:.2f} (n = {new.n}) vs "
            f"fp32 {ref.mean:.2f} (n = {ref.n}), |Δ All| = {abs(delta):.2f} points "
            f"{'within' if within else 'outside'} the fp32 seeds' spread of {spread:.2f} "
            f"({ref.lo:.2f} … {ref.hi:.2f}; sample sd {ref.sd:.2f}).")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fp32", nargs="+", type=Path, help="the fp32 runs (one per seed)")
    ap.add_argument("--bf16", nargs="+", type=Path, required=True, help="the bf16 runs (one per seed)")
    ap.add_argument("--section", default="Precision parity: bf16 vs fp32, ResNet-32, CIFAR-10-LT IR 100, "
                                         "Balanced Softmax, 200 epochs")
    add_intro_option(ap)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    try:
        fp32, bf16 = load(args.fp32, "fp32"), load(args.bf16, "bf16")
        rows = group_rows(fp32 + bf16)
    except TailwiseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if len(rows) != 2 or len(fp32) < 2:
        print(f"error: expected one recipe in two precisions, with at least two fp32 seeds for a spread; got rows "
              f"{[row.label for row in rows]} and {len(fp32)} fp32 run(s)", file=sys.stderr)
        return 2
    fp32_row, bf16_row = sorted(rows, key=lambda row: row.first.precision != "fp32")
    diff = PairedDiff(bf16_row, fp32_row)
    lines = [*section_head(f"## {args.section}", "benchmarks/precision_parity.py",
                           sys.argv[1:] if argv is None else argv), *machine_lines(torch.get_num_threads()), "",
             args.intro, "", markdown_table(rows)]
    if diff.seeds:
        lines += [markdown_diffs([diff]), "Every seed's own difference (bf16 − fp32, percentage points): "
                  + "; ".join(f"{name} {per_seed_text(diff, metric)}" for metric, name in
                              (("head", "Head"), ("medium", "Medium"), ("tail", "Tail"), ("all", "All"))), ""]
    lines += ["| Precision | Seed | Head | Medium | Tail | All | Run |", "|---|---:|---:|---:|---:|---:|---|",
              *map(run_line, sorted(fp32 + bf16, key=lambda r: (r.precision, r.seed))), "", verdict(fp32_row, bf16_row),
              ""]
    publish("\n".join(lines).replace("\n\n\n", "\n\n"), args.write_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
