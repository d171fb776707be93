"""benchmarks/method_benchmark.py: the method-vs-base table is computed from the runs' own result files."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from test_engine import tiny_config, trainer_for

ROOT = Path(__file__).resolve().parents[1]


def train(out: Path, method: dict | None) -> dict:
    raw = tiny_config(epochs=3)
    if method:
        raw["method"] = method
    trainer_for(raw, out).fit()
    return json.loads((out / "result.json").read_text())


def test_table_rows_deltas_and_within_run_overhead(tmp_path):
    base = train(tmp_path / "base", None)
    plastic = train(tmp_path / "plastic", {"name": "plasticity", "every_epochs": 1, "alpha": 0.25,
                                           "last_event_epoch": 2})
    more = train(tmp_path / "more", {"name": "more", "amplitude": 2.0})
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "metrics.jsonl").write_text(json.dumps({"epoch": 6, "time_s": 1.0}) + "\n")
    pairs = [f"{tmp_path / 'base'}:{tmp_path / name}" for name in ("plastic", "more", "unfinished")]
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "method_benchmark.py"), "--section", "T", *pairs],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in out.stdout.splitlines() if line.startswith("| balanced_softmax")}
    assert len(rows) == 3  # the shared base run appears once
    for result in (plastic, more):
        label = next(k for k in rows if result["method"]["name"] in k.lower())
        row = rows[label]
        assert row[5] == f"**{result['accuracy']['all']:.2f}**"
        assert row[6] == f"{result['accuracy']['all'] - base['accuracy']['all']:+.2f}"
        assert row[7] == f"{result['accuracy']['few'] - base['accuracy']['few']:+.2f}"
        assert row[8] == f"{result['cost']['params']:,}"
    assert rows["dense"][6] == ""  # no delta for the base itself
    # plasticity: every epoch but the last ends in an event (every_epochs 1, the last epoch is exempt)
    records = [json.loads(line) for line in (tmp_path / "plastic" / "metrics.jsonl").read_text().splitlines()]
    scoring = [r["time_s"] for r in records if "plasticity" in r]
    other = [r["time_s"] for r in records if "plasticity" not in r]
    assert len(scoring) == 2 and len(other) == 1
    slower = statistics.median(scoring) / statistics.median(other)
    assert f"x{slower:.2f} on 2 of 3 epochs, i.e. x{1 + (slower - 1) * 2 / 3:.3f} over the run" in out.stdout
    assert out.stdout.count(" duplicated / ") == 2
    assert "events after epochs 1..2" in next(k for k in rows if "plasticity" in k)
    val = [r["val"]["all"] for r in records]  # before the surgery of epoch 1 -> one epoch later
    assert "after epoch 1: " in out.stdout and f"val all {val[0]:.1f} -> {val[1]:.1f} one epoch later" in out.stdout
    # the split's bias at the second event, recomputed here from the event record
    layers = plastic["method"]["history"][1]["layers"].values()
    pair = statistics.median(layer["pair_score_ratio"] for layer in layers)
    split = sum(layer["split_channels"] for layer in layers)
    assert split > 0 and f"after epoch 2: {pair:.2f} / " in out.stdout and f", {split} split" in out.stdout
    ratio = more["method"]["overhead"]["ratio"]
    assert f"x{ratio:.2f} (" in out.stdout and "merge check" in out.stdout
    branch = more["method"]["branch"]
    assert branch["samples"] == 40  # the whole synthetic test set: 4 classes x 10, under the 512 stratified cap
    by_group = branch["logit_share_by_group"]
    assert (f"| `more` | {more['seed']} | {branch['weight_ratio_median']:.2e} | {branch['weight_ratio_max']:.2e} "
            f"(`{branch['weight_ratio_max_layer']}`) | {branch['logit_share']:.2e} | "
            + " | ".join(f"{by_group[g]:.2e}" if g in by_group else "-" for g in ("many", "medium", "few"))
            + " | 40 |") in out.stdout
    assert "+ MORE (W_g joint, A' 2, sine, rank ratio 0.1)" in rows  # the phase is the whole run: no epochs named
    # more_branch.py rebuilds the run from its config and last checkpoint: the same branch as the run recorded
    rebuilt = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "more_branch.py"), str(tmp_path / "more")],
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert rebuilt.returncode == 0, rebuilt.stderr
    row = next(line for line in rebuilt.stdout.splitlines() if line.startswith("| `more`"))
    assert (f"| 3 | {branch['weight_ratio_median']:.2e} | {branch['weight_ratio_max']:.2e} "
            f"(`{branch['weight_ratio_max_layer']}`) | {branch['logit_share']:.2e} (40 test images) |") in row
    refused = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "more_branch.py"), str(tmp_path / "more"),
                              str(tmp_path / "plastic")], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert refused.returncode == 2 and "not a MORE run" in refused.stderr and refused.stdout == ""
    assert "`" + str(tmp_path / "unfinished") + "` (epoch 7 finished)" in out.stdout
    assert "- Precision of every run: fp32" in out.stdout
    # a bf16 method run against an fp32 base is refused: a table holds one precision
    shutil.copytree(tmp_path / "more", tmp_path / "more_bf16")
    (tmp_path / "more_bf16" / "result.json").write_text(json.dumps({**more, "precision": "bf16"}))
    mixed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "method_benchmark.py"), "--section", "T",
                            f"{tmp_path / 'base'}:{tmp_path / 'more_bf16'}"], capture_output=True, text=True,
                           timeout=120)
    assert mixed.returncode == 2 and "mix precisions (bf16, fp32)" in mixed.stderr


def test_rejects_a_spec_without_a_pair(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "method_benchmark.py"), "--section", "T",
                          str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "BASE_RUN:METHOD_RUN" in out.stderr


def test_seeds_share_a_row_with_paired_differences_and_twin_counts(tmp_path):
    """Two seeds of a base and of a plasticity run: one row each (mean ± sample sd), the paired differences
    seed by seed, and every seed's twin count, against statistics computed here from the result files."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import method_benchmark as mb

    results, pairs = {}, []
    for seed in (3, 4):
        for name, method in (("base", None), ("plastic", {"name": "plasticity", "every_epochs": 1,
                                                          "last_event_epoch": 2})):
            raw = tiny_config(epochs=3)
            raw["run"]["seed"] = seed
            if method:
                raw["method"] = method
            trainer_for(raw, tmp_path / f"{name}_s{seed}").fit()
            results[name, seed] = json.loads((tmp_path / f"{name}_s{seed}" / "result.json").read_text())
        pairs.append((tmp_path / f"base_s{seed}", tmp_path / f"plastic_s{seed}"))
    runs = {p: mb.load_run(p) for pair in pairs for p in pair}
    text = "\n".join(mb.seed_lines(pairs, runs))
    plastic_all = [results["plastic", s]["accuracy"]["all"] for s in (3, 4)]
    row = next(line for line in text.splitlines() if line.startswith("| balanced_softmax + plasticity"))
    assert "| n = 2 |" in row
    assert f"{statistics.fmean(plastic_all):.1f} ± {statistics.stdev(plastic_all):.1f}" in row
    diffs = {s: results["plastic", s]["accuracy"]["all"] - results["base", s]["accuracy"]["all"] for s in (3, 4)}
    per_seed = ", ".join(f"s{s} {d:+.2f}".replace("-", "−") for s, d in diffs.items())
    assert per_seed in text
    for s in (3, 4):
        twins = results["plastic", s]["method"]["twins"]
        assert f"s{s} {twins['twins']} of {twins['width']} (effective width {twins['effective']})" in text
    # the growth issue's goals, recomputed here from the result files
    few = {s: results["plastic", s]["accuracy"]["few"] - results["base", s]["accuracy"]["few"] for s in (3, 4)}
    met = [s for s in (3, 4) if few[s] >= 0 and diffs[s] >= 0]
    mean_met = statistics.fmean(few.values()) >= 0 and statistics.fmean(diffs.values()) >= 0
    goal = next(line for line in text.splitlines() if line.startswith("- Goal, balanced_softmax + plasticity")
                and "against" in line)
    assert f"Few {statistics.fmean(few.values()):+.2f}".replace("-", "−") in goal
    assert f"**{'met' if mean_met else 'not met'}**; met by {len(met)} of 2 seeds" in goal
    twin_goal = next(line for line in text.splitlines() if "no twins left 1 epochs after an event" in line)
    for s in (3, 4):  # events after epochs 1 and 2: one count before the second event, one at the end
        history = results["plastic", s]["method"]["history"]
        before, end = history[1]["twins_before"]["twins"], results["plastic", s]["method"]["twins"]["twins"]
        assert f"s{s} {before} before the event after epoch 2, {end} at the end" in twin_goal
    zero = all(results["plastic", s]["method"]["history"][1]["twins_before"]["twins"] == 0
               and results["plastic", s]["method"]["twins"]["twins"] == 0 for s in (3, 4))
    assert twin_goal.endswith(f"**{'met' if zero else 'not met'}**.")
    assert mb.seed_lines(pairs[:1], {p: runs[p] for p in pairs[0]}) == []  # one seed: no seed table


def test_a_branched_run_is_timed_on_its_own_epochs():
    """A branched run's metrics.jsonl starts with its source's records: only the epochs it trained count."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import method_benchmark as mb
    from common import epoch_times, first_own_epoch

    records = [{"epoch": e, "time_s": t} for e, t in enumerate([10.0, 10.0, 10.0, 30.0, 50.0])]
    assert first_own_epoch({"branched_from": {"epoch": 3}}) == 3
    assert epoch_times(records, 3) == [30.0, 50.0]
    assert mb.median_epoch_s(records, 3) == 40.0  # epochs 3 and 4, not 10.0
    assert first_own_epoch({}) == 0
    assert first_own_epoch(None) == 0  # still training
    assert mb.median_epoch_s(records) == 10.0
    assert mb.median_epoch_s(records, 5) is None


def test_first_own_epoch_of_a_branch_written_as_a_run_writes_it(tmp_path):
    """A branch's metrics.jsonl as a run writes it: the source's records of the epochs before the checkpoint's
    epoch (the next epoch to train; ``copy_source_metrics``), then the branch's own. The benchmarks time exactly
    the branch's own epochs, the first of them the checkpoint's epoch itself."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import epoch_times, first_own_epoch

    from tailwise.engine.branch import copy_source_metrics
    from tailwise.engine.log import read_metrics

    source, branch = tmp_path / "dense", tmp_path / "ltap"
    source.mkdir(), branch.mkdir()
    (source / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "time_s": 1.0}) + "\n" for e in range(5)))
    checkpoint_epoch = 2  # checkpoints/epoch_002.pt: saved after training epochs 0 and 1
    copy_source_metrics(source, branch / "metrics.jsonl", checkpoint_epoch)
    with open(branch / "metrics.jsonl", "a") as fh:  # the epochs the branch trained, timed differently
        fh.write("".join(json.dumps({"epoch": e, "time_s": 7.0 + e, "pruning_stage": {}}) + "\n" for e in (2, 3, 4)))
    records = read_metrics(branch / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1, 2, 3, 4]
    first = first_own_epoch({"branched_from": {"epoch": checkpoint_epoch}})
    assert first == 2 and all("pruning_stage" in r for r in records if r["epoch"] >= first)
    assert epoch_times(records, first) == [9.0, 10.0, 11.0]
