"""Paper-layout reports of finished runs: Markdown table, CSV, self-contained HTML page, PNG plots.

    tailwise report RUN_DIR... [--baseline RUN_DIR] [--diff RUN_DIR REF_RUN_DIR]... [--out DIR]

The table follows the LTAP paper's Tables 1-2: Method, Seeds, F(%), Head, Medium, Tail, All, C(%), C/F.

- Head / Medium / Tail are the run's ``result.json`` ``accuracy.many`` / ``.medium`` / ``.few`` (test split, the
  model given by ``selection``), All is ``accuracy.all``; all in percent.
- F(%) is ``cost.F`` = 100 x deployed MACs / dense MACs of the same architecture (the paper: "the ratio of FLOPs
  between the target method and the baseline method"; the baseline is the dense network, so they coincide).
  When ``cost.F`` is absent it is computed as 100 x ``cost.macs`` / ``cost.macs_dense``.
- C(%) = 100 x All(run) / All(baseline run of the same seed) (the paper: "the ratio of accuracy between the target
  method and the baseline method"; e.g. BS + LTAP, IR 50: 100 x 47.8 / 51.2 = 93.4, printed 93.3).
- C/F = C(%) / F(%), a dimensionless ratio; the baseline row has C = 100, C/F = 1.0 (paper: 93.3 / 22.6 = 4.1).
  The paper's own rows are not all consistent with this at one decimal (BS + ATO: 64.2 / 84.7 = 0.76, printed 0.7),
  so it looks truncated there; we print two decimals and do not truncate.

Seeds. Runs that would print the same row (same Method label, dataset and model) are one configuration trained
with different seeds and form one row. Each column is computed per run (per seed) and shown as the mean ± the
sample standard deviation (n - 1) over the row's seeds; the Seeds column gives n. A one-run row shows its values
without ± and "n = 1". A column with fewer values than the row has seeds (C where the baseline lacks a seed) says
"(n = k)". ``table.csv`` keeps one line per run with its own values. The runs of a row must differ in nothing but
``run.seed`` (and keys that cannot change results, ``NOT_COMPARED``), checked on their resolved ``config.yaml``;
otherwise, or when a row holds two runs of one seed, the report is refused, naming the runs and keys.

The baseline is the row holding ``--baseline`` for every row, or, per row, the dense row (method ``none``, F = 100)
of the same dataset (name, imbalance ratio, number of classes), model and loss. A run of seed s is compared with
the baseline row's run of seed s only; rows without a baseline, and seeds the baseline lacks, leave C and C/F
blank.

Paired differences, in percentage points, of Head / Medium / Tail / All: for every row against its baseline, and
for every ``--diff RUN_DIR REF_RUN_DIR`` (the rows holding these two runs, whichever seed each names): per seed
that both rows have, the row's value minus the reference's, shown as the mean and min ... max over those seeds
(for example "+1.1 (−0.3 … +2.4)") with their number n.

A run whose ``result.json`` is missing or malformed is named in a warning and skipped; with no usable run at all
the report fails with exit code 2.
"""
from __future__ import annotations

import base64
import csv
import html
import json
import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from ..atomic import atomic_write_text
from ..config import RESUME_OVERRIDES, dotted_keys
from ..engine.log import read_metrics
from ..errors import TailwiseError
from ..methods.ltap.criteria import default_criteria

LOSS_LABELS = {"ce": "CE", "focal": "Focal", "class_balanced": "CB", "balanced_softmax": "BS",
               "logit_adjust": "LA", "ldam_drw": "LDAM-DRW", "ldam": "LDAM"}
METHOD_LABELS = {"ltap": "LTAP", "magnitude": "Magnitude", "taylor": "Taylor", "random": "Random",
                 "plasticity": "Growth", "do": "DO", "more": "MORE"}
CSV_FIELDS = ["run", "method", "loss", "dataset", "model", "seed", "precision", "selection", "F", "head", "medium", "tail", "all",
              "balanced", "C", "C_over_F", "baseline", "params", "macs", "params_dense", "macs_dense"]
REQUIRED = (("accuracy", "all"), ("accuracy", "many"), ("accuracy", "medium"), ("accuracy", "few"), ("cost", "macs"))
# config keys in which the seeds of one row may differ: the seed, and keys that cannot change a run's results
NOT_COMPARED = {"run.seed", "run.out", "run.keep_checkpoints", "data.cache", "data.cache_dir", *RESUME_OVERRIDES}


def run_precision(result: dict) -> str:
    """A run's resolved ``train.precision`` from its ``result.json`` (runs made before it was recorded: fp32)."""
    return str(result.get("precision") or "fp32")


@dataclass
class RunData:
    path: Path
    result: dict
    metrics: list = field(default_factory=list)
    arch: dict | None = None
    label: str = ""
    baseline: "RunData | None" = None

    # --------------------------------------------------------------------------------------- derived values
    @property
    def acc(self) -> dict:
        return self.result["accuracy"]

    @property
    def cost(self) -> dict:
        return self.result.get("cost", {})

    @property
    def F(self) -> float | None:
        if self.cost.get("F") is not None:
            return float(self.cost["F"])
        if self.cost.get("macs") and self.cost.get("macs_dense"):
            return 100.0 * self.cost["macs"] / self.cost["macs_dense"]
        return None

    @property
    def seed(self):
        return self.result.get("seed")

    @property
    def precision(self) -> str:
        return run_precision(self.result)

    @property
    def macs(self):
        return self.cost.get("macs")

    @property
    def macs_dense(self):
        return self.cost.get("macs_dense")

    @property
    def method(self) -> dict:
        m = self.result.get("method")
        return m if isinstance(m, dict) else {"name": str(m or "none")}

    @property
    def loss(self) -> str:
        loss = self.result.get("loss")
        return loss.get("name", "?") if isinstance(loss, dict) else str(loss or "?")

    @property
    def dataset(self) -> dict:
        return self.result.get("dataset", {})

    @property
    def dataset_key(self) -> tuple:
        d = self.dataset
        return (d.get("name"), d.get("imbalance_ratio"), d.get("num_classes"))

    @property
    def model(self) -> str | None:
        m = self.result.get("model")
        return m.get("name") if isinstance(m, dict) else m

    @property
    def is_dense(self) -> bool:
        name = self.method.get("name", "none")
        return name in ("none", None, "") and (self.F is None or abs(self.F - 100.0) < 1e-6)

    @property
    def per_class(self) -> list:
        return self.acc.get("per_class") or []

    @property
    def class_counts(self) -> list:
        return self.dataset.get("class_counts") or []

    @property
    def C(self) -> float | None:
        b = self.baseline
        if b is None or not b.acc.get("all"):
            return None
        return 100.0 * self.acc["all"] / b.acc["all"]

    @property
    def C_over_F(self) -> float | None:
        c, f = self.C, self.F
        return None if c is None or not f else c / f

    @property
    def live_channels(self) -> dict:
        """Kept output channels per layer: the deployed model's arch.json, else the last metrics record."""
        if self.arch and isinstance(self.arch.get("channels"), dict):
            chans = {k: int(v[1]) for k, v in self.arch["channels"].items()
                     if isinstance(v, (list, tuple)) and len(v) == 2}
            dense = self.dense_channels
            return {k: v for k, v in chans.items() if not dense or k in dense}
        for m in reversed(self.metrics):
            if isinstance(m.get("live_channels"), dict):
                return dict(m["live_channels"])
        return {}

    @property
    def structure(self) -> list | None:
        """A pruning run's dense channel groups with the indices each keeps (``result.json`` method.structure)."""
        value = self.method.get("structure")
        return value if isinstance(value, list) and value else None

    @property
    def dense_channels(self) -> dict:
        """Dense widths: from ``structure``, else the first live_channels record (logged before any pruning)."""
        if self.structure:
            return {p: int(g["size"]) for g in self.structure for p in g.get("producers", [])}
        for m in self.metrics:
            if isinstance(m.get("live_channels"), dict):
                return dict(m["live_channels"])
        return {}


# ------------------------------------------------------------------------------------------------- loading
def _read_json(path: Path):
    return json.loads(path.read_text())


def load_run(run_dir: Path) -> RunData:
    """Load one run directory; raise ValueError naming what is wrong with its result.json."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: not a directory")
    rfile = run_dir / "result.json"
    if not rfile.is_file():
        n = len(read_metrics(run_dir / "metrics.jsonl", skip_damaged=True))
        why = f"unfinished: metrics.jsonl has {n} epochs" if n else "run unfinished or not a tailwise run directory"
        raise ValueError(f"{run_dir}: no result.json ({why})")
    try:
        result = _read_json(rfile)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{rfile}: malformed JSON ({exc})") from None
    if not isinstance(result, dict):
        raise ValueError(f"{rfile}: malformed (not a JSON object)")
    for a, b in REQUIRED:
        v = result.get(a, {}).get(b) if isinstance(result.get(a), dict) else None
        if a == "accuracy" and b == "all" and not isinstance(v, (int, float)):
            raise ValueError(f"{rfile}: malformed (no numeric {a}.{b})")
        if v is not None and not isinstance(v, (int, float)):
            raise ValueError(f"{rfile}: malformed ({a}.{b} is not a number)")
    metrics = read_metrics(run_dir / "metrics.jsonl", skip_damaged=True)  # a line cut by a kill: use the rest
    arch = None
    afile = run_dir / "model" / "arch.json"
    if afile.is_file():
        try:
            arch = _read_json(afile)
        except (json.JSONDecodeError, UnicodeDecodeError):
            arch = None
    return RunData(run_dir, result, metrics, arch)


def more_general(method: dict) -> str:
    """Who trains MORE's W_g, from its ``method`` record: 'joint', 'frozen' or 'slow at 0.1x LR' (runs from before
    the ``phase`` record: joint), and ', branch at 100x LR' where B and A train at a scaled rate."""
    phase = method.get("phase") or {}
    general = phase.get("general", "joint")
    branch = phase.get("branch_lr_scale", 1.0)
    return (general + (f" at {phase['general_lr_scale']:g}x LR" if general == "slow" else "")
            + (f", branch at {branch:g}x LR" if branch != 1.0 else ""))


def method_label(run: RunData) -> str:
    """'BS' for a dense run, 'BS + LTAP (w.o. vote, 30% params)' for a pruned one; the options that tell one
    method's configurations apart (LTAP's vote, MORE's ``general`` / amplitude / phase, growth's event epochs)."""
    loss = LOSS_LABELS.get(run.loss, run.loss)
    m = run.method
    name = m.get("name") or "none"
    if name == "none":
        return loss
    opts = []
    vote = m.get("vote")
    if name == "ltap" and vote and vote != "trial":  # trial: the default vote
        opts.append({"uniform": "w.o. vote", "public-code": "public-code weights", "paper": "paper vote",
                     "adaptive": "paper vote"}.get(vote, f"vote={vote}"))
    if name == "ltap" and vote == "trial" and not m.get("trial_bn_batches"):  # runs without the key predate it
        opts.append("trials on stale BN statistics")
    if name == "ltap" and m.get("normalize") not in (None, "l2"):
        opts.append(f"{m['normalize']} normalisation")
    if name == "ltap" and m.get("criteria") and m["criteria"] != default_criteria(m.get("normalize") or "l2"):
        opts.append("criteria=" + "+".join(m["criteria"]))  # only where they are not the default mix
    for key, what in (("target_params", "params"), ("target_macs", "MACs"), ("target_sparsity", "sparsity")):
        if m.get(key) is not None:
            opts.append(f"{what} {100 * m[key]:.0f}%")
    if m.get("stages"):
        opts.append(f"{m['stages']} stages")
    if (m.get("round_to") or 1) > 1:
        opts.append(f"channels in multiples of {m['round_to']}")
    if name == "more":  # who trains W_g, the discrepancy's amplitude and the phase tell MORE's rows apart
        phase, general = m.get("phase") or {}, more_general(m)
        if general != "joint":
            opts.append(f"W_g {general}")
        if m.get("amplitude") is not None:
            opts.append(f"A' {m['amplitude']:g}")
        if phase.get("start_epoch"):
            opts.append(f"from epoch {phase['start_epoch']}")
    if name == "plasticity" and m.get("event_epochs"):
        opts.append(f"events after epochs {m['event_epochs'][0]}-{m['event_epochs'][-1]}")
    epochs = run.result.get("epochs")
    if epochs:
        opts.append(f"{epochs} ep")
    return f"{loss} + {METHOD_LABELS.get(name, name)}" + (f" ({', '.join(opts)})" if opts else "")


# ------------------------------------------------------------------------------------------------- seeds
METRICS: dict[str, Callable[[RunData], float | None]] = {  # one run's value of each numeric column
    "F": lambda r: r.F, "head": lambda r: r.acc.get("many"), "medium": lambda r: r.acc.get("medium"),
    "tail": lambda r: r.acc.get("few"), "all": lambda r: r.acc.get("all"), "balanced": lambda r: r.acc.get("balanced"),
    "C": lambda r: r.C, "C_over_F": lambda r: r.C_over_F, "macs": lambda r: r.macs}


@dataclass(frozen=True)
class Stat:
    """One column over seeds: mean, sample standard deviation (n - 1; None for n < 2), min, max, and n."""
    mean: float | None
    sd: float | None
    lo: float | None
    hi: float | None
    n: int


def summarize(values: Iterable) -> Stat:
    """The Stat of those ``values`` that are not None."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return Stat(None, None, None, None, 0)
    sd = statistics.stdev(vals) if len(vals) > 1 else None
    return Stat(statistics.fmean(vals), sd, min(vals), max(vals), len(vals))


@dataclass(eq=False)
class Row:
    """One table row: the runs of one configuration, one per seed, ordered by seed."""
    label: str
    runs: list[RunData]
    baseline: "Row | None" = None

    @property
    def first(self) -> RunData:
        """The run of the lowest seed, which stands for the row where only one run is drawn."""
        return self.runs[0]

    @property
    def seeds(self) -> list:
        return [r.seed for r in self.runs]

    def run_of_seed(self, seed) -> RunData | None:
        return next((r for r in self.runs if r.seed == seed), None)

    def values(self, column: str) -> dict:
        """{seed: that seed's run's value of ``column`` (a METRICS key), None where it has none}."""
        return {r.seed: METRICS[column](r) for r in self.runs}

    def stat(self, column: str) -> Stat:
        return summarize(self.values(column).values())

    @property
    def per_class(self) -> list[Stat]:
        """Per-class test accuracy over the seeds, in class order; empty unless every run has one per class."""
        n = len(self.first.class_counts)
        if not n or any(len(r.per_class) != n for r in self.runs):
            return []
        return [summarize(r.per_class[c] for r in self.runs) for c in range(n)]


@dataclass(eq=False)
class PairedDiff:
    """``row`` minus ``ref``, seed by seed, over the seeds both rows have."""
    row: Row
    ref: Row

    @property
    def seeds(self) -> list:
        return [s for s in self.row.seeds if s in self.ref.seeds]

    def stat(self, column: str) -> Stat:
        a, b = self.row.values(column), self.ref.values(column)
        return summarize(a[s] - b[s] for s in self.seeds if a[s] is not None and b[s] is not None)


def compared_config(run: RunData) -> dict:
    """The run's resolved config as dotted keys, less NOT_COMPARED. ``config.yaml`` is loaded like a recipe, so a
    key added to tailwise after the run was made takes its default (which keeps the old behaviour)."""
    from ..config import load_config

    path = run.path / "config.yaml"
    if not path.is_file():
        raise TailwiseError(f"{run.path}: no config.yaml, so it cannot be checked to differ from the other runs of "
                            f"its row {run.label!r} only in run.seed")
    try:
        cfg = load_config(path)
    except TailwiseError as exc:
        raise TailwiseError(f"{path}: cannot be checked against the other runs of its row: {exc}") from None
    return {k: v for k, v in dotted_keys(cfg.to_dict()).items() if k not in NOT_COMPARED}


def check_seeds(label: str, runs: list[RunData]) -> None:
    """Refuse runs meant for one row unless they are one configuration with distinct seeds; name runs and keys."""
    seeds = [r.seed for r in runs]
    twice = [s for s in dict.fromkeys(seeds) if seeds.count(s) > 1]
    if twice:
        raise TailwiseError(f"row {label!r} has more than one run of seed {twice[0]} (" +
                            ", ".join(str(r.path) for r in runs if r.seed == twice[0]) + "); pass one run per seed")
    if len(runs) < 2:
        return
    configs = [compared_config(r) for r in runs]
    keys = sorted(k for k in set().union(*configs) if len({repr(c.get(k)) for c in configs}) > 1)
    if keys:
        detail = "; ".join(f"{k}: " + ", ".join(f"{c.get(k)!r} in {r.path}" for r, c in zip(runs, configs))
                           for k in keys)
        raise TailwiseError(f"runs {', '.join(str(r.path) for r in runs)} would share the row {label!r} but differ "
                            f"in more than run.seed: {detail}. A row is one configuration over seeds; report these "
                            "runs separately")


def group_rows(runs: list[RunData]) -> list[Row]:
    """One Row per (dataset, model, label, precision) in first-seen order, each checked by ``check_seeds``; rows
    that still share a label get their precision appended where that tells them apart (an fp32 and a bf16 run of
    one recipe), else their first run's directory name (another dataset or model)."""
    groups: dict[tuple, list[RunData]] = {}
    for r in runs:
        groups.setdefault((r.dataset_key, r.model, r.label, r.precision), []).append(r)
    rows = []
    for (_, _, label, _), members in groups.items():
        check_seeds(label, members)
        rows.append(Row(label, sorted(members, key=lambda r: (r.seed is None, r.seed))))
    labels = Counter(row.label for row in rows)
    by_precision = Counter((row.label, row.first.precision) for row in rows)
    for row in rows:
        if labels[row.label] > 1:
            unique = by_precision[(row.label, row.first.precision)] == 1
            row.label += f" [{row.first.precision if unique else row.first.path.name}]"
            for r in row.runs:
                r.label = row.label
    return rows


def assign_baselines(rows: list[Row], baseline: RunData | None) -> None:
    """Each row's baseline row (the one holding ``baseline``, else the dense row of its dataset, model, loss and
    precision: C never compares a bf16 run with an fp32 one), and each run's baseline run: the baseline row's run of
    the same seed (None where it has none)."""
    fixed = next((row for row in rows if any(r is baseline for r in row.runs)), None)
    for row in rows:
        r = row.first
        cands = [b for b in rows if b.first.is_dense and b.first.loss == r.loss and b.first.dataset_key == r.dataset_key
                 and b.first.precision == r.precision and (b.first.model == r.model or None in (b.first.model, r.model))]
        row.baseline = fixed or (row if row in cands else next(iter(cands), None))
        for run in row.runs:
            run.baseline = row.baseline.run_of_seed(run.seed) if row.baseline else None


def _row_holding(rows: list[Row], run_dir) -> Row:
    target = Path(run_dir).resolve()
    row = next((row for row in rows if any(r.path.resolve() == target for r in row.runs)), None)
    if row is None:
        raise TailwiseError(f"--diff {run_dir}: not one of the report's runs; name a RUN_DIR given to the report "
                            "(any seed of the row)")
    return row


def paired_diffs(rows: list[Row], requested: Iterable[tuple] = ()) -> list[PairedDiff]:
    """Every row against its baseline (where they share a seed), then the rows of each requested
    ``(RUN_DIR, REF_RUN_DIR)``; a requested pair must share a seed."""
    diffs = [PairedDiff(row, row.baseline) for row in rows if row.baseline not in (None, row)]
    diffs = [d for d in diffs if d.seeds]
    for a, b in requested:
        d = PairedDiff(_row_holding(rows, a), _row_holding(rows, b))
        if not d.seeds:
            raise TailwiseError(f"--diff {a} {b}: the two rows share no seed (seeds {d.row.seeds} vs {d.ref.seeds}); "
                                "paired differences compare runs of the same seed")
        if not any(e.row is d.row and e.ref is d.ref for e in diffs):
            diffs.append(d)
    return diffs


# ------------------------------------------------------------------------------------------------- tables
HEADERS = ["Method", "Seeds", "Precision", "F(%) ↓", "Head ↑", "Medium ↑", "Tail ↑", "All ↑", "C(%) ↑", "C/F ↑"]
TABLE_COLUMNS = (("F", 1), ("head", 1), ("medium", 1), ("tail", 1), ("all", 1), ("C", 1), ("C_over_F", 2))
DIFF_COLUMNS = ("head", "medium", "tail", "all")
DIFF_HEADERS = ["Row", "Reference", "Seeds", "Head", "Medium", "Tail", "All"]
DIFF_INTRO = ("Paired differences, Row − Reference (percentage points): per seed, the row's run minus the "
              "reference's run of the same seed; mean (min … max) over the seeds both rows have.")
CSV_METRICS = ("F", "head", "medium", "tail", "all", "balanced", "C", "C_over_F", "macs")


def _f(v, nd=1) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def _signed(v: float) -> str:
    return f"{v:+.1f}".replace("-", "−")


def stat_text(stat: Stat, nd: int, n_row: int) -> str:
    """'72.4' for one value, '72.4 ± 0.5' (mean ± sample sd) for more; '(n = k)' appended when k is not the
    row's number of seeds ``n_row``; blank for none."""
    if stat.n == 0:
        return ""
    text = _f(stat.mean, nd) + (f" ± {_f(stat.sd, nd)}" if stat.n > 1 else "")
    return text + (f" (n = {stat.n})" if stat.n != n_row else "")


def diff_text(stat: Stat) -> str:
    """'+1.1 (−0.3 … +2.4)': the mean and min … max of per-seed differences; the difference alone for one seed."""
    if stat.n == 0:
        return ""
    return _signed(stat.mean) + (f" ({_signed(stat.lo)} … {_signed(stat.hi)})" if stat.n > 1 else "")


def row_cells(row: Row) -> list[str]:
    """The text of a row's cells after Method: Seeds, Precision, then TABLE_COLUMNS."""
    return [f"n = {len(row.runs)}", row.first.precision,
            *(stat_text(row.stat(c), nd, len(row.runs)) for c, nd in TABLE_COLUMNS)]


def diff_cells(diff: PairedDiff) -> list[str]:
    """The text of a paired difference's cells: Row, Reference, Seeds, then DIFF_COLUMNS."""
    return [diff.row.label, diff.ref.label, f"n = {len(diff.seeds)}",
            *(diff_text(diff.stat(c)) for c in DIFF_COLUMNS)]


def table_rows(runs: list[RunData]) -> list[dict]:
    """One dict per run, the lines of table.csv: the run's own values, C against the baseline run of its seed."""
    rows = []
    for r in runs:
        c = r.cost
        rows.append({"run": str(r.path), "method": r.label, "loss": r.loss, "dataset": r.dataset.get("name"),
                     "model": r.model, "seed": r.seed, "precision": r.precision, "selection": r.result.get("selection"),
                     **{k: METRICS[k](r) for k in CSV_METRICS},
                     "baseline": str(r.baseline.path) if r.baseline is not None else None,
                     "params": c.get("params"), "params_dense": c.get("params_dense"),
                     "macs_dense": c.get("macs_dense")})
    return rows


def caption(runs: list[RunData]) -> str:
    parts = []
    seen = set()
    for r in runs:
        d, g = r.dataset, r.result.get("groups", {}) or {}
        key = (r.dataset_key, g.get("many"), g.get("medium"), g.get("few"), g.get("rule"))
        if key in seen:
            continue
        seen.add(key)
        th = g.get("thresholds") or [100, 20]
        rule = (f"many > {th[0]}, medium {th[1]}-{th[0]}, few < {th[1]} training images"
                if g.get("rule", "thresholds") == "thresholds"
                else f"frequency {g.get('rule')}, since many > {th[0]} / few < {th[1]} left a group empty")
        ir = d.get("imbalance_ratio")
        parts.append(f"{d.get('name', '?')}{f' IR {ir:g}' if isinstance(ir, (int, float)) else ''}: "
                     f"Head/Medium/Tail = {g.get('many', '?')}/{g.get('medium', '?')}/{g.get('few', '?')} classes "
                     f"({rule})")
    sel = sorted({str(r.result.get("selection", "last")) for r in runs})
    precisions = sorted({r.precision for r in runs})
    mixed = (f" Precision differs between rows ({', '.join(precisions)}): compare rows of one precision."
             if len(precisions) > 1 else "")
    return ("Top-1 test accuracy (%). " + "; ".join(parts) + f". Model: {', '.join(sel)} epoch. "
            "Seeds: n runs that differ only in run.seed; for n > 1 a cell is the mean ± sample standard deviation "
            "over them, (n = k) where only k have a value. "
            "F = 100 x MACs / dense MACs; C = 100 x All / All(baseline run of the same seed); C/F = C / F; "
            "blank C, C/F: no dense baseline of the same loss, dataset and precision among the runs, or none of "
            "that seed." + mixed)


def _md_line(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def markdown_table(rows: list[Row]) -> str:
    lines = [_md_line(HEADERS), "|---|" + "---:|" * (len(HEADERS) - 1)]
    for row in rows:
        name = f"**{row.label}** (baseline)" if row.baseline is row else row.label
        lines.append(_md_line([name, *row_cells(row)]))
    return "\n".join(lines) + "\n\n" + caption([r for row in rows for r in row.runs]) + "\n"


def markdown_diffs(diffs: list[PairedDiff]) -> str:
    lines = [DIFF_INTRO, "", _md_line(DIFF_HEADERS), "|---|---|" + "---:|" * (len(DIFF_HEADERS) - 2)]
    lines += [_md_line(diff_cells(d)) for d in diffs]
    return "\n".join(lines) + "\n"


def write_csv(runs: list[RunData], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        for row in table_rows(runs):
            w.writerow({k: ("" if v is None else repr(v) if isinstance(v, float) else v) for k, v in row.items()})


def read_csv(path: Path) -> list[dict]:
    """Read a report CSV back, numbers as float/int and blanks as None."""
    out = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            rec = {}
            for k, v in row.items():
                if v == "":
                    rec[k] = None
                elif k in ("F", "head", "medium", "tail", "all", "balanced", "C", "C_over_F"):
                    rec[k] = float(v)
                elif k in ("params", "macs", "params_dense", "macs_dense", "seed"):
                    rec[k] = int(v)
                else:
                    rec[k] = v
            out.append(rec)
    return out


# ------------------------------------------------------------------------------------------------- html
CSS = """body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table.paper{border-collapse:collapse;font-size:14px;margin:8px 0}
table.paper th,table.paper td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}
table.paper th:first-child,table.paper td:first-child{text-align:left}
table.paper#diffs th:nth-child(2),table.paper#diffs td:nth-child(2){text-align:left}
table.paper thead th{border-top:2px solid #222;border-bottom:1.5px solid #222}
table.paper tr.baseline td{background:#eee}table.paper td.key,table.paper th.key{background:#e4e4e4}
table.paper tbody tr:last-child td{border-bottom:2px solid #222}
.caption{font-size:13px;color:#444;max-width:1000px}.warn{color:#a40}
figure{margin:12px 0;display:inline-block;vertical-align:top}figcaption{font-size:12px;color:#555}
img{max-width:100%;border:1px solid #eee}code{font-size:12px}"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _html_row(cls: str, cells: list[tuple[str, str, str]]) -> str:
    """A <tr> of (class, title, text) cells; the title is the hover text (run paths, per-seed values)."""
    e = html.escape
    tds = "".join(f'<td{f" class={c}" if c else ""} title="{e(t)}">{e(x)}</td>' for c, t, x in cells)
    return f"<tr{f' class={cls}' if cls else ''}>{tds}</tr>"


def _html_results_row(row: Row) -> str:
    texts = row_cells(row)
    cells = [("", ", ".join(str(r.path) for r in row.runs), row.label),
             ("", "seeds " + ", ".join(str(s) for s in row.seeds), texts[0]),
             ("", "train.precision of the row's runs", texts[1])]
    for (column, nd), text in zip(TABLE_COLUMNS, texts[2:]):
        per_seed = "; ".join(f"seed {s}: {_f(v, nd)}" for s, v in row.values(column).items())
        cells.append(("key" if column in ("F", "C_over_F") else "", per_seed, text))
    return _html_row("baseline" if row.baseline is row else "", cells)


def _html_diff_row(diff: PairedDiff) -> str:
    texts = diff_cells(diff)
    cells = [("", ", ".join(str(r.path) for r in diff.row.runs), texts[0]),
             ("", ", ".join(str(r.path) for r in diff.ref.runs), texts[1]),
             ("", "seeds " + ", ".join(str(s) for s in diff.seeds), texts[2])]
    for column, text in zip(DIFF_COLUMNS, texts[3:]):
        a, b = diff.row.values(column), diff.ref.values(column)
        per_seed = "; ".join(f"seed {s}: {_signed(a[s] - b[s])}" for s in diff.seeds
                             if a[s] is not None and b[s] is not None)
        cells.append(("", per_seed, text))
    return _html_row("", cells)


def html_page(rows: list[Row], diffs: list[PairedDiff], plots: list[tuple[str, Path]], warnings: list[str]) -> str:
    e = html.escape
    runs = [r for row in rows for r in row.runs]

    def base(r):
        return f" (baseline: <code>{e(str(r.baseline.path))}</code>)" if r.baseline not in (None, r) else ""

    runs_list = "".join(f"<li><code>{e(str(r.path))}</code> — {e(r.label)}, seed {e(str(r.seed))}{base(r)}</li>"
                        for r in runs)
    warn = "".join(f"<li class=warn>{e(w)}</li>" for w in warnings)
    figs = "".join(f'<figure><img src="{_data_uri(p)}" alt="{e(t)}"><figcaption>{e(t)}</figcaption></figure>'
                   for t, p in plots)
    diff_table = (f'<h2>Paired differences</h2><p class="caption">{e(DIFF_INTRO)}</p>\n<table class="paper" id="diffs">'
                  "<thead><tr>" + "".join(f"<th>{h}</th>" for h in DIFF_HEADERS) + "</tr></thead>\n<tbody>\n" +
                  "\n".join(_html_diff_row(d) for d in diffs) + "\n</tbody></table>") if diffs else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tailwise report</title><style>{CSS}</style></head>
<body>
<h1>tailwise report</h1>
<table class="paper" id="results">
<thead><tr><th>Method</th><th>Seeds</th><th class=key>F(%) ↓</th><th>Head ↑</th><th>Medium ↑</th><th>Tail ↑</th>
<th>All ↑</th><th>C(%) ↑</th><th class=key>C/F ↑</th></tr></thead>
<tbody>
{chr(10).join(_html_results_row(row) for row in rows)}
</tbody></table>
<p class="caption">{e(caption(runs))} Gray row: the baseline of its block. Hover a cell for its per-seed values.</p>
{diff_table}
{f'<h2>Skipped runs</h2><ul>{warn}</ul>' if warn else ''}
<h2>Runs</h2><ul>{runs_list}</ul>
<h2>Plots</h2>
{figs}
</body></html>
"""


# ------------------------------------------------------------------------------------------------- driver
def _slug(i: int, run: RunData) -> str:
    name = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in run.path.name)[:60]
    return f"{i:02d}_{name}"


def make_plots(rows: list[Row], plot_dir: Path) -> list[tuple[str, Path]]:
    """Write the plots into ``plot_dir``, which belongs to the report: the PNGs of an earlier report there (of
    other runs, or numbered differently) are removed first, so none is left unreferenced. The plots of all rows
    show the mean over seeds with sample-sd error bars; the per-run plots draw each row's first seed."""
    from . import plots as P

    plot_dir.mkdir(parents=True, exist_ok=True)
    for old in plot_dir.glob("*.png"):
        old.unlink()
    out: list[tuple[str, Path]] = []

    def add(title, path):
        if path is not None:
            out.append((title, path))

    add("Per-class accuracy vs training count", P.per_class_vs_count(rows, plot_dir / "per_class_vs_count.png"))
    add("Head / Medium / Tail accuracy", P.group_bars(rows, plot_dir / "group_bars.png"))
    add("Accuracy vs MACs", P.acc_vs_macs(rows, plot_dir / "acc_vs_macs.png"))
    for i, row in enumerate(rows):
        r, s = row.first, _slug(i, row.first)
        who = row.label + (f" (seed {r.seed} of seeds {', '.join(map(str, row.seeds))})" if len(row.runs) > 1 else "")
        add(f"Training dynamics: {who}", P.dynamics(r, plot_dir / f"dynamics_{s}.png"))
        if not r.is_dense:  # a dense run keeps every channel: nothing to show
            add(f"Live channels per layer: {who}", P.live_channels(r, plot_dir / f"channels_{s}.png"))
            add(f"Kernel mask of one layer: {who}", P.kernel_mask(r, plot_dir / f"kernels_{s}.png"))
        add(f"LT-Vote criterion weights: {who}", P.ltap_alpha(r, plot_dir / f"ltap_alpha_{s}.png"))
    return out


def load_runs(run_dirs: list, baseline: str | Path | None, warn: Callable[[str], None]) -> tuple:
    """``(runs, baseline run or None, warnings)``: each directory loaded once, the baseline first; unreadable
    runs skipped with a warning. Raises TailwiseError when the baseline or every run is unreadable."""
    warnings: list[str] = []
    runs: list[RunData] = []
    seen = set()
    base_run = None
    if baseline is not None:
        try:
            base_run = load_run(Path(baseline))
        except ValueError as exc:
            raise TailwiseError(f"--baseline {baseline}: {exc}") from None
        runs.append(base_run)
        seen.add(base_run.path.resolve())
    for d in run_dirs:
        d = Path(d)
        if d.resolve() in seen:
            continue
        seen.add(d.resolve())
        try:
            runs.append(load_run(d))
        except ValueError as exc:
            msg = f"skipping {exc}"
            warnings.append(msg)
            warn(msg)
    if not runs:
        raise TailwiseError("no usable run: every RUN_DIR lacks a readable result.json (" +
                            "; ".join(warnings) + "); finish the runs or pass other run directories")
    return runs, base_run, warnings


def build_report(run_dirs: list, out: Path, baseline: str | Path | None = None,
                 warn: Callable[[str], None] | None = None, diffs: Iterable[tuple] = ()) -> dict:
    """Load the runs, group their seeds into rows, and write table.md, table.csv, report.md, report.html and
    plots/*.png into ``out``. ``diffs``: (RUN_DIR, REF_RUN_DIR) pairs whose rows' paired differences to show
    besides each row's against its baseline.

    Returns {"runs": [RunData], "rows": [Row], "diffs": [PairedDiff], "warnings": [str], "files": {name: Path},
    "plots": [(title, Path)]}. Raises TailwiseError, before writing anything, when no run (or the given baseline)
    is usable, when the runs of a row differ in more than their seed, or when a ``diffs`` pair is unusable.
    """
    runs, base_run, warnings = load_runs(run_dirs, baseline, warn or (lambda msg: None))
    for r in runs:
        r.label = method_label(r)
    rows = group_rows(runs)
    assign_baselines(rows, base_run)
    # baselines first inside each (dataset, loss) block, as in the paper
    rows.sort(key=lambda row: (str(row.first.dataset_key), row.first.loss, row.baseline is not row,
                               (row.stat("F").mean is None, -(row.stat("F").mean or 0))))
    pairs = paired_diffs(rows, diffs)
    runs = [r for row in rows for r in row.runs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = make_plots(rows, out / "plots")
    md_table = markdown_table(rows) + (f"\n{markdown_diffs(pairs)}" if pairs else "")
    files = {"table.md": out / "table.md", "table.csv": out / "table.csv", "report.md": out / "report.md",
             "report.html": out / "report.html"}
    atomic_write_text(files["table.md"], md_table)
    write_csv(runs, files["table.csv"])
    md = ["# tailwise report", "", md_table]
    if warnings:
        md += ["Skipped runs:", ""] + [f"- {w}" for w in warnings] + [""]
    md += [f"![{t}](plots/{p.name})" for t, p in plots]
    atomic_write_text(files["report.md"], "\n".join(md) + "\n")
    atomic_write_text(files["report.html"], html_page(rows, pairs, plots, warnings))
    return {"runs": runs, "rows": rows, "diffs": pairs, "warnings": warnings, "files": files, "plots": plots}


__all__ = ["RunData", "Row", "PairedDiff", "Stat", "summarize", "load_run", "build_report", "markdown_table",
           "markdown_diffs", "write_csv", "read_csv", "method_label", "group_rows", "assign_baselines",
           "paired_diffs", "table_rows", "caption", "run_precision", "more_general"]
