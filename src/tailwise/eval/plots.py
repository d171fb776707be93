"""Report plots (matplotlib, Agg backend, PNG). Every function takes already-loaded report data and writes one file:
the plots of several rows take :class:`tailwise.eval.report.Row` objects (means over seeds, sample-sd error bars),
the per-run plots one :class:`tailwise.eval.report.RunData`.

Each plot function returns the path it wrote, or ``None`` when the runs carry nothing to plot (e.g. no
``ltap_alpha`` records), so the report lists exactly the files that exist.
"""
from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

GROUP_COLORS = {"many": "#1f77b4", "medium": "#ff7f0e", "few": "#d62728", "all": "#444444"}
GROUP_LABELS = {"many": "Head (many)", "medium": "Medium", "few": "Tail (few)", "all": "All"}
GROUP_COLUMNS = {"many": "head", "medium": "medium", "few": "tail", "all": "all"}  # the report's column names
DPI = 110


def layer_sort_key(name: str):
    """Natural order of layer names: conv1 < layer1.0.conv1 < layer1.0.conv2 < ... < layer3.4.conv2 < fc."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png")
    plt.close(fig)
    return path


def _spread(stats) -> list[float] | None:
    """Error-bar half-lengths: the sample sd of each Stat (0 where n < 2); None when no Stat has an sd."""
    return [st.sd or 0.0 for st in stats] if any(st.sd for st in stats) else None


def per_class_vs_count(rows, path: Path) -> Path | None:
    """Per-class test accuracy against the class's training count (log x), one series per row: the mean over the
    row's seeds, with sample-sd error bars."""
    usable = [row for row in rows if row.per_class]
    if not usable:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    markers = "os^Dv<>pP*Xh"
    for i, row in enumerate(usable):
        pairs = sorted(zip(row.first.class_counts, row.per_class), key=lambda p: p[0])
        stats = [p[1] for p in pairs]
        ax.errorbar([p[0] for p in pairs], [st.mean for st in stats], yerr=_spread(stats),
                    marker=markers[i % len(markers)], ms=4, lw=1, alpha=0.85, capsize=2, label=row.label)
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("test accuracy of the class (%; mean ± sd over seeds)")
    ax.set_title("Per-class accuracy vs class frequency")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def group_bars(rows, path: Path) -> Path | None:
    """Head / Medium / Tail / All accuracy bars, one bar per row in each group: the mean over the row's seeds, with
    sample-sd error bars."""
    if not rows:
        return None
    groups = ["many", "medium", "few", "all"]
    n = len(rows)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6.5, 1.6 * len(groups) + 0.3 * n), 4.5))
    for i, row in enumerate(rows):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        stats = [row.stat(GROUP_COLUMNS[g]) for g in groups]
        bars = ax.bar(xs, [st.mean if st.mean is not None else 0.0 for st in stats], width=width * 0.95,
                      yerr=_spread(stats), capsize=2, label=row.label)
        if n <= 6:
            ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)
    ax.set_xticks(range(len(groups)), [GROUP_LABELS[g] for g in groups])
    ax.set_ylabel("test accuracy (%; mean ± sd over seeds)")
    ax.set_xlabel("class group")
    ax.set_ylim(0, 115)
    ax.set_title("Accuracy per class group")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, path)


def dynamics(run, path: Path) -> Path | None:
    """Validation accuracy per group over epochs, pruning stages as dashed vertical lines, F on a second axis."""
    recs = [m for m in run.metrics if isinstance(m.get("val"), dict) and "epoch" in m]
    if not recs:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    epochs = [m["epoch"] + 1 for m in recs]
    for g in ("many", "medium", "few", "all"):
        ys = [m["val"].get(g) for m in recs]
        if any(y is not None for y in ys):
            ax.plot(epochs, [y if y is not None else float("nan") for y in ys], color=GROUP_COLORS[g],
                    lw=2.2 if g == "all" else 1.4, label=GROUP_LABELS[g])
    stages = [m for m in run.metrics if isinstance(m.get("pruning_stage"), dict)]
    for j, m in enumerate(stages):
        ax.axvline(m["epoch"] + 1, color="gray", ls="--", lw=0.9, label="pruning stage" if j == 0 else None)
    macs_dense = run.macs_dense
    if macs_dense and any("active_macs" in m for m in recs):
        ax2 = ax.twinx()
        ax2.plot(epochs, [100.0 * m.get("active_macs", float("nan")) / macs_dense for m in recs], color="black",
                 ls=":", lw=1.2, label="F (% of dense MACs)")
        ax2.set_ylabel("F: MACs (% of dense)")
        ax2.set_ylim(0, 105)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax2.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower right", framealpha=0.95)  # top axes: drawn over lines
    else:
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Training dynamics: {run.label}", fontsize=10)
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def live_channels(run, path: Path) -> Path | None:
    """Live output channels per layer (deployed arch.json, else the last live_channels record) vs dense width."""
    live, dense = run.live_channels, run.dense_channels
    if not live:
        return None
    layers = sorted(live, key=layer_sort_key)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.26 * len(layers) + 2), 4.2))
    xs = range(len(layers))
    if dense:
        ax.bar(xs, [dense.get(k, 0) for k in layers], color="#cccccc", label="dense width")
    ax.bar(xs, [live[k] for k in layers], color="#1f77b4", width=0.6, label="live (kept) channels")
    ax.set_xticks(list(xs), layers, rotation=90, fontsize=6)
    ax.set_xlabel("layer")
    ax.set_ylabel("output channels (count)")
    kept = sum(live.values()) / max(1, sum(dense.get(k, 0) for k in layers)) * 100 if dense else None
    ax.set_title(f"Channels per layer: {run.label}" + (f" ({kept:.0f}% kept)" if kept is not None else ""),
                 fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def kernel_grid(structure: list, weights: dict, layer: str | None = None):
    """``(layer, grid)`` for the kernel-mask view: ``grid[o, i]`` is the L2 norm of the deployed kernel from
    dense input channel ``i`` to dense output channel ``o`` of ``layer``, NaN where pruning removed it.

    ``layer`` defaults to the conv whose input and output channels both belong to groups and that keeps the
    smallest fraction of its kernels. Returns None when no such layer exists (or ``layer`` is not one).
    """
    import numpy as np

    out_group = {p: g for g in structure for p in g.get("producers", [])}
    in_group = {c: g for g in structure for c in g.get("consumers", [])}
    candidates = [name for name in out_group if name in in_group and f"{name}.weight" in weights
                  and weights[f"{name}.weight"].dim() == 4]
    if layer is None:
        def kept_fraction(name):
            o, i = out_group[name], in_group[name]
            return len(o["kept"]) * len(i["kept"]) / (o["size"] * i["size"]), layer_sort_key(name)

        layer = min(candidates, key=kept_fraction, default=None)
    if layer not in candidates:
        return None
    o, i = out_group[layer], in_group[layer]
    w = weights[f"{layer}.weight"].float()
    if tuple(w.shape[:2]) != (len(o["kept"]), len(i["kept"])):
        return None  # weights and structure disagree (not the deployed model of this run)
    grid = np.full((o["size"], i["size"]), np.nan)
    grid[np.ix_(o["kept"], i["kept"])] = w.flatten(2).norm(dim=2).numpy()
    return layer, grid


def kernel_mask(run, path: Path) -> Path | None:
    """The kernel-mask view of one layer (like the LTAP paper's Figure 2): which kernels (output x input
    channel) survive, coloured by their L2 norm in the deployed model; removed kernels grey."""
    import numpy as np

    weights_file = run.path / "model" / "weights.safetensors"
    if not run.structure or not weights_file.is_file():
        return None
    from safetensors.torch import load_file

    found = kernel_grid(run.structure, load_file(str(weights_file)))
    if found is None:
        return None
    layer, grid = found
    kept = int(np.isfinite(grid).sum())
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d9d9d9")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="kernel L2 norm (kept kernels)")
    ax.set_xlabel(f"input channel of {layer} (dense index)")
    ax.set_ylabel("output channel (dense index)")
    ax.set_title(f"Kernel mask of {layer}: {kept} of {grid.size} kernels kept ({100 * kept / grid.size:.0f}%), "
                 f"removed in grey\n{run.label}", fontsize=9)
    return _save(fig, path)


def ltap_alpha(run, path: Path) -> Path | None:
    """LT-Vote criterion weights per pruning stage (one line per criterion): the alpha each stage's mix used
    (solid; a suppressed criterion at 0) and, where recorded (``vote: trial``), the weights before suppression
    (dashed)."""
    recs = [m for m in run.metrics if isinstance(m.get("pruning_stage"), dict) and m.get("ltap_alpha")]
    if not recs:
        return None
    names = []
    for m in recs:
        names += [k for k in m["ltap_alpha"] if k not in names]
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    stages = [m["pruning_stage"]["stage"] for m in recs]
    for k in names:
        line, = ax.plot(stages, [m["ltap_alpha"].get(k, float("nan")) for m in recs], marker="o", ms=3, lw=1.3,
                        label=k)
        before = [(m.get("ltap_vote") or {}).get("alpha_base", {}).get(k, float("nan")) for m in recs]
        if any(b == b for b in before):
            ax.plot(stages, before, ls="--", lw=0.9, marker="x", ms=4, color=line.get_color())
    ax.set_xticks(stages, [f"{s}\n(epoch {m['epoch'] + 1})" for s, m in zip(stages, recs)])
    ax.set_xlabel("pruning stage")
    ax.set_ylabel("α used by the stage's mix (dashed: before suppression)", fontsize=8)
    ax.set_title(f"LT-Vote criterion weights per stage: {run.label}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def acc_vs_macs(rows, path: Path) -> Path | None:
    """All and Tail accuracy against deployed MACs (millions), one point pair per row: the means over the row's
    seeds, with sample-sd error bars on both axes."""
    usable = [row for row in rows if row.stat("macs").n]
    if not usable:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    for i, row in enumerate(usable):
        macs, color = row.stat("macs"), f"C{i % 10}"
        x, xerr = macs.mean / 1e6, [(macs.sd or 0.0) / 1e6] if macs.sd else None
        for column, marker, label in (("all", "o", row.label), ("tail", "v", None)):
            acc = row.stat(column)
            if acc.n:
                ax.errorbar([x], [acc.mean], xerr=xerr, yerr=_spread([acc]), color=color, marker=marker,
                            ms=6 if marker == "o" else 5, capsize=2, ls="none", label=label)
    ax.scatter([], [], color="gray", marker="o", label="All accuracy")
    ax.scatter([], [], color="gray", marker="v", label="Tail (few) accuracy")
    dense = sorted({r.macs_dense for row in usable for r in row.runs if r.macs_dense})
    for j, m in enumerate(dense):
        ax.axvline(m / 1e6, color="gray", ls=":", lw=1, label="dense model MACs" if j == 0 else None)
    right = max([row.stat("macs").hi for row in usable] + dense) / 1e6
    ax.set_xlabel("MACs per image (millions; mean ± sd over seeds)")
    ax.set_ylabel("test accuracy (%; mean ± sd over seeds)")
    ax.set_title("Accuracy vs compute")
    ax.grid(True, alpha=0.3)
    ax.set_xlim(0, right * 1.08)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    return _save(fig, path)
