"""Paper-layout reports of finished runs: Markdown table, CSV, self-contained HTML page, PNG plots.

    tailwise report RUN_DIR... [--baseline RUN_DIR] [--out DIR]

The table follows the LTAP paper's Tables 1-2: Method, F(%), Head, Medium, Tail, All, C(%), C/F.

- Head / Medium / Tail are the run's ``result.json`` ``accuracy.many`` / ``.medium`` / ``.few`` (test split, the
  model given by ``selection``), All is ``accuracy.all``; all in percent.
- F(%) is ``cost.F`` = 100 x deployed MACs / dense MACs of the same architecture (the paper: "the ratio of FLOPs
  between the target method and the baseline method"; the baseline is the dense network, so they coincide).
  When ``cost.F`` is absent it is computed as 100 x ``cost.macs`` / ``cost.macs_dense``.
- C(%) = 100 x All(run) / All(baseline) (the paper: "the ratio of accuracy between the target method and the
  baseline method"; e.g. BS + LTAP, IR 50: 100 x 47.8 / 51.2 = 93.4, printed 93.3).
- C/F = C(%) / F(%), a dimensionless ratio; the baseline row has C = 100, C/F = 1.0 (paper: 93.3 / 22.6 = 4.1).
  The paper's own rows are not all consistent with this at one decimal (BS + ATO: 64.2 / 84.7 = 0.76, printed 0.7),
  so it looks truncated there; we print two decimals and do not truncate.

The baseline is ``--baseline`` for every row, or, per row, the dense run (method ``none``, F = 100) of the same
dataset (name, imbalance ratio, number of classes), model and loss among the given runs (same seed preferred).
Rows without a baseline leave C and C/F blank. A run whose ``result.json`` is missing or malformed is named in a
warning and skipped; with no usable run at all the report fails with exit code 2.
"""
from __future__ import annotations

import base64
import csv
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import TailwiseError

LOSS_LABELS = {"ce": "CE", "focal": "Focal", "class_balanced": "CB", "balanced_softmax": "BS",
               "logit_adjust": "LA", "ldam_drw": "LDAM-DRW", "ldam": "LDAM"}
METHOD_LABELS = {"ltap": "LTAP", "magnitude": "Magnitude", "taylor": "Taylor", "random": "Random",
                 "plasticity": "Growth", "do": "DO", "more": "MORE"}
CSV_FIELDS = ["run", "method", "loss", "dataset", "model", "seed", "selection", "F", "head", "medium", "tail", "all",
              "balanced", "C", "C_over_F", "baseline", "params", "macs", "params_dense", "macs_dense"]
REQUIRED = (("accuracy", "all"), ("accuracy", "many"), ("accuracy", "medium"), ("accuracy", "few"), ("cost", "macs"))


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
        mfile = run_dir / "metrics.jsonl"
        n = sum(1 for line in mfile.read_text().splitlines() if line.strip()) if mfile.is_file() else 0
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
    metrics = []
    mfile = run_dir / "metrics.jsonl"
    if mfile.is_file():
        for line in mfile.read_text().splitlines():
            try:
                rec = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                rec = None  # a line cut by an interrupted write; the rest is still useful
            if isinstance(rec, dict):
                metrics.append(rec)
    arch = None
    afile = run_dir / "model" / "arch.json"
    if afile.is_file():
        try:
            arch = _read_json(afile)
        except (json.JSONDecodeError, UnicodeDecodeError):
            arch = None
    return RunData(run_dir, result, metrics, arch)


def method_label(run: RunData) -> str:
    """'BS' for a dense run, 'BS + LTAP (w.o. vote, 30% params)' for a pruned one."""
    loss = LOSS_LABELS.get(run.loss, run.loss)
    m = run.method
    name = m.get("name") or "none"
    if name == "none":
        return loss
    opts = []
    vote = m.get("vote")
    if name == "ltap" and vote and vote != "adaptive":
        opts.append({"uniform": "w.o. vote", "public-code": "public-code weights"}.get(vote, f"vote={vote}"))
    if name == "ltap" and m.get("normalize") not in (None, "l2"):
        opts.append(f"{m['normalize']} normalisation")
    if m.get("criteria") and name == "ltap" and len(m["criteria"]) < 5:
        opts.append("criteria=" + "+".join(m["criteria"]))
    for key, what in (("target_params", "params"), ("target_macs", "MACs"), ("target_sparsity", "sparsity")):
        if m.get(key) is not None:
            opts.append(f"{what} {100 * m[key]:.0f}%")
    if m.get("stages"):
        opts.append(f"{m['stages']} stages")
    if (m.get("round_to") or 1) > 1:
        opts.append(f"channels in multiples of {m['round_to']}")
    epochs = run.result.get("epochs")
    if epochs:
        opts.append(f"{epochs} ep")
    return f"{loss} + {METHOD_LABELS.get(name, name)}" + (f" ({', '.join(opts)})" if opts else "")


def assign_baselines(runs: list[RunData], baseline: RunData | None) -> None:
    for r in runs:
        if baseline is not None:
            r.baseline = baseline
            continue
        cands = [b for b in runs if b.is_dense and b.loss == r.loss and b.dataset_key == r.dataset_key
                 and (b.model == r.model or None in (b.model, r.model))]
        if r in cands:
            r.baseline = r
        elif cands:
            same_seed = [b for b in cands if b.result.get("seed") == r.result.get("seed")]
            r.baseline = (same_seed or cands)[0]
        else:
            r.baseline = None


# ------------------------------------------------------------------------------------------------- tables
def _f(v, nd=1) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def table_rows(runs: list[RunData]) -> list[dict]:
    rows = []
    for r in runs:
        c = r.cost
        rows.append({"run": str(r.path), "method": r.label, "loss": r.loss, "dataset": r.dataset.get("name"),
                     "model": r.model, "seed": r.result.get("seed"), "selection": r.result.get("selection"),
                     "F": r.F, "head": r.acc.get("many"), "medium": r.acc.get("medium"), "tail": r.acc.get("few"),
                     "all": r.acc.get("all"), "balanced": r.acc.get("balanced"), "C": r.C, "C_over_F": r.C_over_F,
                     "baseline": str(r.baseline.path) if r.baseline is not None else None,
                     "params": c.get("params"), "macs": c.get("macs"), "params_dense": c.get("params_dense"),
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
    return ("Top-1 test accuracy (%). " + "; ".join(parts) + f". Model: {', '.join(sel)} epoch. "
            "F = 100 x MACs / dense MACs; C = 100 x All / All(baseline); C/F = C / F; "
            "blank C, C/F: no dense baseline of the same loss and dataset among the runs.")


def markdown_table(runs: list[RunData]) -> str:
    head = "| Method | F(%) ↓ | Head ↑ | Medium ↑ | Tail ↑ | All ↑ | C(%) ↑ | C/F ↑ |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row, r in zip(table_rows(runs), runs):
        name = row["method"].replace("|", "\\|")
        if r.baseline is r:
            name = f"**{name}** (baseline)"
        lines.append(f"| {name} | {_f(row['F'])} | {_f(row['head'])} | {_f(row['medium'])} | {_f(row['tail'])} | "
                     f"{_f(row['all'])} | {_f(row['C'])} | {_f(row['C_over_F'], 2)} |")
    return "\n".join(lines) + "\n\n" + caption(runs) + "\n"


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
table.paper thead th{border-top:2px solid #222;border-bottom:1.5px solid #222}
table.paper tr.baseline td{background:#eee}table.paper td.key,table.paper th.key{background:#e4e4e4}
table.paper tbody tr:last-child td{border-bottom:2px solid #222}
.caption{font-size:13px;color:#444;max-width:1000px}.warn{color:#a40}
figure{margin:12px 0;display:inline-block;vertical-align:top}figcaption{font-size:12px;color:#555}
img{max-width:100%;border:1px solid #eee}code{font-size:12px}"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def html_page(runs: list[RunData], plots: list[tuple[str, Path]], warnings: list[str]) -> str:
    e = html.escape
    rows = []
    for row, r in zip(table_rows(runs), runs):
        cls = ' class="baseline"' if r.baseline is r else ""
        rows.append(f"<tr{cls}><td title=\"{e(row['run'])}\">{e(row['method'])}</td><td class=key>{_f(row['F'])}</td>"
                    f"<td>{_f(row['head'])}</td><td>{_f(row['medium'])}</td><td>{_f(row['tail'])}</td>"
                    f"<td>{_f(row['all'])}</td><td>{_f(row['C'])}</td><td class=key>{_f(row['C_over_F'], 2)}</td></tr>")
    def base(r):
        return f" (baseline: <code>{e(str(r.baseline.path))}</code>)" if r.baseline not in (None, r) else ""

    runs_list = "".join(f"<li><code>{e(str(r.path))}</code> — {e(r.label)}{base(r)}</li>" for r in runs)
    warn = "".join(f"<li class=warn>{e(w)}</li>" for w in warnings)
    figs = "".join(f'<figure><img src="{_data_uri(p)}" alt="{e(t)}"><figcaption>{e(t)}</figcaption></figure>'
                   for t, p in plots)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tailwise report</title><style>{CSS}</style></head>
<body>
<h1>tailwise report</h1>
<table class="paper" id="results">
<thead><tr><th>Method</th><th class=key>F(%) ↓</th><th>Head ↑</th><th>Medium ↑</th><th>Tail ↑</th>
<th>All ↑</th><th>C(%) ↑</th><th class=key>C/F ↑</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
<p class="caption">{e(caption(runs))} Gray row: the baseline of its block.</p>
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


def make_plots(runs: list[RunData], plot_dir: Path) -> list[tuple[str, Path]]:
    """Write the plots into ``plot_dir``, which belongs to the report: the PNGs of an earlier report there (of
    other runs, or numbered differently) are removed first, so none is left unreferenced."""
    from . import plots as P

    plot_dir.mkdir(parents=True, exist_ok=True)
    for old in plot_dir.glob("*.png"):
        old.unlink()
    out: list[tuple[str, Path]] = []

    def add(title, path):
        if path is not None:
            out.append((title, path))

    add("Per-class accuracy vs training count", P.per_class_vs_count(runs, plot_dir / "per_class_vs_count.png"))
    add("Head / Medium / Tail accuracy", P.group_bars(runs, plot_dir / "group_bars.png"))
    add("Accuracy vs MACs", P.acc_vs_macs(runs, plot_dir / "acc_vs_macs.png"))
    for i, r in enumerate(runs):
        s = _slug(i, r)
        add(f"Training dynamics: {r.label}", P.dynamics(r, plot_dir / f"dynamics_{s}.png"))
        if not r.is_dense:  # a dense run keeps every channel: nothing to show
            add(f"Live channels per layer: {r.label}", P.live_channels(r, plot_dir / f"channels_{s}.png"))
            add(f"Kernel mask of one layer: {r.label}", P.kernel_mask(r, plot_dir / f"kernels_{s}.png"))
        add(f"LT-Vote criterion weights: {r.label}", P.ltap_alpha(r, plot_dir / f"ltap_alpha_{s}.png"))
    return out


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def build_report(run_dirs: list, out: Path, baseline: str | Path | None = None,
                 warn: Callable[[str], None] | None = None) -> dict:
    """Load the runs, write table.md, table.csv, report.md, report.html and plots/*.png into ``out``.

    Returns {"runs": [RunData], "warnings": [str], "files": {name: Path}, "plots": [(title, Path)]}.
    Raises TailwiseError when no run (or the given baseline) is usable.
    """
    warn = warn or (lambda msg: None)
    out = Path(out)
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
    labels: dict[str, int] = {}
    for r in runs:
        r.label = method_label(r)
        labels[r.label] = labels.get(r.label, 0) + 1
    for r in runs:  # disambiguate rows with the same label (seeds, repeated recipes)
        if labels[r.label] > 1:
            r.label += f" [{r.path.name}]"
    assign_baselines(runs, base_run)
    # baselines first inside each (dataset, loss) block, as in the paper
    runs.sort(key=lambda r: (str(r.dataset_key), r.loss, r.baseline is not r, (r.F is None, -(r.F or 0))))
    out.mkdir(parents=True, exist_ok=True)
    plots = make_plots(runs, out / "plots")
    md_table = markdown_table(runs)
    files = {"table.md": out / "table.md", "table.csv": out / "table.csv", "report.md": out / "report.md",
             "report.html": out / "report.html"}
    _atomic_write(files["table.md"], md_table)
    write_csv(runs, files["table.csv"])
    md = ["# tailwise report", "", md_table]
    if warnings:
        md += ["Skipped runs:", ""] + [f"- {w}" for w in warnings] + [""]
    md += [f"![{t}](plots/{p.name})" for t, p in plots]
    _atomic_write(files["report.md"], "\n".join(md) + "\n")
    _atomic_write(files["report.html"], html_page(runs, plots, warnings))
    return {"runs": runs, "warnings": warnings, "files": files, "plots": plots}


__all__ = ["RunData", "load_run", "build_report", "markdown_table", "write_csv", "read_csv", "method_label",
           "assign_baselines", "table_rows", "caption"]
