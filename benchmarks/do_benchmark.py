"""DO against its base recipe, in the layout of the DO paper's tables, from two finished runs.

    python benchmarks/do_benchmark.py BASELINE_RUN DO_RUN [--images 1000] [--threads 2] [--write-docs]

Rows: the baseline (one network) and the DO run's sub-model ensemble under every aggregation -- ``average``
(the paper's "Ours wo TTL"), ``instance`` (instance-level test-time learning, Eq. 5: "Ours") and ``group``
(SADE-style weights learned on the unlabelled test images) -- with many / medium / few / all test accuracy (the
DO run's ``result.json`` has them all: ``method.final.test_by_aggregation``) and the measured prediction cost
per image of each, timed here on the same test images with the deployed models (``model/``), so the ratios are
comparable within one run of this script. A second table gives the per-stage validation accuracies (Table 7:
after collaborative optimisation and after decoupling) and the instance weights per class group (Table 9).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from common import fmt, log, machine_lines, publish, section_head

AGGREGATIONS = ("average", "instance", "group")
LABELS = {"average": "average of the sub-models (paper: Ours wo TTL)",
          "instance": "instance-level test-time learning (paper: Ours)",
          "group": "group-level weights learned on the unlabelled test set (SADE-style)"}


def test_images(run_dir: Path, n: int) -> torch.Tensor:
    """The first ``n`` test images of ``run_dir``'s data, normalised as its model expects."""
    from tailwise.config import config_from_dict, load_recipe
    from tailwise.data.dataset import build_data
    from tailwise.data.loader import BatchLoader

    cfg = config_from_dict(load_recipe(run_dir / "config.yaml"))
    test = build_data(cfg.data, log=lambda msg: None).test
    pre = json.loads((run_dir / "model" / "arch.json").read_text())["preprocess"]
    loader = BatchLoader(test.images[:n], test.labels[:n], n, pre["mean"], pre["std"])
    return next(iter(loader))[0]


def ms_per_image(model: torch.nn.Module, x: torch.Tensor, batch: int, repeats: int = 2) -> float:
    """Median over ``repeats`` passes of the prediction time per image (batches of ``batch``)."""
    times = []
    with torch.no_grad():
        model(x[:batch])  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            for i in range(0, len(x), batch):
                model(x[i:i + batch])
            times.append(1000 * (time.perf_counter() - start) / len(x))
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("baseline")
    ap.add_argument("do_run")
    ap.add_argument("--images", type=int, default=1000, help="test images timed per row")
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--section", default="DO: ResNet-32, CIFAR-10-LT IR 100, 200 epochs")
    ap.add_argument("--intro", default="")
    ap.add_argument("--write-docs", action="store_true")
    ns = ap.parse_args()
    from tailwise import load_model

    torch.set_num_threads(ns.threads)
    base_dir, do_dir = Path(ns.baseline), Path(ns.do_run)
    base, do = (json.loads((d / "result.json").read_text()) for d in (base_dir, do_dir))
    final = do["method"].get("final", {})
    by_agg = final.get("test_by_aggregation") or {do["method"]["aggregation"]: do["accuracy"]}
    x = test_images(do_dir, ns.images)
    log(f"timing {len(x)} test images, {ns.threads} threads")
    dense = load_model(base_dir)
    ensemble = load_model(do_dir)
    cost = {"baseline": ms_per_image(dense, x, ns.batch)}
    members = ensemble.settings.get("group_lambda")
    for mode in AGGREGATIONS:
        ensemble.settings["aggregation"] = mode
        # group weights' values do not change the cost: uniform ones when the run did not learn them
        ensemble.settings["group_lambda"] = members or [1.0 / len(ensemble.members)] * len(ensemble.members)
        cost[mode] = ms_per_image(ensemble, x, ns.batch)
        log(f"{mode}: {cost[mode]:.3f} ms / image")

    b = base["accuracy"]
    rows = ["| Method | Aggregation | Many | Medium | Few | All | Prediction ms / image | x baseline |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
            f"| {base['loss']} ({base['method']['name']}, {base['epochs']} ep) | one network | {fmt(b['many'])} | "
            f"{fmt(b['medium'])} | {fmt(b['few'])} | **{fmt(b['all'])}** | {cost['baseline']:.3f} | 1.00 |"]
    n_members = len(ensemble.members)
    for mode in AGGREGATIONS:
        a = by_agg.get(mode)
        if a is None:
            continue
        rows.append(f"| DO ({n_members} sub-models, {do['epochs']} ep) | {LABELS[mode]} | {fmt(a['many'])} | "
                    f"{fmt(a['medium'])} | {fmt(a['few'])} | **{fmt(a['all'])}** | {cost[mode]:.3f} | "
                    f"{cost[mode] / cost['baseline']:.2f} |")
    stages = ["| Stage | Group | gamma | Val all after collaborative optimisation | Val all after decoupling |",
              "|---:|---|---:|---:|---:|"]
    for r in do["method"].get("stages_table", []):
        cpo, tpd = r.get("val_cpo") or {}, r.get("val_tpd") or {}
        stages.append(f"| {r['stage']} | {r['group']} | {fmt(r.get('gamma'))} | {fmt(cpo.get('all'))} | "
                      f"{fmt(tpd.get('all'))} |")
    lam = final.get("test_time", {}).get("mean_lambda_per_group")
    lines = [*section_head(f"## {ns.section}", "benchmarks/do_benchmark.py", sys.argv[1:]), *([ns.intro, ""] if ns.intro else []),
             *machine_lines(ns.threads),
             f"- Runs: `{base_dir}` (baseline), `{do_dir}` (DO); timing: {len(x)} test images, batch {ns.batch}", "",
             *rows, "", *stages]
    if lam:
        lines += ["", "Mean instance weight per class group of the true label (Table 9; sub-models in stage order): "
                  + "; ".join(f"{g}: {', '.join(f'{v:.3f}' for v in vals)}" for g, vals in lam.items())]
    section = "\n".join(lines) + "\n"
    publish(section, ns.write_docs)


if __name__ == "__main__":
    main()
