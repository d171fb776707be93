"""DO against its base recipes over seeds, in the layout of the DO paper's tables, from finished runs.

    python benchmarks/do_benchmark.py --baseline RUN... --do RUN... [--randaugment RUN...] [--images 1000]
        [--threads 2] [--section TITLE] [--intro TEXT | @FILE] [--write-docs]

Runs are matched by their seed (``result.json``); all must share one precision. Rows: each baseline (one
network: ``--baseline``, e.g. Balanced Softmax, and ``--randaugment``, the same with RandAugment, DO's
augmentation), then for each reading of the sub-models' logits -- prior-corrected (``method.prior_correction:
sampler``, the default: each sub-model's logits minus the log label distribution of its stage's sampler, rebuilt
from the run's plan, so runs trained before the option are measured the same way) and raw (``none``, the paper)
-- every sub-model alone (Table 7's per-stage view) and the ensemble under every aggregation: ``average`` (the
paper's "Ours wo TTL"), ``instance`` (instance-level test-time learning, Eq. 5: "Ours") and ``group``
(SADE-style weights learned on the unlabelled test images). Everything is recomputed here from the deployed
sub-models (``model/``) on the whole test split, each member's logits on the images and on both test-time views
computed once (:func:`member_logits`), as many / medium / few / all accuracy, mean ± sample sd over the seeds.
The prediction cost per image of each row is timed on the same test images with the first seed's deployed
models, so the ratios are comparable within one run of this script (a prior correction costs nothing). Then the
paired differences seed by seed (the aggregations and sub-model 1 against every baseline, each seed's own
difference on Few and All), the issue's goals per seed, the per-stage validation accuracies of every DO run
(after collaborative optimisation; the new sub-model with the retraining's BatchNorm statistics, and with
recomputed ones; the ``exempt_probe`` readings), the mean instance-level weight of each sub-model per class group
of the true label (Table 9), and the first seed's validation accuracy of instance-level test-time learning at
several step sizes (the paper gives none).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from common import add_intro_option, fmt, log, machine_lines, one_precision, publish, section_head, signed

from tailwise.engine.precision import DTYPES
from tailwise.eval.report import stat_text, summarize as over_seeds

AGGREGATIONS = ("average", "instance", "group")
GROUPS = ("many", "medium", "few", "all")
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


def run_log_priors(result: dict) -> list[list[float]]:
    """``prior_correction: sampler``'s log prior of every sub-model of a DO run, rebuilt from its ``result.json``
    (the stage plan, the class counts, ``rho_m`` and ``few_sampler``): also for runs trained before the option."""
    from tailwise.methods.do.plan import Stage, stage_log_prior

    m, counts = result["method"], result["dataset"]["class_counts"]
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return [stage_log_prior(Stage(s["kind"], s["group"], s["classes"], s["epochs"], s["start_epoch"], s["lr"],
                                  s["gamma"]), labels, m["rho_m"], m.get("few_sampler", "per_image")).tolist()
            for s in m["plan"]]


@torch.no_grad()
def member_logits(ensemble, x: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The raw logits (``T x N x K``) of every member on ``x`` and on the two test-time views of each batch of
    ``batch`` images (the views :func:`~tailwise.models.ensemble.aggregate` would draw for that batch), computed
    once so that every aggregation and prior correction is evaluated on the same passes."""
    from tailwise.models.ensemble import batch_views

    s = ensemble.settings
    clean, view1, view2 = [], [], []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        v1, v2 = batch_views(xb, s["padding"], s["flip"], s["seed"])
        for out, v in ((clean, xb), (view1, v1), (view2, v2)):
            out.append(torch.stack([m(v).float() for m in ensemble.members]))
    return tuple(torch.cat(parts, 1) for parts in (clean, view1, view2))


def evaluate_cached(logits, log_priors, settings: dict, y: torch.Tensor, groups, batch: int) -> dict:
    """Test accuracy of every member alone and of every aggregation, from :func:`member_logits` with each member's
    logits minus its log prior (none: ``log_priors`` None), and Table 9's mean instance weight per class group of
    the true label: :func:`~tailwise.models.ensemble.combine`, what :class:`SubModelEnsemble` runs, on the cached
    logits (SADE's group weights learned over the batches of ``batch`` images, as ``learn_group_weights``)."""
    from tailwise.eval.metrics import summarize
    from tailwise.models.ensemble import combine, group_weights

    offsets = torch.tensor(log_priors).unsqueeze(1) if log_priors is not None else 0.0
    z, v1, v2 = (t - offsets for t in logits)
    views = (v1.softmax(-1), v2.softmax(-1))
    steps, lr, floor = settings["steps"], settings["lr"], settings["floor"]
    chunks = [(views[0][:, i:i + batch], views[1][:, i:i + batch]) for i in range(0, z.shape[1], batch)]
    predictions = {"average": combine(z, "average")[0],
                   "group": combine(z, "group", group_lambda=group_weights(chunks, steps, lr, floor))[0]}
    predictions["instance"], lam = combine(z, "instance", views, steps, lr, floor)
    out = {"members": [summarize(zt.argmax(1), y, groups) for zt in z],
           **{mode: summarize(p.argmax(1), y, groups) for mode, p in predictions.items()}}
    member = torch.tensor([groups.membership[int(c)] == g for g in ("many", "medium", "few") for c in y]).view(3, -1)
    out["lambda"] = {g: lam[m].double().mean(0).tolist() for g, m in zip(("many", "medium", "few"), member)
                     if m.any()}
    return out


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


def stage_rows(methods: dict) -> list[str]:
    """Table rows of the per-stage validation accuracies in the DO runs' ``result.json`` method records
    (``{seed: method record}``), then the ``exempt_probe`` readings where the runs recorded them."""
    rows = ["| Seed | Stage | Group | gamma | Val all after collaborative optimisation | New sub-model, the "
            "retraining's BN statistics | New sub-model, recomputed BN statistics: all (many / medium / few) |",
            "|---:|---:|---|---:|---:|---:|---:|"]
    for seed, method in methods.items():
        for r in method.get("stages_table", []):
            cpo, stale, tpd = (r.get(k) or {} for k in ("val_cpo", "val_tpd_stale", "val_tpd"))
            if "val_tpd_stale" not in r:  # a run from before issue #22: its sub-models kept the retraining's statistics
                stale, tpd = tpd, {}
            rows.append(f"| {seed} | {r['stage']} | {r['group']} | {fmt(r.get('gamma'))} | {fmt(cpo.get('all'))} | "
                        f"{fmt(stale.get('all'))} | {fmt(tpd.get('all'))} ({fmt(tpd.get('many'))} / "
                        f"{fmt(tpd.get('medium'))} / {fmt(tpd.get('few'))}) |")
    probed = {seed: [r for r in m.get("stages_table", []) if r.get("exempt_probe")] for seed, m in methods.items()}
    first = next((rs for rs in probed.values() if rs), None)
    if first:
        readings = list(first[0]["exempt_probe"])
        exempt = sorted({str(m.get("exempt")) for m in methods.values()})
        rows += ["", f"The same new sub-models (recomputed statistics) with the classifier decoupled as the stricter "
                     f"`exempt` readings would leave it (`exempt_probe`; the runs themselves: `{', '.join(exempt)}`), "
                     "validation all (many / medium / few):", "",
                 "| Seed | Stage | Group | " + " | ".join(f"`exempt: {r}`" for r in readings) + " |",
                 "|---:|---:|---|" + "---:|" * len(readings)]
        for seed, records in probed.items():
            for r in records:
                cells = [f"{fmt(a.get('all'))} ({fmt(a.get('many'))} / {fmt(a.get('medium'))} / {fmt(a.get('few'))})"
                         for a in (r["exempt_probe"][k] for k in readings)]
                rows.append(f"| {seed} | {r['stage']} | {r['group']} | " + " | ".join(cells) + " |")
    return rows


def ms_per_image(model: torch.nn.Module, x: torch.Tensor, batch: int) -> float:
    """Prediction time per image in ms over ``x`` (batches of ``batch``): the slower of two timed passes, after one
    untimed pass (one warm-up batch left the first model timed 25% slow: thread pool and oneDNN set-up)."""
    times = []
    with torch.no_grad():
        for _ in range(3):
            start = time.perf_counter()
            for i in range(0, len(x), batch):
                model(x[i:i + batch])
            times.append(1000 * (time.perf_counter() - start) / len(x))
    return max(times[1:])


def by_seed(paths: list[str], role: str) -> dict:
    """``{seed: (run dir, result.json)}`` of ``paths``; one run per seed."""
    runs = {}
    for path in map(Path, paths):
        result = json.loads((path / "result.json").read_text())
        if result.get("seed") in runs:
            print(f"error: two {role} runs of seed {result.get('seed')}: {runs[result['seed']][0]}, {path}",
                  file=sys.stderr)
            raise SystemExit(2)
        runs[result.get("seed")] = (path, result)
    return dict(sorted(runs.items()))


def mean_cells(values: list[dict]) -> list[str]:
    """Many / medium / few / all as mean ± sample sd over ``values`` (one accuracy dict per seed)."""
    return [stat_text(over_seeds(v[k] for v in values), 2, len(values)) for k in GROUPS]


def seed_diffs(name: str, rows: dict, ref_name: str, ref: dict) -> str:
    """A table line: ``rows`` minus ``ref`` ({seed: accuracy dict}) on Few and All, mean and each seed's own."""
    seeds = [s for s in rows if s in ref]
    cells = []
    for k in ("few", "all"):
        d = {s: rows[s][k] - ref[s][k] for s in seeds}
        cells += [signed(over_seeds(d.values()).mean), ", ".join(f"s{s} {signed(v)}" for s, v in d.items())]
    return f"| {name} | {ref_name} | {len(seeds)} | " + " | ".join(cells) + " |"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", nargs="+", required=True, help="the plain baseline runs, one per seed")
    ap.add_argument("--randaugment", nargs="*", default=[], help="the baseline with RandAugment, one run per seed")
    ap.add_argument("--do", nargs="+", required=True, help="the DO runs, one per seed")
    ap.add_argument("--images", type=int, default=1000, help="test images timed per row")
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--section", default="DO: ResNet-32, CIFAR-10-LT IR 100, 200 epochs")
    add_intro_option(ap)
    ap.add_argument("--write-docs", action="store_true")
    ns = ap.parse_args(argv)
    from tailwise import load_model

    torch.set_num_threads(ns.threads)
    baselines = {"baseline": by_seed(ns.baseline, "baseline")}
    if ns.randaugment:
        baselines["randaugment"] = by_seed(ns.randaugment, "RandAugment baseline")
    dos = by_seed(ns.do, "DO")
    precision = one_precision(r for runs in (*baselines.values(), dos) for _, r in runs.values())
    seed0, (do_dir, do0) = next(iter(dos.items()))
    base_dir = next(iter(baselines["baseline"].values()))[0]
    (x_all, y_all), val, groups = eval_splits(do_dir)
    x = x_all[:ns.images]
    log(f"timing {len(x)} test images, {ns.threads} threads, the seed-{seed0} models")
    ensemble0 = load_model(do_dir)
    cost = {"baseline": ms_per_image(load_model(base_dir), x, ns.batch)}
    # group weights' values do not change the cost: uniform ones when the run did not learn them
    lam_group = ensemble0.settings.get("group_lambda") or [1.0 / len(ensemble0.members)] * len(ensemble0.members)
    for mode in AGGREGATIONS:
        cost[mode] = ms_per_image(ensemble0.with_aggregation(mode, group_lambda=lam_group), x, ns.batch)
        log(f"{mode}: {cost[mode]:.3f} ms / image")
    CORRECTIONS = {"sampler": "prior-corrected (default)", "none": "raw logits (paper)"}
    measured = {}  # seed -> correction -> evaluate_cached(...)
    priors = {seed: {"sampler": run_log_priors(result), "none": None} for seed, (_, result) in dos.items()}
    dtype = DTYPES.get(precision)  # the runs' own evaluation precision ('-': none recorded, full precision)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        for seed, (path, _) in dos.items():
            log(f"seed {seed}: every sub-model on {len(x_all)} test images and two views ({precision})")
            ensemble = load_model(path)
            logits = member_logits(ensemble, x_all, ns.batch)
            measured[seed] = {c: evaluate_cached(logits, priors[seed][c], ensemble.settings, y_all, groups, ns.batch)
                              for c in CORRECTIONS}
        corrected0 = ensemble0.with_aggregation("instance", log_priors=priors[seed0]["sampler"])
        strength = tta_strength(corrected0, *val, groups) if val is not None else []

    seeds = ", ".join(map(str, dos))
    rows = [f"| Method | Aggregation | Seeds | {' | '.join(g.capitalize() for g in GROUPS)} | Prediction ms / image "
            "| x baseline |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    accuracy = {}  # row name -> {seed: accuracy dict}
    for role, runs in baselines.items():
        r0 = next(iter(runs.values()))[1]
        name = f"{r0['loss']}{' + RandAugment' if role == 'randaugment' else ''} ({r0['epochs']} ep)"
        accuracy[name] = {s: r["accuracy"] for s, (_, r) in runs.items()}
        rows.append(f"| {name} | one network | {', '.join(map(str, runs))} | "
                    + " | ".join(mean_cells(list(accuracy[name].values()))) + f" | {cost['baseline']:.3f} | 1.00 |")
    n_members = len(ensemble0.members)
    for correction, label in CORRECTIONS.items():
        suffix = "" if correction == "sampler" else ", raw logits"
        for t in range(n_members):
            what = ("the whole final network" if t == n_members - 1 else "frozen entries of stage 1" if t == 0
                    else f"frozen entries of stages 1-{t + 1}")
            per_seed = {s: measured[s][correction]["members"][t] for s in dos}
            accuracy[f"DO sub-model {t + 1} alone{suffix}"] = per_seed
            rows.append(f"| DO sub-model {t + 1} alone ({what}) | {label} | {seeds} | "
                        + " | ".join(mean_cells(list(per_seed.values()))) + " | - | - |")
        for mode in AGGREGATIONS:
            per_seed = {s: measured[s][correction][mode] for s in dos}
            accuracy[f"DO, {mode}{suffix}"] = per_seed
            rows.append(f"| DO ({n_members} sub-models, {do0['epochs']} ep) | {LABELS[mode]}, {label} | {seeds} | "
                        + " | ".join(f"**{c}**" if k == "all" else c
                                     for k, c in zip(GROUPS, mean_cells(list(per_seed.values()))))
                        + f" | {cost[mode]:.3f} | {cost[mode] / cost['baseline']:.2f} |")
    refs = [name for name in accuracy if not name.startswith("DO")]
    diffs = ["Paired differences, Row − Reference (percentage points, test set): the mean over the seeds both have, "
             "then each seed's own:", "", "| Row | Reference | n | Few | Few, per seed | All | All, per seed |",
             "|---|---|---:|---:|---|---:|---|"]
    diffs += [seed_diffs(name, accuracy[name], ref, accuracy[ref])
              for name in accuracy if name.startswith("DO,") or name.startswith("DO sub-model 1 alone")
              for ref in refs]
    goals = ["", "The issue's goals, seed by seed: sub-model 1 alone ≥ 58% All; DO (instance-level test-time learning, "
             "the paper's \"Ours\") at least level with the RandAugment baseline on All, with a higher Few:", ""]
    ra = next((accuracy[n] for n in refs if "RandAugment" in n), None)
    for s in dos:
        parts = []
        for correction, label in CORRECTIONS.items():
            m = measured[s][correction]
            sub1, ours = m["members"][0]["all"], m["instance"]
            part = f"{label}: sub-model 1 alone {sub1:.2f} ({'met' if sub1 >= 58 else 'not met'})"
            if ra is not None and s in ra:
                level = ours["all"] >= ra[s]["all"] and ours["few"] > ra[s]["few"]
                part += (f", DO All {ours['all']:.2f} vs {ra[s]['all']:.2f}, Few {ours['few']:.2f} vs "
                         f"{ra[s]['few']:.2f} ({'met' if level else 'not met'})")
            parts.append(part)
        goals.append(f"- seed {s}: " + "; ".join(parts))
    lams = {s: measured[s]["sampler"]["lambda"] for s in dos}
    lines = [*section_head(f"## {ns.section}", "benchmarks/do_benchmark.py",
                          sys.argv[1:] if argv is None else argv),
             *([ns.intro, ""] if ns.intro else []), *machine_lines(ns.threads),
             f"- Precision of every run: {precision}; seeds: {seeds}; timing: {len(x)} test images, batch "
             f"{ns.batch}, the seed-{seed0} models", "", *rows, "", *diffs, *goals, "", *stage_rows(
                 {s: r["method"] for s, (_, r) in dos.items()})]
    lines += ["", "Mean instance-level weight lambda_t per class group of the true label (Table 9), over the whole test "
              "split, computed here from the deployed sub-models (prior-corrected):", "",
              "| Seed | Group | " + " | ".join(f"lambda_{t + 1}" for t in range(n_members)) + " |",
              "|---:|---|" + "---:|" * n_members,
              *(f"| {s} | {g} | " + " | ".join(f"{v:.3f}" for v in vals) + " |"
                for s, lam in lams.items() for g, vals in lam.items())]
    if strength:
        lines += ["", "Instance-level test-time learning (prior-corrected) at other step sizes (`method.tta_lr`; the "
                  f"run used {ensemble0.settings['lr']:g} with {ensemble0.settings['steps']} steps), seed {seed0}, on the "
                  f"validation split ({len(val[1])} images):", "",
                  "| tta_lr | Many | Medium | Few | All | Mean largest weight per image |",
                  "|---:|---:|---:|---:|---:|---:|", *strength]
    section = "\n".join(lines) + "\n"
    publish(section, ns.write_docs)


if __name__ == "__main__":
    main()
