"""Shared helpers of the benchmark scripts: timing, machine description, run epochs, docs/benchmarks.md sections."""
from __future__ import annotations

import datetime
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # the scripts run from a checkout without an install, too
    sys.path.insert(0, str(ROOT / "src"))

from tailwise.atomic import atomic_write_text  # noqa: E402  (after the path set-up)

DOCS = ROOT / "docs" / "benchmarks.md"
DOCS_INTRO = ("# Benchmarks\n\nMeasured performance of tailwise; each section is written by the script named in it "
              "(`--write-docs`).\n")
DEFAULT_DATA = str(ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed(fn) -> tuple[float, object]:
    """``(seconds, result)`` of one call of ``fn``, after a garbage collection."""
    gc.collect()
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def median_time(fn, repeats: int, warmup: int = 0) -> float:
    """Median seconds of ``repeats`` calls of ``fn``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def first_own_epoch(result: dict | None) -> int:
    """The first epoch a run trained itself, from its ``result.json`` (``None`` while it trains): 0, or for a run
    branched from another run's checkpoint that checkpoint's epoch -- the next epoch to train; the branch's
    ``metrics.jsonl`` starts with the source's records of the epochs before it
    (:func:`tailwise.engine.branch.copy_source_metrics`)."""
    return ((result or {}).get("branched_from") or {}).get("epoch", 0)


def epoch_times(records: list[dict], first: int = 0) -> list[float]:
    """The ``time_s`` (training + validation seconds) of the ``metrics.jsonl`` records of epoch ``first`` on."""
    return [r["time_s"] for r in records if "time_s" in r and r["epoch"] >= first]


def machine_lines(threads: int) -> list[str]:
    import torchvision

    load = os.getloadavg()
    return [
        f"- Machine: `{platform.platform()}`, {platform.machine()}, `os.cpu_count()` = {os.cpu_count()}, "
        f"torch threads = {threads}",
        f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, numpy {np.__version__}",
        f"- Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- Load average at the start (1/5/15 min): {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
    ]


def section_head(heading: str, script: str, argv: list[str]) -> list[str]:
    """The first lines of a benchmark's docs section: its ``## `` heading and the exact command that wrote it."""
    import shlex

    return [heading, "", "Command (repository root; `--write-docs` rewrites this section):", "", "```",
            "PYTHONPATH=src .venv/bin/python " + shlex.join([script, *argv]), "```", ""]


def write_section(path: Path, section: str) -> None:
    """Replace (or append) the ``## `` section whose heading is the first line of ``section``."""
    heading = section.splitlines()[0].strip()
    text = path.read_text() if path.exists() else DOCS_INTRO
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        body = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        before = "\n".join(lines[:start]).rstrip("\n")
        after = "\n".join(lines[end:]).strip("\n")
        body = (before + "\n\n" if before else "") + section.rstrip("\n") + "\n" + ("\n" + after + "\n" if after else "")
    atomic_write_text(path, body)


def publish(section: str, write_docs: bool) -> None:
    """Print a benchmark's docs section; with ``--write-docs`` also replace that section in docs/benchmarks.md."""
    print(section)
    if write_docs:
        write_section(DOCS, section)
        log(f"wrote the section to {DOCS}")


def add_intro_option(ap) -> None:
    """``--intro TEXT`` or ``--intro @FILE``: the text under a section's heading; a file keeps the command that
    the section records short."""
    def read(value: str) -> str:
        return Path(value[1:]).read_text().strip() if value.startswith("@") else value

    ap.add_argument("--intro", default="", type=read, help="text under the heading, or @FILE to read it from a file")


def one_precision(results) -> str:
    """The one ``train.precision`` of these runs' ``result.json`` dicts ('-' for none); runs of mixed precision
    are refused (exit code 2), since a table holds one precision."""
    from tailwise.eval.report import run_precision

    precisions = sorted({run_precision(r) for r in results})
    if len(precisions) > 1:
        print(f"error: the runs mix precisions ({', '.join(precisions)}); a table holds one precision, so report "
              "them in separate sections", file=sys.stderr)
        raise SystemExit(2)
    return precisions[0] if precisions else "-"


def fmt(value: float | None) -> str:
    """An accuracy cell: two decimals, ``-`` when missing."""
    return "-" if value is None else f"{value:.2f}"


def signed(value: float) -> str:
    """A difference in points: '+0.41', '−0.12' (a typographic minus, as the report's tables)."""
    return f"{value:+.2f}".replace("-", "−")


def per_seed_text(diff, column: str) -> str:
    """Every seed's own difference of a :class:`tailwise.eval.report.PairedDiff` in ``column`` (a report metric):
    's0 +0.41, s1 −0.12, s2 +1.30'."""
    a, b = diff.row.values(column), diff.ref.values(column)
    return ", ".join(f"s{s} {signed(a[s] - b[s])}" for s in diff.seeds
                     if a[s] is not None and b[s] is not None)
