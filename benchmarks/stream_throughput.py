"""Benchmark the streaming data path: images/s of ``StreamLoader`` on ImageNet-LT-shaped JPEGs, by worker count.

Generates a synthetic ImageNet-LT-like list-file dataset (``--classes`` classes with an exponential long-tailed
profile, ``--ratio`` between the largest and the smallest class, about ``--images`` JPEGs at quality 90 whose
sizes are drawn around ImageNet's typical 500x375, landscape 3 times in 4; smooth random content plus noise, so
files are neither trivially small nor incompressible), writes its list file, and measures the trainer's streamed
pipeline -- PIL decode + RandomResizedCrop(224) + horizontal flip + collate + normalisation (``train``), and
separately Resize(256) + CenterCrop(224) (``eval``) -- through ``StreamLoader`` for each worker count: ``--warmup``
batches (worker start-up included there), then ``--batches`` timed batches.

Usage (repository root)::

    PYTHONPATH=src .venv/bin/python benchmarks/stream_throughput.py [--workers 0 1 2] [--write-docs] [--dir DIR]

Prints a Markdown section; ``--write-docs`` replaces the section of the same heading in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import DOCS, log, machine_lines, publish, section_head  # noqa: E402
from tailwise.data.loader import Sampler  # noqa: E402
from tailwise.data.longtail import profile_counts  # noqa: E402
from tailwise.data.stats import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from tailwise.data.stream import FileSplit, StreamLoader  # noqa: E402
from tailwise.data.transforms import eval_resize, train_transform  # noqa: E402

SECTION = "## Streaming loader throughput"


# -------------------------------------------------------------------------------------------------- the data
def class_counts(classes: int, images: int, ratio: float) -> list[int]:
    """Exponential long-tailed counts (Cao et al.'s profile) whose total is about ``images``."""
    n_max = 1
    while sum(profile_counts(n_max + 1, classes, ratio)) <= images:
        n_max += 1
    return profile_counts(n_max, classes, ratio)


def make_jpeg(path: Path, rng: np.random.Generator) -> None:
    """A quality-90 JPEG around 500x375 (landscape 3 in 4): a smooth random colour field plus noise."""
    from PIL import Image

    long = int(np.clip(rng.normal(500, 50), 350, 650))
    short = int(long * rng.uniform(0.66, 0.8))
    w, h = (long, short) if rng.random() < 0.75 else (short, long)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.float32) + rng.normal(0, 14, (h, w, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_dataset(directory: Path, classes: int, images: int, ratio: float, seed: int) -> tuple[Path, list[int]]:
    """Write the images under ``directory/images/cNNN/`` and ``directory/train.txt``; returns (list, counts)."""
    counts = class_counts(classes, images, ratio)
    rng = np.random.default_rng(seed)
    lines = []
    for c, n in enumerate(counts):
        folder = directory / "images" / f"c{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            make_jpeg(folder / f"{i:05d}.jpg", rng)
            lines.append(f"c{c:03d}/{i:05d}.jpg {c}")
    listing = directory / "train.txt"
    listing.write_text("\n".join(lines) + "\n")
    return listing, counts


def read_split(listing: Path, size: int) -> FileSplit:
    rows = [line.rsplit(maxsplit=1) for line in listing.read_text().splitlines()]
    return FileSplit(listing.parent / "images", [p for p, _ in rows], [int(y) for _, y in rows], size)


# ---------------------------------------------------------------------------------------------- measurement
def throughput(split: FileSplit, mode: str, workers: int, batch_size: int, warmup: int, batches: int,
               seed: int) -> dict:
    """Images/s over ``batches`` batches after ``warmup`` batches (start-up, first decodes) of one pass."""
    if mode == "train":
        loader = StreamLoader(split, batch_size, IMAGENET_MEAN, IMAGENET_STD,
                              sampler=Sampler(split.labels, "instance", seed, batch_size),
                              transform=train_transform(split.image_size), workers=workers)
    else:
        loader = StreamLoader(split, batch_size, IMAGENET_MEAN, IMAGENET_STD, workers=workers)
    if len(loader) < warmup + batches:
        raise SystemExit(f"{len(loader)} batches of {batch_size} in the data; need --warmup + --batches")
    it, images = iter(loader), 0
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        x, _ = next(it)
        images += len(x)
    seconds = time.perf_counter() - start
    del it, loader
    return {"mode": mode, "workers": workers, "images": images, "seconds": seconds, "rate": images / seconds}


# ---------------------------------------------------------------------------------------------------- report
def shell(cmd: str) -> str:
    return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def report(args, machine: list[str], data: dict, rows: list[dict], total_s: float) -> str:
    by = {(r["mode"], r["workers"]): r for r in rows}
    base = {m: by.get((m, args.workers[0])) for m in ("train", "eval")}
    lines = [
        *section_head(SECTION, "benchmarks/stream_throughput.py", args.argv),
        *machine,
        f"- `nproc`: {shell('env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc')}; CPU: {cpu_model()}; "
        f"`date`: {shell('date')}",
        f"- Seed: {args.seed}; data: {data['n']:,} synthetic JPEGs (quality 90, mean {data['kb']:.0f} KB, mean "
        f"{data['w']:.0f}x{data['h']:.0f} px) in {args.classes} classes, exponential profile {data['counts'][0]} -> "
        f"{data['counts'][-1]} images per class (imbalance {args.ratio:g}), generated in {data['gen_s']:.0f} s; "
        f"script runtime {total_s / 60:.1f} min",
        f"- Method: `StreamLoader` (the trainer's streamed loader) on CPU, batch {args.batch_size}, torch threads "
        f"{args.threads} in the main process (workers: 1 thread each); per row {args.warmup} warm-up batches "
        f"(worker start-up included there), then {args.batches} timed batches = {args.batches * args.batch_size} "
        "images. `train`: decode + RandomResizedCrop(224) + flip + collate + normalisation (instance sampler, "
        f"random order); `eval`: decode + Resize({eval_resize(224)}) + CenterCrop(224) + collate + normalisation "
        "(file order).",
        *([f"- Conditions: {args.note}"] if args.note else []),
        "",
        "| Pipeline | Workers | Images/s | Seconds | Speed-up vs " + f"{args.workers[0]} workers |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        ref = base[r["mode"]]
        lines.append(f"| {r['mode']} | {r['workers']} | {r['rate']:,.0f} | {r['seconds']:.2f} | "
                     f"{r['rate'] / ref['rate']:.2f}x |")
    lines += [
        "",
        "Workers decode in separate processes while the main process only collects and normalises the batches; "
        "with 0 workers the main process does everything. Each row is one measurement; rows are comparable with "
        "each other, not with other machines or load conditions.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="where to generate the data (default: a temporary directory, removed "
                        "afterwards); reused if it already holds train.txt")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--images", type=int, default=3000, help="about this many images in all")
    parser.add_argument("--ratio", type=float, default=20.0, help="imbalance: largest / smallest class")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in the main process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="", help="a sentence on the measuring conditions for the report")
    parser.add_argument("--write-docs", action="store_true", help=f"replace the section in {DOCS.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    machine = machine_lines(torch.get_num_threads())  # load average before the script itself adds load
    directory = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="tailwise-stream-bench-"))
    try:
        listing = directory / "train.txt"
        t0 = time.perf_counter()
        if not listing.is_file():
            log(f"generating about {args.images} JPEGs in {args.classes} classes under {directory} ...")
            make_dataset(directory, args.classes, args.images, args.ratio, args.seed)
        gen_s = time.perf_counter() - t0
        split = read_split(listing, 224)
        counts = np.bincount(split.labels.numpy()).tolist()
        sizes = [split.path(i).stat().st_size for i in range(len(split))]
        dims = np.array([_dims(split.path(i)) for i in range(0, len(split), 10)])
        data = {"n": len(split), "counts": counts, "kb": np.mean(sizes) / 1024, "w": dims[:, 0].mean(),
                "h": dims[:, 1].mean(), "gen_s": gen_s}
        log(f"{len(split)} images, {data['kb']:.0f} KB on average")
        rows = []
        for mode in ("train", "eval"):
            for workers in args.workers:
                row = throughput(split, mode, workers, args.batch_size, args.warmup, args.batches, args.seed)
                log(f"{mode} workers={workers}: {row['rate']:.0f} images/s ({row['seconds']:.2f} s)")
                rows.append(row)
    finally:
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)
    section = report(args, machine, data, rows, time.perf_counter() - start)
    publish(section, args.write_docs)
    return 0


def _dims(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        return img.size


if __name__ == "__main__":
    sys.exit(main())
