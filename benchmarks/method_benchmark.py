"""A training-time method against the same recipe without it, from finished runs (plasticity, MORE).

    python benchmarks/method_benchmark.py --section "TITLE" BASE_RUN:METHOD_RUN [BASE_RUN:METHOD_RUN ...]
        [--intro TEXT | @FILE] [--write-docs]

One row per run (each base run once, then its method runs): many / medium / few / all test accuracy of the last
epoch, the change against its base run, parameters and MACs of the deployed model, and the median epoch wall time
(training + validation + the method's end-of-epoch work) with its ratio to the base run's over the same epochs (a
run branched from the base's checkpoint, e.g. a MORE phase from epoch 160, is timed on its own epochs only). Base
and method runs were trained at different times on a shared machine, so that ratio carries the machine's noise;
each method also reports a within-run measurement that does not:

- ``plasticity``: the median time of the scoring epochs (those that end in a growth/removal event: the extra
  reweighted backward and the surgery) over the median of the other epochs of the same run, and per event the
  channels duplicated / removed and the validation accuracy before the surgery and one epoch after it, and
  (runs with the split-bias records) the split's bias on the ranking at each event after the first;
- ``more``: the method's own step timing (steps with the general-only pass over steps with the base loss only, on
  the same reparametrised model), the low-rank parameter count and the merge check of the deployed model.

With two or more seeds of a row, runs that differ only in their seed share a row (mean ± sample sd), each method
row is compared with its base row seed by seed, and the issues' goals are checked on the mean paired difference
and seed by seed (MORE #24: Few at least +1 point over the plain fine-tuning control with All not lower;
plasticity #23: All and Few at least the dense run's, and no channel with a twin ``E_mod`` epochs after an event
nor at the end). MORE runs get a table of the trained branch's size per class group.

A run without ``result.json`` (still training) is listed under the table with its last finished epoch.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from common import (add_intro_option, epoch_times, first_own_epoch, fmt, machine_lines, one_precision,
                    per_seed_text, publish, section_head, signed)

from tailwise.engine.log import read_metrics
from tailwise.eval import report


def load_run(path: Path) -> dict:
    """The run directory ``path``, its ``result.json`` (``None`` while training) and its per-epoch records."""
    result = path / "result.json"
    return {"path": path, "result": json.loads(result.read_text()) if result.is_file() else None,
            "records": read_metrics(path / "metrics.jsonl")}


def method_label(result: dict) -> str:
    m = result["method"]
    if m["name"] == "plasticity":
        events = m.get("event_epochs") or []
        when = f", events after epochs {events[0]}..{events[-1]}" if events else ""
        return f"+ plasticity (E_mod {m['every_epochs']}{when}, alpha {m['alpha']}, {m['scope']})"
    if m["name"] == "more":
        start = (m.get("phase") or {}).get("start_epoch")
        epochs = f", epochs {start}-{result['epochs'] - 1}" if start else ""
        return f"+ MORE (W_g {report.more_general(m)}, A' {m['amplitude']:g}, {m['schedule']}, rank ratio {m['ratio']:g}{epochs})"
    return "dense" if m["name"] == "none" else f"+ {m['name']}"


def median_epoch_s(records: list[dict], first: int = 0) -> float | None:
    """Median wall time of the epochs from ``first`` on; ``None`` without any."""
    times = epoch_times(records, first)
    return statistics.median(times) if times else None


def within_run_lines(run: dict) -> list[str]:
    """The method's own overhead measurement and its bookkeeping, as bullet lines."""
    result, label = run["result"], f"`{run['path'].name}`"
    m = result["method"]
    if m["name"] == "plasticity":
        scoring = [r["time_s"] for r in run["records"] if "plasticity" in r]
        other = [r["time_s"] for r in run["records"] if "plasticity" not in r]
        lines = []
        if scoring and other:
            a, b = statistics.median(scoring), statistics.median(other)
            n = len(scoring) + len(other)  # medians, not sums: an epoch slowed by other work is not the method's
            lines.append(f"- {label}: scoring epochs (reweighted ranking + surgery) median {a:.1f} s vs the other "
                         f"epochs {b:.1f} s: x{a / b:.2f} on {len(scoring)} of {n} epochs, "
                         f"i.e. x{1 + (a / b - 1) * len(scoring) / n:.3f} over the run")
        val_all = {r["epoch"]: r["val"]["all"] for r in run["records"] if r.get("val")}

        def val_change(epoch: int) -> str:  # validation runs before the epoch's surgery
            if epoch in val_all and epoch + 1 in val_all:
                return f", val all {val_all[epoch]:.1f} -> {val_all[epoch + 1]:.1f} one epoch later"
            return ""

        events = "; ".join(f"after epoch {e['epoch'] + 1}: {e['duplicated']} duplicated / {e['removed']} removed"
                           f"{val_change(e['epoch'])}" for e in m.get("history", []))
        lines.append(f"- {label}: events {events}; final parameters {result['cost']['params']:,} "
                     f"(dense {result['cost']['params_dense']:,})")
        return lines + split_bias_lines(label, m.get("history", []))
    if m["name"] == "more":
        o, check = m.get("overhead") or {}, m.get("merge_check") or {}
        lines = []
        if o.get("ratio"):
            lines.append(f"- {label}: training step with the general-only pass {1000 * o['step_s_with_more']:.1f} ms "
                         f"vs base loss only {1000 * o['step_s_without_more']:.1f} ms (same model, alpha = 0 steps): "
                         f"x{o['ratio']:.2f} ({o['steps_with']} vs {o['steps_without']} steps); general pass "
                         f"{1000 * o['general_fwd_s']:.1f} ms per step")
        elif o.get("step_s_without_more"):
            lines.append(f"- {label}: no step ran the general-only pass (alpha = 0 throughout): "
                         f"{1000 * o['step_s_without_more']:.1f} ms per step")
        lines.append(f"- {label}: {m['layers_reparametrised']} layers reparametrised, {m['lowrank_params']:,} low-rank "
                     f"parameters during training; merge check {json.dumps(check)}")
        return lines
    return []


SPLIT_BIAS = ("pair_score_ratio", "split_score_ratio", "split_outgoing_ratio")


def split_bias_lines(label: str, history: list[dict]) -> list[str]:
    """The split's bias on the ranking at each event after the first (growth's event records, the median over the
    layers of each ratio; ``-`` where no layer has one), and the number of channels split so far."""
    cells = []
    for e in history[1:]:
        layers = list(e.get("layers", {}).values())
        if not layers or not all(SPLIT_BIAS[0] in layer for layer in layers):
            continue  # a run from before the bias records
        ratios = []
        for key in SPLIT_BIAS:
            values = [layer[key] for layer in layers if layer.get(key) is not None]
            ratios.append(f"{statistics.median(values):.2f}" if values else "-")
        cells.append(f"after epoch {e['epoch'] + 1}: {' / '.join(ratios)}, "
                     f"{sum(layer['split_channels'] for layer in layers)} split")
    if not cells:
        return []
    return [f"- {label}: split bias, median over layers of the last pairs' raw score / layer median, earlier-split "
            f"channels' raw score / median, split channels' f_c·||W_out|| / never-split median, and the channels "
            f"split so far: {'; '.join(cells)}"]


def seed_lines(pairs: list[tuple[Path, Path]], runs: dict) -> list[str]:
    """Runs that differ only in ``run.seed`` as one row (mean ± sample sd, ``tailwise report``'s grouping), then
    each method row against its base row seed by seed, with every seed's own difference on Few and All; for
    plasticity rows, the channels with a twin at the end. Empty unless some row has two or more finished seeds."""
    loaded = {}
    for path, run in runs.items():
        if run["result"] is not None:
            loaded[path] = report.load_run(path)
            loaded[path].label = f"{run['result']['loss']} {method_label(run['result'])}"
    rows = report.group_rows(list(loaded.values()))
    if not any(len(row.runs) > 1 for row in rows):
        return []
    report.assign_baselines(rows, None)
    row_of = {r.path: row for row in rows for r in row.runs}
    diffs = []
    for base, method in pairs:
        if base in loaded and method in loaded:
            d = report.PairedDiff(row_of[loaded[method].path], row_of[loaded[base].path])
            if d.seeds and not any(e.row is d.row and e.ref is d.ref for e in diffs):
                diffs.append(d)
    lines = ["Over seeds (runs that differ only in their seed share a row):", "", report.markdown_table(rows),
             report.markdown_diffs(diffs), "Every seed's own difference (Row − Reference, percentage points):", "",
             "| Row | Reference | Few, per seed | All, per seed |", "|---|---|---|---|",
             *(f"| {d.row.label} | {d.ref.label} | {per_seed_text(d, 'tail')} | {per_seed_text(d, 'all')} |"
               for d in diffs), ""]
    for row in rows:
        twins = [(r.method.get("twins") or {}) for r in row.runs if r.method.get("name") == "plasticity"]
        if twins and all("twins" in t for t in twins):
            lines.append(f"- {row.label}: channels with a twin at the end "
                         + ", ".join(f"s{r.seed} {t['twins']} of {t['width']} (effective width {t['effective']})"
                                     for r, t in zip(row.runs, twins)))
    return lines + ["", *goal_lines(diffs), *twin_goal_lines(rows)]


# the issues' goals for a method row against its base row, on the mean of the paired per-seed differences
GOALS = {"more": ("a Few gain of at least 1 point over the base (the plain fine-tuning control), with All not lower",
                  lambda few, all_: few >= 1.0 and all_ >= 0.0),
         "plasticity": ("All at least the base's, with Few at least the base's",
                        lambda few, all_: few >= 0.0 and all_ >= 0.0)}


def goal_lines(diffs: list) -> list[str]:
    """Per method row: its issue's goal (GOALS) on the mean paired difference, and seed by seed."""
    lines = []
    for d in diffs:
        name = d.row.first.method.get("name")
        if name not in GOALS or (name == "more" and d.row.first.method.get("amplitude") == 0):
            continue  # no goal for other methods, nor for MORE's A' = 0 control
        text, met = GOALS[name]
        few, all_ = d.stat("tail").mean, d.stat("all").mean
        a, b = d.row.values, d.ref.values
        per_seed = [s for s in d.seeds if met(a("tail")[s] - b("tail")[s], a("all")[s] - b("all")[s])]
        lines.append(f"- Goal, {d.row.label} against {d.ref.label}: {text}. Mean over {len(d.seeds)} seeds: Few "
                     f"{signed(few)}, All {signed(all_)}: **{'met' if met(few, all_) else 'not met'}**; met by "
                     f"{len(per_seed)} of {len(d.seeds)} seeds ({', '.join(f's{s}' for s in per_seed) or 'none'}).")
    return lines + ([""] if lines else [])


def twin_goal_lines(rows: list) -> list[str]:
    """Plasticity rows: the channels with a twin before every event after the first (``twins_before``: E_mod
    epochs after the previous event's copies were made) and at the end; the goal (#23) is that there are none."""
    lines = []
    for row in rows:
        runs = [r for r in row.runs if r.method.get("name") == "plasticity"]
        if not runs:
            continue
        cells, met = [], True
        for r in runs:
            events = r.method.get("history") or []
            before = [e["twins_before"]["twins"] for e in events[1:] if "twins_before" in e]
            end = (r.method.get("twins") or {}).get("twins")
            if len(before) < len(events) - 1 or end is None:
                cells.append(f"s{r.seed} not recorded (a run from before the twins_before record)")
                met = False
                continue
            met &= not any(before) and end == 0
            cells.append(f"s{r.seed} " + ", ".join(f"{n} before the event after epoch {e['epoch'] + 1}"
                                                   for n, e in zip(before, events[1:])) + f", {end} at the end")
        lines.append(f"- Goal, {row.label}: no twins left {runs[0].method.get('every_epochs')} epochs after an event "
                     f"(channels with a twin: {'; '.join(cells)}): **{'met' if met else 'not met'}**.")
    return lines + ([""] if lines else [])


def branch_lines(runs: dict) -> list[str]:
    """MORE runs: the trained branch's size at the end (``method.branch`` of result.json), one line per run."""
    more = [(path, run["result"]) for path, run in runs.items() if run["result"] is not None
            and run["result"]["method"]["name"] == "more" and run["result"]["method"].get("branch")]
    if not more:
        return []
    lines = ["Branch size at the end of training (`method.branch` of each run's result.json): ||BA||_F / ||W_g||_F "
             "per layer, and the branch's share of the logits, mean ||f(x; W_g + BA) − f(x; W_g)|| / mean "
             "||f(x; W_g + BA)|| on test images stratified by class, over all of them and per group of the true "
             "class:", "", "| Run | Seed | median ‖BA‖/‖W_g‖ | max ‖BA‖/‖W_g‖ (layer) | Share: all | Many | Medium "
             "| Few | Images |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for path, result in more:
        b = result["method"]["branch"]
        by_group = b.get("logit_share_by_group") or {}
        lines.append(f"| `{path.name}` | {result.get('seed')} | {b['weight_ratio_median']:.2e} | "
                     f"{b['weight_ratio_max']:.2e} (`{b['weight_ratio_max_layer']}`) | {b['logit_share']:.2e} | "
                     + " | ".join(f"{by_group[g]:.2e}" if g in by_group else "-" for g in ("many", "medium", "few"))
                     + f" | {b['samples']} |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", nargs="+", metavar="BASE_RUN:METHOD_RUN")
    ap.add_argument("--section", required=True, help="the docs section's heading (without '## ')")
    ap.add_argument("--threads", type=int, default=2, help="torch threads the runs trained with (for the record)")
    add_intro_option(ap)
    ap.add_argument("--write-docs", action="store_true")
    ns = ap.parse_args()
    pairs = []
    for spec in ns.pairs:
        base, sep, method = spec.partition(":")
        if not sep:
            sys.exit(f"method_benchmark: expected BASE_RUN:METHOD_RUN, got {spec!r}")
        pairs.append((Path(base), Path(method)))
    runs = {p: load_run(p) for pair in pairs for p in pair}
    for p, run in runs.items():
        if not run["records"]:
            sys.exit(f"method_benchmark: {p} has no metrics.jsonl")
    precision = one_precision(run["result"] for run in runs.values() if run["result"] is not None)  # finished

    rows = ["| Loss | Model | Many | Medium | Few | All | Δ All | Δ Few | Params | MACs (M) | Median epoch s | x base |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    unfinished, notes, shown = [], [], set()
    for base_path, method_path in pairs:
        base = runs[base_path]
        for path, is_base in ((base_path, True), (method_path, False)):
            run = runs[path]
            if path in shown:
                continue
            shown.add(path)
            result = run["result"]
            if result is None:
                unfinished.append(f"`{path}` (epoch {run['records'][-1]['epoch'] + 1} finished)")
                continue
            acc, cost = result["accuracy"], result["cost"]
            first = first_own_epoch(result)  # the base over the same epochs: a branched run's own are its last ones
            t, t_base = median_epoch_s(run["records"], first), median_epoch_s(base["records"], first)
            delta = ("", "") if is_base or base["result"] is None else (
                f"{acc['all'] - base['result']['accuracy']['all']:+.2f}",
                f"{acc['few'] - base['result']['accuracy']['few']:+.2f}")
            rows.append(f"| {result['loss']} | {method_label(result)} | {fmt(acc['many'])} | {fmt(acc['medium'])} | "
                        f"{fmt(acc['few'])} | **{fmt(acc['all'])}** | {delta[0]} | {delta[1]} | {cost['params']:,} | "
                        f"{cost['macs'] / 1e6:.2f} | {t:.1f} | {t / t_base:.2f} |")
            if not is_base:
                notes += within_run_lines(run)
    lines = [*section_head(f"## {ns.section}", "benchmarks/method_benchmark.py", sys.argv[1:]),
             *([ns.intro, ""] if ns.intro else []), *machine_lines(ns.threads),
             f"- Precision of every run: {precision}", "- Runs: " + ", ".join(f"`{p}`" for p in runs), "",
             *rows, ""]
    lines += seed_lines(pairs, runs) + branch_lines(runs)
    if notes:
        lines += ["Overhead measured within each method run, and what the method did:", "", *notes, ""]
    if unfinished:
        lines += ["Still training (not in the table): " + ", ".join(unfinished) + ".", ""]
    publish("\n".join(lines), ns.write_docs)


if __name__ == "__main__":
    main()
