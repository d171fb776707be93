"""Write the structured-compression section of docs/benchmarks.md from finished pruning runs.

    python benchmarks/compression_report.py RUN_DIR[=label] ... [--write-docs]

Each run directory must hold result.json and the latency files written by

    for t in 2 1; do for cl in "" --channels-last; do
      OMP_NUM_THREADS=$t tailwise bench-latency RUN_DIR --repeats 30 $cl --json > RUN_DIR/latency_t$t${cl:+_cl}.json
    done; done
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import publish

SECTION = "## Structured compression: magnitude pruning on CIFAR-10-LT IR 100 (ResNet-32, short schedule)"
TARGET_SPEEDUP, TARGET_F = 2.5, 30.0


def run_rows(run: Path, label: str) -> tuple[str, list[str], float]:
    r = json.loads((run / "result.json").read_text())
    a, c = r["accuracy"], r["cost"]
    summary = (f"| {label} | {a['many']:.2f} | {a['medium']:.2f} | {a['few']:.2f} | {a['all']:.2f} | "
               f"{c['params']:,} ({100 * c['params'] / c['params_dense']:.1f}%) | {c['macs'] / 1e6:.2f} M | {c['F']:.1f} |")
    latency, speedups = [], []
    for path in sorted(run.glob("latency_t*.json")):
        rep = json.loads(path.read_text())
        for row in rep["rows"]:
            latency.append(f"| {label} | {rep['threads']} | {rep['memory_format']} | {row['batch']} | {row['dense_ms']:.2f} "
                           f"| {row['deployed_ms']:.2f} | {row['speedup']:.2f}x | {row['speedup_median_of_pairs']:.2f}x |")
            if row["batch"] == 128:
                speedups.append(row["speedup"])
    return summary, latency, speedups


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--note", default="")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    summaries, latencies, verdicts = [], [], []
    for spec in args.runs:
        path, _, label = spec.partition("=")
        summary, latency, speedups = run_rows(Path(path), label or Path(path).name)
        summaries.append(summary)
        latencies += latency
        f = json.loads((Path(path) / "result.json").read_text())["cost"]["F"]
        passed = sum(x >= TARGET_SPEEDUP for x in speedups)
        verdicts.append(f"- {label}: F = {f:.1f}% (≤ {TARGET_F:.0f}%: {'PASS' if f <= TARGET_F else 'FAIL'}); batch-128 "
                        f"speed-ups {', '.join(f'{x:.2f}x' for x in speedups)}: ≥ {TARGET_SPEEDUP}x in {passed} of "
                        f"{len(speedups)} thread/format configurations "
                        f"→ {'PASS' if speedups and passed == len(speedups) else 'FAIL'} (all four must pass)")
    text = "\n".join([
        SECTION, "",
        "Commands (repository root): `python benchmarks/matrix.py --out benchmarks/runs -- cifar10_lt_ir100_resnet32_bs_magnitude_short` "
        "(the rounding-free row used the same recipe with `method.round_to=1`), then the `bench-latency` loop in "
        "`benchmarks/compression_report.py`'s docstring, then `python benchmarks/compression_report.py RUN... --write-docs`.",
        "", args.note, "",
        "Recipe: Balanced Softmax, 30 epochs (cosine, 2 warm-up), global magnitude pruning (per-group mean-normalised L2) "
        "to 25% of the dense MACs in 5 stages after epochs 10, 12, 14, 16, 18, hard zeroing, fine-tuning to epoch 30; "
        "seed 0. Accuracy is the physically compressed model's, on the 10,000-image test set (last epoch); "
        "groups are frequency terciles (4/3/3 classes) because CIFAR-10-LT has no class under 20 images.",
        "", "| Run | Many | Medium | Few | All | Params (of dense) | MACs | F % |", "|---|---:|---:|---:|---:|---:|---:|---:|",
        *summaries, "",
        "Latency of the dense ResNet-32 vs the compressed model, `tailwise bench-latency` (one process, the two models "
        "timed alternately, median of 30; the last column is the median of the per-pair ratios):", "",
        "| Run | Threads | Memory format | Batch | Dense ms | Compressed ms | Speed-up | Median pair ratio |",
        "|---|---:|---|---:|---:|---:|---:|---:|", *latencies, "",
        "Acceptance (issue: F ≤ 30% and ≥ 2.5x lower latency at batch 128):", *verdicts, ""])
    publish(text, args.write_docs)


if __name__ == "__main__":
    main()
