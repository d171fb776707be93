"""DO against its base recipe, in the layout of the DO paper's tables, from two finished runs.

    python benchmarks/do_benchmark.py BASELINE_RUN DO_RUN [--images 1000] [--threads 2] [--write-docs]

Rows: the baseline (one network) and the DO run's sub-model ensemble under every aggregation -- ``average``
(the paper's "Ours wo TTL"), ``instance`` (instance-level test-time learning, Eq. 5: "Ours") and ``group``
(SADE-style weights learned on the unlabelled test images) -- with many / medium / few / all test accuracy (the
DO run's ``result.json`` has them all: ``method.final.test_by_aggregation``) and the measured prediction cost
per image of each, timed here on the same test images with the deployed models (``model/``), so the ratios are
comparable within one run of this script; then every sub-model alone on the whole test split (Table 7's
per-stage view). A second table gives the per-stage validation accuracies (after collaborative optimisation;
the new sub-model with the retraining's BatchNorm statistics, and with recomputed ones), a third the mean
instance-level weight of each sub-model per class group of the true label (Table 9), computed here from the
deployed sub-models whatever aggregation the run itself used, and a fourth the validation accuracy of
instance-level test-time learning at several step sizes (the paper gives none).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from common import add_intro_option, fmt, log, machine_lines, publish, section_head

AGGREGATIONS = ("average", "instance", "group")
LABELS = {"average": "average of the sub-models (paper: Ours wo TTL)",
          "instance": "instance-level test-time learning (paper: Ours)",
          "group": "group-level weights learned on the unlabelled test set (SADE-style)"}


def eval_splits(run_dir: Path):
    """The test and validation splits of ``run_dir``'s data as ``(images, labels)``, normalised as its model
    expects (validation ``None`` without one), and the data's shot groups."""
    from tailwise.config import config_from_dict, load_recipe
    from tailwise.data.dataset import build_data
    from tailwise.data.loader import BatchLoader

    cfg = config_from_dict(load_recipe(run_dir / "config.yaml"))
    data = build_data(cfg.data, log=lambda msg: None)
    pre = json.loads((run_dir / "model" / "arch.json").read_text())["preprocess"]

    def tensors(split):
        batches = list(BatchLoader(split.images, split.labels, 500, pre["mean"], pre["std"]))
        return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])

    return tensors(data.test), tensors(data.val) if data.val is not None else None, data.groups


@torch.no_grad()
def members_and_weights(ensemble, x: torch.Tensor, y: torch.Tensor, groups, batch: int) -> tuple[list, dict]:
    """Test accuracy of every sub-model alone (Table 7's per-stage rows) and, under instance-level test-time
    learning, the mean weight lambda_t per class group of the true label (Table 9), over the whole test split."""
    from tailwise.eval.metrics import summarize

    preds = [[] for _ in ensemble.members]
    lams = []
    instance = ensemble.with_aggregation("instance")
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        for t, member in enumerate(ensemble.members):
            preds[t].append(member(xb).argmax(1))
        lams.append(instance.forward_with_weights(xb)[1])
    alone = [summarize(torch.cat(p), y, groups) for p in preds]
    lam = torch.cat(lams).double()
    member = torch.tensor([groups.membership[int(c)] == g for g in ("many", "medium", "few") for c in y]).view(3, -1)
    weights = {g: lam[m].mean(0).tolist() for g, m in zip(("many", "medium", "few"), member) if m.any()}
    return alone, weights


@torch.no_grad()
def tta_strength(ensemble, x: torch.Tensor, y: torch.Tensor, groups, lrs=(1.0, 10.0, 100.0, 1000.0)) -> list[str]:
    """Table rows: validation accuracy of instance-level test-time learning at each step size (the paper gives
    no optimiser settings; the run's ``tta_steps`` kept), with the mean largest weight per image."""
    from tailwise.eval.metrics import summarize

    rows = []
    for lr in lrs:
        out, lam = ensemble.with_aggregation("instance", lr=lr).forward_with_weights(x)
        a = summarize(out.argmax(1), y, groups)
        rows.append(f"| {lr:g} | {fmt(a['many'])} | {fmt(a['medium'])} | {fmt(a['few'])} | {fmt(a['all'])} | "
                    f"{float(lam.max(1).values.mean()):.3f} |")
    return rows


def stage_rows(method: dict) -> list[str]:
    """Table rows of the per-stage validation accuracies in a DO run's ``result.json`` method record."""
    rows = ["| Stage | Group | gamma | Val all after collaborative optimisation | New sub-model, the retraining's "
            "BN statistics | New sub-model, recomputed BN statistics: all (many / medium / few) |",
            "|---:|---|---:|---:|---:|---:|"]
    for r in method.get("stages_table", []):
        cpo, stale, tpd = (r.get(k) or {} for k in ("val_cpo", "val_tpd_stale", "val_tpd"))
        if "val_tpd_stale" not in r:  # a run from before issue #22: its sub-models kept the retraining's statistics
            stale, tpd = tpd, {}
        rows.append(f"| {r['stage']} | {r['group']} | {fmt(r.get('gamma'))} | {fmt(cpo.get('all'))} | "
                    f"{fmt(stale.get('all'))} | {fmt(tpd.get('all'))} ({fmt(tpd.get('many'))} / "
                    f"{fmt(tpd.get('medium'))} / {fmt(tpd.get('few'))}) |")
    probed = [r for r in method.get("stages_table", []) if r.get("exempt_probe")]
    if probed:
        readings = list(probed[0]["exempt_probe"])
        rows += ["", f"The same new sub-models (recomputed statistics) with the classifier decoupled as the stricter "
                     f"`exempt` readings would leave it (`exempt_probe`; the run itself: `{method.get('exempt')}`), "
                     "validation all (many / medium / few):", "",
                 "| Stage | Group | " + " | ".join(f"`exempt: {r}`" for r in readings) + " |",
                 "|---:|---|" + "---:|" * len(readings)]
        for r in probed:
            cells = [f"{fmt(a.get('all'))} ({fmt(a.get('many'))} / {fmt(a.get('medium'))} / {fmt(a.get('few'))})"
                     for a in (r["exempt_probe"][k] for k in readings)]
            rows.append(f"| {r['stage']} | {r['group']} | " + " | ".join(cells) + " |")
    return rows


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
    add_intro_option(ap)
    ap.add_argument("--write-docs", action="store_true")
    ns = ap.parse_args()
    from tailwise import load_model

    torch.set_num_threads(ns.threads)
    base_dir, do_dir = Path(ns.baseline), Path(ns.do_run)
    base, do = (json.loads((d / "result.json").read_text()) for d in (base_dir, do_dir))
    final = do["method"].get("final", {})
    by_agg = final.get("test_by_aggregation") or {do["method"]["aggregation"]: do["accuracy"]}
    (x_all, y_all), val, groups = eval_splits(do_dir)
    x = x_all[:ns.images]
    log(f"timing {len(x)} test images, {ns.threads} threads")
    dense = load_model(base_dir)
    ensemble = load_model(do_dir)
    log(f"sub-models alone and instance weights on {len(x_all)} test images")
    alone, lam = members_and_weights(ensemble, x_all, y_all, groups, ns.batch)
    strength = tta_strength(ensemble, *val, groups) if val is not None else []
    cost = {"baseline": ms_per_image(dense, x, ns.batch)}
    # group weights' values do not change the cost: uniform ones when the run did not learn them
    lam_group = ensemble.settings.get("group_lambda") or [1.0 / len(ensemble.members)] * len(ensemble.members)
    for mode in AGGREGATIONS:
        cost[mode] = ms_per_image(ensemble.with_aggregation(mode, group_lambda=lam_group), x, ns.batch)
        log(f"{mode}: {cost[mode]:.3f} ms / image")

    b = base["accuracy"]
    rows = ["| Method | Aggregation | Many | Medium | Few | All | Prediction ms / image | x baseline |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
            f"| {base['loss']} ({base['method']['name']}, {base['epochs']} ep) | one network | {fmt(b['many'])} | "
            f"{fmt(b['medium'])} | {fmt(b['few'])} | **{fmt(b['all'])}** | {cost['baseline']:.3f} | 1.00 |"]
    n_members = len(ensemble.members)
    for t, a in enumerate(alone):
        what = ("the whole final network" if t == n_members - 1 else "frozen entries of stage 1" if t == 0
                else f"frozen entries of stages 1-{t + 1}")
        rows.append(f"| DO sub-model {t + 1} alone ({what}) | - | {fmt(a['many'])} | {fmt(a['medium'])} | "
                    f"{fmt(a['few'])} | {fmt(a['all'])} | - | - |")
    for mode in AGGREGATIONS:
        a = by_agg.get(mode)
        if a is None:
            continue
        rows.append(f"| DO ({n_members} sub-models, {do['epochs']} ep) | {LABELS[mode]} | {fmt(a['many'])} | "
                    f"{fmt(a['medium'])} | {fmt(a['few'])} | **{fmt(a['all'])}** | {cost[mode]:.3f} | "
                    f"{cost[mode] / cost['baseline']:.2f} |")
    stages = stage_rows(do["method"])
    lines = [*section_head(f"## {ns.section}", "benchmarks/do_benchmark.py", sys.argv[1:]), *([ns.intro, ""] if ns.intro else []),
             *machine_lines(ns.threads),
             f"- Runs: `{base_dir}` (baseline), `{do_dir}` (DO); timing: {len(x)} test images, batch {ns.batch}", "",
             *rows, "", *stages]
    lines += ["", "Mean instance-level weight lambda_t per class group of the true label (Table 9), over the whole test "
              "split, computed here from the deployed sub-models:", "",
              "| Group | " + " | ".join(f"lambda_{t + 1}" for t in range(n_members)) + " |",
              "|---|" + "---:|" * n_members,
              *(f"| {g} | " + " | ".join(f"{v:.3f}" for v in vals) + " |" for g, vals in lam.items())]
    if strength:
        lines += ["", f"Instance-level test-time learning at other step sizes (`method.tta_lr`; the run used "
                  f"{ensemble.settings['lr']:g} with {ensemble.settings['steps']} steps), on the validation split "
                  f"({len(val[1])} images):", "",
                  "| tta_lr | Many | Medium | Few | All | Mean largest weight per image |",
                  "|---:|---:|---:|---:|---:|---:|", *strength]
    section = "\n".join(lines) + "\n"
    publish(section, ns.write_docs)


if __name__ == "__main__":
    main()
