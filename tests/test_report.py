"""`tailwise report`: paper-layout table numbers, CSV round trip, bad runs, plots, HTML, and seeds grouped into rows
with hand-computed statistics and paired differences (synthetic run dirs)."""
from __future__ import annotations

import base64
import importlib.util
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tailwise.cli import main
from tailwise.eval.report import build_report, read_csv, table_rows

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
COUNTS = [500, 300, 180, 108, 65, 39, 23, 14, 8, 5]
CRITERIA = ["magnitude", "avg_magnitude", "cosine_similarity", "taylor_first_order", "taylor_second_order"]
DENSE = {"conv1": 16, "layer1.0.conv1": 16, "layer1.0.conv2": 16, "layer2.0.conv1": 32, "layer2.0.conv2": 32}


def make_run(path: Path, *, loss="balanced_softmax", method="none", acc=(60.0, 50.0, 40.0, 50.0), F=100.0,
             seed=0, epochs=6, ltap=False, arch=True, config: dict | None = None, precision=None) -> Path:
    """A run directory with the documented files: result.json, metrics.jsonl, model/arch.json, and a config.yaml
    (the recipe of these settings, updated section by section with ``config``)."""
    path.mkdir(parents=True)
    many, medium, few, all_ = acc
    macs_dense = 1_000_000
    per_class = [many + 1, many - 1, many, many, medium + 2, medium - 2, medium, few + 3, few - 3, few]
    pruned = method != "none"
    m = {"name": method}
    if pruned:
        m.update(target_params=0.3, stages=2, vote="uniform" if method == "ltap" else None)
    result = {
        "dataset": {"name": "synthetic", "imbalance_ratio": 100.0, "num_classes": 10, "train_size": sum(COUNTS),
                    "class_counts": COUNTS},
        "groups": {"many": 3, "medium": 4, "few": 3, "thresholds": [100, 20], "rule": "thresholds"},
        "accuracy": {"all": all_, "many": many, "medium": medium, "few": few, "balanced": all_, "per_class": per_class},
        "selection": "last",
        "cost": {"params": int(1000 * F), "macs": int(macs_dense * F / 100), "params_dense": 100000,
                 "macs_dense": macs_dense, "F": F},
        "method": m, "loss": loss, "model": "resnet20", "epochs": epochs, "seed": seed, "time_s": 1.0,
        "versions": {}}
    if precision:  # result.json records the resolved train.precision (runs made before it was recorded: none)
        result["precision"] = precision
    (path / "result.json").write_text(json.dumps(result))
    recipe = {"data": {"name": "synthetic", "num_classes": 10}, "model": {"name": "resnet20"}, "loss": {"name": loss},
              "method": {k: v for k, v in m.items() if v is not None},
              "train": {"epochs": epochs, **({"precision": precision} if precision else {})},
              "run": {"seed": seed}}
    if pruned:  # pruning stages at epochs 2 and 4, as in metrics.jsonl
        recipe["method"].update(start_epoch=2, stage_interval=2)
    for section, values in (config or {}).items():
        recipe[section].update(values)
    (path / "config.yaml").write_text(yaml.safe_dump(recipe))
    live = dict(DENSE)
    lines = []
    for e in range(epochs):
        rec = {"epoch": e, "lr": 0.1, "train_loss": 1.0 / (e + 1),
               "val": {"all": 20 + 5 * e, "many": 30 + 5 * e, "medium": 20 + 5 * e, "few": 10 + 5 * e,
                       "per_class": [20.0] * 10},
               "active_params": 100000, "active_macs": macs_dense, "live_channels": dict(live)}
        if pruned and e in (2, 4):
            live = {k: max(1, v // 2) for k, v in live.items()}
            rec["pruning_stage"] = {"stage": 1 if e == 2 else 2, "epoch": e, "removed_channels": 10}
            rec["live_channels"] = dict(live)
        if pruned and e >= 2:
            rec["active_macs"] = int(macs_dense * F / 100)
        if ltap:
            w = [0.2 + 0.01 * e * (i - 2) for i in range(5)]
            rec["ltap_alpha"] = {c: v / sum(w) for c, v in zip(CRITERIA, w)}
        lines.append(json.dumps(rec))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if arch and pruned:
        (path / "model").mkdir()
        chans = {k: [3 if k == "conv1" else 8, v] for k, v in live.items()}
        chans["fc"] = [16, 10]
        (path / "model" / "arch.json").write_text(json.dumps({"format": 1, "channels": chans}))
    return path


@pytest.fixture
def runs(tmp_path):
    r = tmp_path / "runs"
    return {
        "bs": make_run(r / "bs", acc=(62.6, 48.5, 27.0, 47.2)),
        "bs_ltap": make_run(r / "bs_ltap", method="ltap", acc=(55.8, 44.7, 23.2, 42.4), F=22.6, ltap=True),
        "bs_mag": make_run(r / "bs_mag", method="magnitude", acc=(50.1, 40.2, 20.3, 38.8), F=30.0, arch=False),
        "ldam": make_run(r / "ldam", loss="ldam_drw", acc=(65.1, 48.1, 20.1, 45.8)),
        "ldam_ltap": make_run(r / "ldam_ltap", loss="ldam_drw", method="ltap", acc=(56.9, 40.2, 18.8, 39.8), F=24.8),
        "ce_ltap": make_run(r / "ce_ltap", loss="ce", method="ltap", acc=(50.0, 30.0, 10.0, 30.0), F=25.0),
    }


def _rows_by_run(report):
    return {Path(row["run"]).name: row for row in table_rows(report["runs"])}


def test_table_numbers_match_result_json_and_hand_computed_C(runs, tmp_path):
    report = build_report(list(runs.values()), tmp_path / "out")
    rows = _rows_by_run(report)
    for name, d in runs.items():
        res = json.loads((d / "result.json").read_text())
        row = rows[name]
        assert (row["head"], row["medium"], row["tail"], row["all"]) == (
            res["accuracy"]["many"], res["accuracy"]["medium"], res["accuracy"]["few"], res["accuracy"]["all"])
        assert row["F"] == res["cost"]["F"]
    # C = 100 * All / All(dense baseline of the same loss); C/F = C / F (hand-computed)
    assert rows["bs"]["C"] == pytest.approx(100.0) and rows["bs"]["C_over_F"] == pytest.approx(1.0)
    assert rows["bs_ltap"]["C"] == pytest.approx(100 * 42.4 / 47.2)  # 89.83 (paper: 89.8)
    assert rows["bs_ltap"]["C_over_F"] == pytest.approx(89.83050847 / 22.6)  # 3.97 (paper: 3.9)
    assert rows["bs_mag"]["C"] == pytest.approx(100 * 38.8 / 47.2)
    assert rows["ldam_ltap"]["C"] == pytest.approx(100 * 39.8 / 45.8)  # its own loss's baseline, not BS
    assert rows["ldam_ltap"]["baseline"] == str(runs["ldam"])
    assert rows["ce_ltap"]["C"] is None and rows["ce_ltap"]["C_over_F"] is None  # no dense CE run: blank
    md = (tmp_path / "out" / "table.md").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("| BS + LTAP"))
    assert [c.strip() for c in line.split("|")[2:-1]] == ["n = 1", "fp32", "22.6", "55.8", "44.7", "23.2", "42.4", "89.8",
                                                          "3.97"]
    ce_line = next(ln for ln in md.splitlines() if ln.startswith("| CE + LTAP"))
    assert [c.strip() for c in ce_line.split("|")[-3:-1]] == ["", ""]
    assert "BS + LTAP (w.o. vote, params 30%, 2 stages, 6 ep)" in md
    assert "Head/Medium/Tail = 3/4/3 classes" in md and "many > 100" in md
    # baselines lead their block
    names = [Path(r["run"]).name for r in table_rows(report["runs"])]
    assert names.index("bs") < names.index("bs_ltap") and names.index("ldam") < names.index("ldam_ltap")


def test_explicit_baseline_applies_to_every_row(runs, tmp_path):
    report = build_report([runs["bs_ltap"], runs["ce_ltap"]], tmp_path / "out", baseline=runs["ldam"])
    rows = _rows_by_run(report)
    assert set(rows) == {"ldam", "bs_ltap", "ce_ltap"}
    assert rows["ce_ltap"]["C"] == pytest.approx(100 * 30.0 / 45.8)
    assert rows["ce_ltap"]["C_over_F"] == pytest.approx(100 * 30.0 / 45.8 / 25.0)
    assert rows["ldam"]["C"] == pytest.approx(100.0)


def test_csv_round_trip(runs, tmp_path):
    report = build_report(list(runs.values()), tmp_path / "out")
    assert read_csv(tmp_path / "out" / "table.csv") == table_rows(report["runs"])


def test_missing_and_malformed_result_json_are_named_and_skipped(runs, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(runs["bs_ltap"], bad)
    (bad / "result.json").write_text('{"accuracy": {"all": 4')  # truncated
    missing = tmp_path / "missing"
    shutil.copytree(runs["bs"], missing)
    (missing / "result.json").unlink()
    noacc = tmp_path / "noacc"
    noacc.mkdir()
    (noacc / "result.json").write_text(json.dumps({"cost": {"macs": 1}}))
    out = tmp_path / "out"
    rc = main(["report", str(runs["bs"]), str(bad), str(missing), str(noacc), str(runs["bs_ltap"]), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0
    assert f"warning: skipping {bad / 'result.json'}: malformed JSON" in err
    assert f"warning: skipping {missing}: no result.json (unfinished: metrics.jsonl has 6 epochs)" in err
    assert f"{noacc / 'result.json'}: malformed (no numeric accuracy.all)" in err
    assert len(read_csv(out / "table.csv")) == 2
    assert "Skipped runs" in (out / "report.html").read_text()

    rc = main(["report", str(bad), str(missing), "--out", str(tmp_path / "out2")])
    err = capsys.readouterr().err
    assert rc == 2 and "error: no usable run" in err and str(bad) in err and "Traceback" not in err


def test_every_plot_written_and_html_self_contained(runs, tmp_path):
    out = tmp_path / "out"
    (out / "plots").mkdir(parents=True)
    (out / "plots" / "dynamics_09_an_earlier_run.png").write_bytes(PNG)  # a previous report's plot: removed
    report = build_report(list(runs.values()), out)
    plots = sorted(p.name for p in (out / "plots").iterdir())
    expected = {"per_class_vs_count.png", "group_bars.png", "acc_vs_macs.png"}
    assert expected <= set(plots)
    assert sum(p.startswith("dynamics_") for p in plots) == len(runs)
    assert sum(p.startswith("channels_") for p in plots) == 4  # the pruned runs (bs_mag from live_channels only)
    assert [p for p in plots if p.startswith("ltap_alpha_")] and len([p for p in plots if "ltap_alpha" in p]) == 1
    for p in (out / "plots").iterdir():
        data = p.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG), p
    assert {p.name for _, p in report["plots"]} == set(plots)

    page = (out / "report.html").read_text()
    assert '<table class="paper" id="results">' in page and "C/F" in page and "42.4" in page
    uris = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert len(uris) == len(plots) and all(base64.b64decode(u).startswith(PNG) for u in uris)
    assert "plots/" not in page  # nothing referenced outside the page

    spec = importlib.util.spec_from_file_location("check_report_html", ROOT / "benchmarks" / "check_report_html.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    assert check.static_checks(check.parse(page)) == []
    assert check.static_checks(check.parse(page.replace("data:image/png;base64,", "data:image/png;base64,xx", 1)))


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs Chromium (apt-get install -y chromium)")
def test_html_renders_in_chromium(runs, tmp_path):
    out = tmp_path / "out"
    build_report([runs["bs"], runs["bs_ltap"]], out)
    spec = importlib.util.spec_from_file_location("check_report_html", ROOT / "benchmarks" / "check_report_html.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    assert check.main([str(out)]) == 0
    assert (out / "report_screenshot.png").read_bytes().startswith(PNG)


# ------------------------------------------------------------------------------------------ seeds
# (head, medium, tail, all) per seed; LTAP's tail is BS's + (+1.2, -0.3, +2.4): mean +1.1, min -0.3, max +2.4
BS_ACC = {0: (84.0, 68.0, 61.0, 70.1), 1: (83.0, 69.0, 62.5, 71.3), 2: (85.0, 67.5, 60.0, 72.0)}
LTAP_ACC = {0: (80.0, 69.0, 62.2, 69.5), 1: (79.0, 70.0, 62.2, 71.0), 2: (81.5, 68.0, 62.4, 71.1)}
LTAP_F = {0: 24.5, 1: 24.9, 2: 24.4}
MAG_ACC = {0: (78.0, 66.0, 60.0, 68.0), 1: (77.5, 66.5, 61.0, 68.5)}
LTAP_LABEL = "BS + LTAP (w.o. vote, params 30%, 2 stages, 6 ep)"
MAG_LABEL = "BS + Magnitude (params 30%, 2 stages, 6 ep)"


def hand_mean_sd(values):
    """Mean and sample standard deviation, written out (n - 1 in the denominator)."""
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def cell(values, nd=1):
    mean, sd = hand_mean_sd(values)
    return f"{mean:.{nd}f} ± {sd:.{nd}f}"


def md_cells(md: str, start: str) -> list[str]:
    """The cells after ``start`` (the first cells, joined by ' | ') of the Markdown table line beginning with it."""
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {start} |"))
    return [c.strip() for c in line[len(start) + 4:].rstrip("|").split(" | ")]


@pytest.fixture
def seeded(tmp_path):
    """BS and LTAP over seeds 0-2, Magnitude over seeds 0-1, created in a shuffled order."""
    r = tmp_path / "runs"
    dirs = {}
    for seed in (2, 0, 1):
        dirs[f"ltap_s{seed}"] = make_run(r / f"ltap_s{seed}", method="ltap", acc=LTAP_ACC[seed], F=LTAP_F[seed],
                                         seed=seed)
        dirs[f"bs_s{seed}"] = make_run(r / f"bs_s{seed}", acc=BS_ACC[seed], seed=seed)
        if seed in MAG_ACC:
            dirs[f"mag_s{seed}"] = make_run(r / f"mag_s{seed}", method="magnitude", acc=MAG_ACC[seed], F=30.0,
                                            seed=seed)
    return dirs


def test_seeds_form_one_row_with_mean_and_sample_sd(seeded, tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    bars = {}
    real_bar = Axes.bar

    def spy(self, *args, **kwargs):
        bars[kwargs.get("label")] = kwargs.get("yerr")
        return real_bar(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "bar", spy)
    out = tmp_path / "out"
    report = build_report(list(seeded.values()), out)
    assert [(row.label, row.seeds) for row in report["rows"]] == [
        ("BS", [0, 1, 2]), (MAG_LABEL, [0, 1]), (LTAP_LABEL, [0, 1, 2])]
    mean, sd = hand_mean_sd([70.1, 71.3, 72.0])
    assert (mean, sd) == pytest.approx((71.1333, 0.9609), abs=1e-4)
    bs = report["rows"][0].stat("all")
    assert (bs.mean, bs.sd, bs.n) == (pytest.approx(mean), pytest.approx(sd), 3)

    md = (out / "table.md").read_text()
    col = lambda acc, i: [acc[s][i] for s in sorted(acc)]  # noqa: E731
    # C of each seed against the baseline run of the same seed; C/F with that seed's own F
    c = [100 * LTAP_ACC[s][3] / BS_ACC[s][3] for s in (0, 1, 2)]
    c_over_f = [c[s] / LTAP_F[s] for s in (0, 1, 2)]
    assert md_cells(md, LTAP_LABEL) == ["n = 3", "fp32", cell([24.5, 24.9, 24.4]), *(cell(col(LTAP_ACC, i)) for i in range(4)),
                                        cell(c), cell(c_over_f, 2)]
    assert md_cells(md, LTAP_LABEL)[6] == "70.5 ± 0.9" and cell(c) == "99.2 ± 0.4"
    assert md_cells(md, "**BS** (baseline)")[:8] == ["n = 3", "fp32", "100.0 ± 0.0", "84.0 ± 1.0", cell([68.0, 69.0, 67.5]),
                                                     cell([61.0, 62.5, 60.0]), "71.1 ± 1.0", "100.0 ± 0.0"]
    # paired differences against the baseline: mean (min … max) of the per-seed differences
    assert md_cells(md, f"{LTAP_LABEL} | BS") == ["n = 3", "−3.8 (−4.0 … −3.5)", "+0.8 (+0.5 … +1.0)",
                                                  "+1.1 (−0.3 … +2.4)", "−0.6 (−0.9 … −0.3)"]
    assert md_cells(md, f"{MAG_LABEL} | BS")[0] == "n = 2"

    rows = read_csv(out / "table.csv")  # one line per run, with its own values
    assert len(rows) == 8
    ltap1 = next(row for row in rows if row["run"] == str(seeded["ltap_s1"]))
    assert (ltap1["seed"], ltap1["tail"], ltap1["F"]) == (1, 62.2, 24.9)
    assert ltap1["C"] == pytest.approx(100 * 71.0 / 71.3) and ltap1["baseline"] == str(seeded["bs_s1"])
    assert {row["method"] for row in rows} == {"BS", LTAP_LABEL, MAG_LABEL}

    # group bars: the mean with the sample sd as error bar, per class group
    assert bars["BS"] == pytest.approx([hand_mean_sd(col(BS_ACC, i))[1] for i in range(4)])
    page = (out / "report.html").read_text()
    assert 'id="diffs"' in page and 'title="seed 0: 70.1; seed 1: 71.3; seed 2: 72.0"' in page
    spec = importlib.util.spec_from_file_location("check_report_html", ROOT / "benchmarks" / "check_report_html.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    assert check.static_checks(check.parse(page)) == []
    dynamics = [title for title, _ in report["plots"] if title.startswith("Training dynamics")]
    assert len(dynamics) == 3 and f"Training dynamics: {LTAP_LABEL} (seed 0 of seeds 0, 1, 2)" in dynamics


def test_one_seed_rows_say_n_1_and_show_no_sd(runs, tmp_path):
    build_report([runs["bs"], runs["bs_ltap"]], tmp_path / "out")
    md = (tmp_path / "out" / "table.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert all(" | n = 1 | " in ln for ln in table[1:] if not ln.startswith("| Row"))
    assert not any("±" in ln or "…" in ln for ln in table)
    assert md_cells(md, "BS + LTAP (w.o. vote, params 30%, 2 stages, 6 ep) | BS") == [
        "n = 1", f"{55.8 - 62.6:+.1f}".replace("-", "−"), "−3.8", "−3.8", "−4.8"]


def test_c_only_against_the_baseline_run_of_the_same_seed(seeded, tmp_path):
    out = tmp_path / "out"
    build_report([d for name, d in seeded.items() if name != "bs_s2"], out)
    md = (out / "table.md").read_text()
    c = [100 * LTAP_ACC[s][3] / BS_ACC[s][3] for s in (0, 1)]
    assert md_cells(md, LTAP_LABEL)[7] == cell(c) + " (n = 2)"  # seed 2 has no baseline run: no C
    ltap2 = next(row for row in read_csv(out / "table.csv") if row["run"] == str(seeded["ltap_s2"]))
    assert ltap2["C"] is None and ltap2["baseline"] is None
    assert md_cells(md, f"{LTAP_LABEL} | BS")[:3] == ["n = 2", "−4.0 (−4.0 … −4.0)", "+1.0 (+1.0 … +1.0)"]


def test_diff_between_two_rows(seeded, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["report", *map(str, seeded.values()), "--diff", str(seeded["ltap_s2"]), str(seeded["mag_s0"]),
               "--out", str(out)])
    assert rc == 0
    md = (out / "table.md").read_text()
    tail = [LTAP_ACC[s][2] - MAG_ACC[s][2] for s in (0, 1)]  # +2.2, +1.2: the seeds both rows have
    assert md_cells(md, f"{LTAP_LABEL} | {MAG_LABEL}") == [
        "n = 2", "+1.8 (+1.5 … +2.0)", "+3.2 (+3.0 … +3.5)", f"+{sum(tail) / 2:.1f} (+1.2 … +2.2)",
        "+2.0 (+1.5 … +2.5)"]
    assert "Row − Reference" in md and md in capsys.readouterr().out


@pytest.mark.parametrize("case", ["other_key", "same_seed", "no_config", "diff_unknown", "diff_no_common_seed"])
def test_refusals_name_the_problem(seeded, tmp_path, capsys, case):
    dirs = [str(d) for d in seeded.values()]
    extra = []
    if case == "other_key":
        dirs.append(str(make_run(tmp_path / "lr", acc=BS_ACC[0], seed=5, config={"train": {"lr": 0.05}})))
        expected = ["would share the row 'BS' but differ in more than run.seed", "train.lr: 0.1 in", "0.05 in",
                    str(seeded["bs_s0"]), str(tmp_path / "lr")]
    elif case == "same_seed":
        dirs.append(str(make_run(tmp_path / "again", acc=BS_ACC[1], seed=1)))
        expected = [f"row 'BS' has more than one run of seed 1 ({seeded['bs_s1']}, {tmp_path / 'again'})"]
    elif case == "no_config":
        (seeded["mag_s1"] / "config.yaml").unlink()
        expected = [f"{seeded['mag_s1']}: no config.yaml"]
    elif case == "diff_unknown":
        extra = ["--diff", str(tmp_path / "elsewhere"), str(seeded["bs_s0"])]
        expected = [f"--diff {tmp_path / 'elsewhere'}: not one of the report's runs"]
    else:
        dirs.append(str(make_run(tmp_path / "ce_s7", loss="ce", seed=7)))
        extra = ["--diff", str(seeded["ltap_s0"]), str(tmp_path / "ce_s7")]
        expected = ["the two rows share no seed (seeds [0, 1, 2] vs [7])"]
    out = tmp_path / "out"
    assert main(["report", *dirs, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert all(text in err for text in expected), err
    assert err.startswith("error: ") and "Traceback" not in err and not out.exists()  # refused before writing


# ------------------------------------------------------------------------------------------ kernel-mask view
@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    """A real (tiny) magnitude-pruned run: result.json's structure plus the deployed weights."""
    from test_engine import tiny_config, trainer_for

    raw = tiny_config(epochs=3)
    raw["method"] = {"name": "magnitude", "target_params": 0.4, "start_epoch": 1, "stages": 2, "stage_interval": 1}
    trainer = trainer_for(raw, tmp_path_factory.mktemp("pruned") / "run")
    trainer.fit()
    return trainer.out


def test_kernel_grid_marks_exactly_the_removed_kernels(pruned_run):
    import numpy as np
    import torch

    import tailwise
    from tailwise.eval.plots import kernel_grid

    structure = json.loads((pruned_run / "result.json").read_text())["method"]["structure"]
    model = tailwise.load_model(pruned_run)
    weights = {k: v for k, v in model.state_dict().items()}
    layer, grid = kernel_grid(structure, weights)
    # the default layer keeps the smallest fraction of kernels among convs with grouped inputs and outputs
    out_g = {p: g for g in structure for p in g["producers"]}
    in_g = {c: g for g in structure for c in g["consumers"]}
    both = [n for n in out_g if n in in_g and n != "fc"]
    fractions = {n: len(out_g[n]["kept"]) * len(in_g[n]["kept"]) / (out_g[n]["size"] * in_g[n]["size"]) for n in both}
    assert fractions[layer] == min(fractions.values()) < 1
    o, i = out_g[layer], in_g[layer]
    assert grid.shape == (o["size"], i["size"])
    expected_kept = np.zeros(grid.shape, dtype=bool)
    for a in o["kept"]:
        for b in i["kept"]:
            expected_kept[a, b] = True
    assert (np.isfinite(grid) == expected_kept).all()
    conv = model.get_submodule(layer).weight.detach()
    for row, a in enumerate(o["kept"]):
        for col, b in enumerate(i["kept"]):
            assert grid[a, b] == pytest.approx(float(conv[row, col].norm()), rel=1e-5)
    # an explicit layer, and one that is not a grouped conv
    assert kernel_grid(structure, weights, "layer2.0.conv2")[0] == "layer2.0.conv2"
    assert kernel_grid(structure, weights, "fc") is None
    assert kernel_grid(structure, {k: torch.zeros(1, 1, 3, 3) for k in weights}, layer) is None


def test_report_draws_the_kernel_mask_of_a_pruned_run(pruned_run, tmp_path):
    report = build_report([pruned_run], tmp_path / "out")
    kernels = [p for title, p in report["plots"] if title.startswith("Kernel mask")]
    assert len(kernels) == 1 and kernels[0].read_bytes().startswith(PNG)
    run = report["runs"][0]
    assert run.dense_channels["layer3.0.conv1"] == 64 and run.live_channels["layer3.0.conv1"] < 64


def test_precision_column_and_baselines_of_the_same_precision(tmp_path):
    """fp32 and bf16 runs of one recipe are separate rows, labelled and shown with their precision; a bf16 pruned
    run's C is against the bf16 dense run of its seed, never the fp32 one, and blank where there is none."""
    r = tmp_path / "runs"
    dense32 = make_run(r / "bs_s0", acc=(80.0, 70.0, 60.0, 70.0))
    dense16 = make_run(r / "bs_bf16_s0", acc=(82.0, 72.0, 62.0, 72.0), precision="bf16")
    ltap16 = make_run(r / "ltap_bf16_s0", method="ltap", acc=(80.0, 70.0, 63.0, 71.0), F=25.0, precision="bf16")
    out = tmp_path / "out"
    report = build_report([dense32, dense16, ltap16], out)
    labels = {row.label: row.first.precision for row in report["rows"]}
    assert labels == {"BS [fp32]": "fp32", "BS [bf16]": "bf16", LTAP_LABEL: "bf16"}
    rows = {Path(row["run"]).name: row for row in read_csv(out / "table.csv")}
    assert rows["ltap_bf16_s0"]["C"] == pytest.approx(100 * 71.0 / 72.0)
    assert rows["ltap_bf16_s0"]["baseline"] == str(dense16) and rows["ltap_bf16_s0"]["precision"] == "bf16"
    assert rows["bs_s0"]["precision"] == "fp32"
    md = (out / "table.md").read_text()
    assert md_cells(md, LTAP_LABEL)[:2] == ["n = 1", "bf16"] and md_cells(md, "**BS [fp32]** (baseline)")[1] == "fp32"
    assert "Precision differs between rows (bf16, fp32)" in md

    alone = build_report([dense32, ltap16], tmp_path / "alone")  # no bf16 dense run: no C for the bf16 run
    ltap = next(row for row in alone["rows"] if row.first.path == ltap16)
    assert ltap.baseline is None and ltap.stat("C").n == 0


def test_labels_tell_method_configurations_apart(tmp_path):
    """Two MORE phases that differ in who trains W_g, a control with A' = 0, and growth with another last event
    are separate rows with the option in their label, not one row refused for mixing configurations."""
    r = tmp_path / "runs"
    runs = [make_run(r / "bs_s0", acc=(80.0, 70.0, 60.0, 70.0))]
    more = {"frozen": ("frozen", 2.0, 1.0), "slow": ("slow", 2.0, 1.0), "frozen_a0": ("frozen", 0.0, 1.0),
            "frozen_fast": ("frozen", 2.0, 100.0)}
    for name, (general, amplitude, branch) in more.items():
        path = make_run(r / f"more_{name}_s0", config={"method": {"name": "more"}})
        result = json.loads((path / "result.json").read_text())
        result["method"] = {"name": "more", "amplitude": amplitude,
                            "phase": {"general": general, "start_epoch": 4, "branch_lr_scale": branch,
                                      "general_lr_scale": 0.1 if general == "slow" else 1.0}}
        (path / "result.json").write_text(json.dumps(result))
        runs.append(path)
    for last in (3, 5):
        path = make_run(r / f"growth_{last}_s0", config={"method": {"name": "plasticity"}})
        result = json.loads((path / "result.json").read_text())
        result["method"] = {"name": "plasticity", "event_epochs": list(range(1, last + 1))}
        (path / "result.json").write_text(json.dumps(result))
        runs.append(path)
    labels = [row.label for row in build_report(runs, tmp_path / "out")["rows"]]
    assert labels == ["BS", "BS + MORE (W_g frozen, A' 2, from epoch 4, 6 ep)",
                      "BS + MORE (W_g slow at 0.1x LR, A' 2, from epoch 4, 6 ep)",
                      "BS + MORE (W_g frozen, A' 0, from epoch 4, 6 ep)",
                      "BS + MORE (W_g frozen, branch at 100x LR, A' 2, from epoch 4, 6 ep)",
                      "BS + Growth (events after epochs 1-3, 6 ep)", "BS + Growth (events after epochs 1-5, 6 ep)"]


def test_ltap_labels_tell_trials_on_stale_statistics_apart():
    """A trial-vote run without ``trial_bn_batches`` predates the statistics pass: its trials read the running
    statistics, and its label says so; the default (20 batches) needs no mention."""
    from tailwise.eval.report import RunData, method_label

    def label(**method):
        return method_label(RunData(Path("x"), {"loss": {"name": "balanced_softmax"}, "epochs": 200,
                                                "method": {"name": "ltap", "target_macs": 0.25, **method}}))

    assert label(vote="trial", trial_bn_batches=20) == "BS + LTAP (MACs 25%, 200 ep)"
    assert label(vote="trial") == label(vote="trial", trial_bn_batches=0) == \
        "BS + LTAP (trials on stale BN statistics, MACs 25%, 200 ep)"
    assert label(vote="uniform") == "BS + LTAP (w.o. vote, MACs 25%, 200 ep)"


def test_ltap_labels_name_the_criteria_only_where_they_are_not_the_default_mix():
    """Under group-mean the default mix is four criteria (avg_magnitude duplicates magnitude), under l2 all five;
    a label names the criteria only for a run that mixed another set."""
    from tailwise.eval.report import RunData, method_label

    def label(**method):
        return method_label(RunData(Path("x"), {"loss": {"name": "balanced_softmax"}, "epochs": 200,
                                                "method": {"name": "ltap", "vote": "trial", "trial_bn_batches": 20,
                                                           "target_macs": 0.25, **method}}))

    four = ["magnitude", "cosine_similarity", "taylor_first_order", "taylor_second_order"]
    five = ["magnitude", "avg_magnitude", *four[1:]]
    assert label(normalize="group-mean", criteria=four) == "BS + LTAP (group-mean normalisation, MACs 25%, 200 ep)"
    assert label(normalize="l2", criteria=five) == "BS + LTAP (MACs 25%, 200 ep)"
    assert label(criteria=five) == "BS + LTAP (MACs 25%, 200 ep)"  # runs before the option: l2
    assert label(normalize="group-mean", criteria=five) == ("BS + LTAP (group-mean normalisation, criteria="
                                                            + "+".join(five) + ", MACs 25%, 200 ep)")
    assert label(normalize="l2", criteria=["magnitude"]) == "BS + LTAP (criteria=magnitude, MACs 25%, 200 ep)"
