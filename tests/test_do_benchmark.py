"""benchmarks/do_benchmark.py over seeds: rows, paired differences and goals from the runs' own result files."""
from __future__ import annotations

import copy
import json
import statistics
import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from test_decoupled import do_config
from test_engine import trainer_for

ROOT = Path(__file__).resolve().parents[1]


def train(out: Path, raw: dict, seed: int) -> dict:
    raw = copy.deepcopy(raw)
    raw["run"]["seed"] = seed
    trainer_for(raw, out).fit()
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("do_bench")
    do = do_config(epochs=4, stage_epochs=[2, 1, 1])
    plain = copy.deepcopy(do)
    plain["method"] = {"name": "none"}
    plain["train"]["epochs"] = 2
    augmented = copy.deepcopy(plain)
    augmented["data"]["policy"] = "randaugment"
    results = {}
    for seed in (0, 1):
        for name, raw in (("base", plain), ("ra", augmented), ("do", do)):
            results[name, seed] = train(root / f"{name}_s{seed}", raw, seed)
    return root, results


@pytest.fixture
def bench(runs, monkeypatch, capsys):
    """The script's main() in this process, in the runs' folder: args -> (exit code, stdout, stderr)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.chdir(runs[0])
    script = importlib.import_module("do_benchmark")

    def run(*args: str) -> SimpleNamespace:
        try:
            script.main(["--images", "20", "--threads", "1", *args])
            rc = 0
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 2
            print(exc.code, file=sys.stderr)
        out = capsys.readouterr()
        return SimpleNamespace(returncode=rc, stdout=out.out, stderr=out.err)
    return run


def test_rows_over_seeds_paired_differences_and_goals(runs, bench):
    root, results = runs
    out = bench("--baseline", "base_s0", "base_s1", "--randaugment", "ra_s1", "ra_s0", "--do", "do_s1", "do_s0")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    lines = {line.split(" | ")[0] + " | " + line.split(" | ")[1]: line for line in text.splitlines()
             if line.startswith("| ")}

    def mean_sd(key, group):
        values = [r["accuracy"][group] for (name, _), r in results.items() if name == key]
        return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"

    base = next(line for key, line in lines.items() if key == "| ce (2 ep) | one network")
    assert f"| 0, 1 | {mean_sd('base', 'many')} | {mean_sd('base', 'medium')} |" in base
    ra = next(line for key, line in lines.items() if key == "| ce + RandAugment (2 ep) | one network")
    assert mean_sd("ra", "all") in ra
    # the DO row of the run's own aggregation is its result.json accuracy, mean ± sd over the two seeds
    agg = results["do", 0]["method"]["aggregation"]
    do_row = next(line for line in text.splitlines() if line.startswith("| DO (") and agg in line.split(" | ")[1]
                  or (agg == "instance" and "instance-level" in line and line.startswith("| DO (")))
    assert f"**{mean_sd('do', 'all')}**" in do_row
    # paired differences: DO (its aggregation) − the RandAugment baseline, each seed's own on All
    diff = next(line for line in text.splitlines() if line.startswith(f"| DO, {agg} | ce + RandAugment"))
    own = [results["do", s]["accuracy"]["all"] - results["ra", s]["accuracy"]["all"] for s in (0, 1)]
    assert f"s0 {own[0]:+.2f}, s1 {own[1]:+.2f}".replace("-", "−") in diff
    assert f"| {statistics.fmean(own):+.2f} |".replace("-", "−") in diff
    for seed in (0, 1):  # the goals under both readings of the sub-models' logits
        goal = next(line for line in text.splitlines() if line.startswith(f"- seed {seed}: "))
        assert "prior-corrected (default): sub-model 1 alone" in goal and "raw logits (paper): sub-model 1" in goal
    stage_lines = [line for line in text.splitlines() if line.startswith("| 1 | 1 | ") or line.startswith("| 0 | 1 | ")]
    assert len(stage_lines) >= 2  # the per-stage table has a row of stage 1 for each seed


def test_refuses_two_runs_of_one_seed(bench):
    out = bench("--baseline", "base_s0", "ra_s0", "--do", "do_s0")
    assert out.returncode == 2 and "two baseline runs of seed 0" in out.stderr



def test_cached_evaluation_is_the_deployed_ensembles_prediction(runs, monkeypatch):
    """Every aggregation of :func:`evaluate_cached` (logits computed once, then corrected) against the
    :class:`SubModelEnsemble` itself under the same log priors, on the same batches."""
    import torch

    import tailwise
    from tailwise.eval.metrics import summarize

    root, results = runs
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    script = importlib.import_module("do_benchmark")
    (x, y), _, groups = script.eval_splits(root / "do_s0")
    ensemble = tailwise.load_model(root / "do_s0").eval()
    priors = script.run_log_priors(results["do", 0])
    assert torch.allclose(torch.tensor(priors), torch.tensor(ensemble.settings["log_priors"]))  # as the run deployed
    logits = script.member_logits(ensemble, x, 16)
    for log_priors in (priors, None):
        cached = script.evaluate_cached(logits, log_priors, ensemble.settings, y, groups, 16)
        base = ensemble.with_aggregation("average", log_priors=log_priors)
        lam = base.learn_group_weights(x[i:i + 16] for i in range(0, len(x), 16))
        with torch.no_grad():
            for mode, extra in (("average", {}), ("instance", {}), ("group", {"group_lambda": lam})):
                ens = base.with_aggregation(mode, **extra)
                pred = torch.cat([ens(x[i:i + 16]).argmax(1) for i in range(0, len(x), 16)])
                assert cached[mode] == summarize(pred, y, groups), (mode, log_priors is None)
            for t, member in enumerate(ensemble.members):
                z = member(x).float() - (torch.tensor(log_priors[t]) if log_priors is not None else 0.0)
                assert cached["members"][t] == summarize(z.argmax(1), y, groups)


def test_exempt_probe_reads_the_runs_own_records_raw_and_its_deployed_members_corrected(tmp_path, monkeypatch):
    """benchmarks/do_exempt_probe.py from a checkpoint after each decoupling: raw, the run's reading is the
    recorded ``val_tpd`` and the stricter ones the recorded ``exempt_probe``; corrected, the run's reading is the
    deployed ensemble's own member (``final.members_val_adjusted``)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    script = importlib.import_module("do_exempt_probe")
    raw = do_config(epochs=4, stage_epochs=[2, 1, 1])
    raw["run"]["keep_checkpoints"] = [2]
    out = tmp_path / "do"
    result = train(out, raw, 3)
    records = [json.loads(line)["do"]["decoupling"] for line in (out / "metrics.jsonl").read_text().splitlines()
               if "decoupling" in json.loads(line).get("do", {})]
    assert [r["stage"] for r in records] == [1, 2]
    members = result["method"]["final"]["members_val_adjusted"]
    groups = ("many", "medium", "few", "all")

    def pick(acc):
        return {g: acc[g] for g in groups}
    for checkpoint, record in ((out / "checkpoints" / "epoch_002.pt", records[0]),
                               (out / "checkpoints" / "last.pt", records[1])):
        rows = {(r["reading"], r["logits"]): pick(r) for r in script.probe(out, checkpoint, 1)}
        assert rows["classifier (the run)", "raw"] == pick(record["val_tpd"])
        for reading in ("classifier_bias", "none"):
            assert rows[reading, "raw"] == pick(record["exempt_probe"][reading])
        assert rows["classifier (the run)", "corrected"] == pick(members[record["stage"] - 1])
        if record["stage"] == 1:  # on this run the correction changes sub-model 1's predictions
            assert rows["classifier (the run)", "corrected"] != rows["classifier (the run)", "raw"]
