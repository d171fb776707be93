"""Benchmark the data pipeline: the decode-once uint8 image cache and the in-memory batch loader.

a. Image cache: load the CIFAR-10 training split (50k JPEGs) from the tar through ``cached_split`` +
   ``read_image_folder`` into a fresh temporary cache directory (cold: decode + store), then again (warm: from
   the cache; 3 times, median). Acceptance: warm >= 10x faster than cold.
b. Loader throughput on CIFAR-10-LT IR 100 (``build_data`` with the data section of the bundled recipe
   ``cifar10_lt_ir100_resnet32_ce``): one full augmented pass of the trainer's ``BatchLoader`` (instance sampler,
   crop padding 4 + flip, batch 128, normalisation, channels_last) without a model, vs one ResNet-32 training
   pass over the same loader (forward + backward + SGD step, CE loss, channels_last). Repetitions are
   interleaved (loader, cutout, RandAugment, training, loader, ...) and medians reported.
   Acceptance: loader pass < 5% of the training pass. Cutout / RandAugment loader passes are extra rows.

Usage (repository root)::

    PYTHONPATH=src .venv/bin/python benchmarks/bench_data.py [--write-docs] [--threads 1] [--reps 3]

Prints a Markdown section; ``--write-docs`` replaces the section of the same heading in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import DEFAULT_DATA, DOCS, log, machine_lines, publish, section_head, timed  # noqa: E402
from tailwise.config import load_config  # noqa: E402
from tailwise.data import sources  # noqa: E402
from tailwise.data.cache import _load, cached_split, source_fingerprint  # noqa: E402
from tailwise.data.dataset import build_data  # noqa: E402
from tailwise.data.loader import Augment, BatchLoader, Sampler  # noqa: E402
from tailwise.models import build_model  # noqa: E402

SECTION = "## Data pipeline: image cache and loader throughput"
RECIPE = "cifar10_lt_ir100_resnet32_ce"
CACHE_MIN_SPEEDUP = 10.0
LOADER_MAX_FRACTION = 0.05


# ---------------------------------------------------------------------------------------------------- a. cache
def bench_cache(data_root: str, cache_dir: Path, reps: int) -> dict:
    options = {"reader": "imagefolder", "split": "train", "size": None, "classes": None}  # as build_data uses

    def load():
        return cached_split(data_root, options, lambda: sources.read_image_folder(data_root, "train"), cache_dir,
                            log=lambda msg: None)

    log("cache: cold load (decode 50k JPEGs + store) ...")
    cold, split = timed(load)
    shape, checksum = split.images.shape, int(split.images[:, :, ::7, ::7].sum())
    del split
    log(f"cache: cold {cold:.2f}s, images {tuple(shape)}")
    warm = []
    for r in range(reps):
        t, again = timed(load)
        if again.images.shape != shape or int(again.images[:, :, ::7, ::7].sum()) != checksum:
            raise SystemExit("warm cache load returned different images than the cold load")
        del again
        warm.append(t)
        log(f"cache: warm {r + 1}/{reps} {t:.3f}s")
    # where the warm time goes: source fingerprint (SHA-256 of the archive) vs reading + verifying the entry
    entries = [p for p in cache_dir.iterdir() if p.is_dir() and (p / "manifest.json").is_file()]
    fp = statistics.median(timed(lambda: source_fingerprint(data_root))[0] for _ in range(reps))
    rd = statistics.median(timed(lambda: _load(entries[0]))[0] for _ in range(reps))
    nbytes = (entries[0] / "images.npy").stat().st_size
    return {"cold": cold, "warm": warm, "warm_median": statistics.median(warm), "fingerprint": fp, "entry_load": rd,
            "entry_mb": nbytes / 2**20, "n": shape[0]}


# --------------------------------------------------------------------------------------------------- b. loader
def rewind(loader: BatchLoader) -> None:
    """Start epoch 0 from its first batch. (``set_epoch(0)`` alone would resume an iteration that was left
    early, e.g. by the warm-up's ``break``: the loader is resumable by design.)"""
    loader.load_state_dict({"epoch": 0, "position": 0, "aug_state": None})


def loader_pass(loader: BatchLoader) -> tuple[int, int]:
    rewind(loader)
    n = batches = 0
    for x, y in loader:
        n += len(y)
        batches += 1
    return n, batches


def fresh_model(num_classes: int, seed: int, lr: float, momentum: float, weight_decay: float):
    """ResNet-32 built from ``seed``, channels_last, in train mode, with the recipe's SGD (as the trainer)."""
    torch.manual_seed(seed)
    model = build_model("resnet32", num_classes).to(memory_format=torch.channels_last)
    model.train()
    return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def training_pass(loader: BatchLoader, model, opt) -> float:
    """One epoch over ``loader``: forward + CE + backward + SGD step per batch. Returns the mean loss."""
    rewind(loader)
    total = seen = 0.0
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(y)
        seen += len(y)
    return total / seen


def bench_loader(data_root: str, cache_dir: Path, reps: int, seed: int) -> dict:
    cfg = load_config(RECIPE, [f"data.root={data_root}", f"data.cache_dir={cache_dir}", f"run.seed={seed}"])
    log("loader: build_data (train split from the warm cache, test split decoded once) ...")
    t_build, data = timed(lambda: build_data(cfg.data, log=lambda msg: None))
    train, t = data.train, cfg.train
    mean = (train.images.float().mean(dim=(0, 2, 3)) / 255).tolist()  # as the trainer computes them
    std = (train.images.float().std(dim=(0, 2, 3)) / 255).tolist()

    def make(cutout=0, policy="none"):
        return BatchLoader(train.images, train.labels, t.batch_size, mean, std,
                           sampler=Sampler(train.labels, "instance", seed, t.batch_size),
                           augment=Augment(cfg.data.crop_padding, cfg.data.flip, cutout, policy),
                           device="cpu", channels_last=t.channels_last)

    loaders = {"base": make(), "cutout": make(cutout=16), "randaugment": make(policy="randaugment")}
    lr = t.lr / t.warmup_epochs if t.warmup_epochs else t.lr  # epoch 0 of the recipe's warm-up
    # warm-up (untimed): a few batches of every path, so one-time costs (oneDNN primitives, allocator, lazy
    # torchvision imports) are not charged to the first timed repetition
    model, _ = fresh_model(data.num_classes, seed, lr, t.momentum, t.weight_decay)
    for key in loaders:
        for i, (x, y) in enumerate(loaders[key]):
            if key == "base":
                F.cross_entropy(model(x), y).backward()
            if i == 2:
                break
    times: dict[str, list[float]] = {"base": [], "cutout": [], "randaugment": [], "train": []}
    losses = []
    for r in range(reps):
        for key in ("base", "cutout", "randaugment"):
            dt, (n, nb) = timed(lambda: loader_pass(loaders[key]))
            if n != len(train):
                raise SystemExit(f"{key} loader pass delivered {n} images, expected {len(train)}")
            times[key].append(dt)
            log(f"loader: rep {r + 1}/{reps} {key} pass {dt:.3f}s ({n} images, {nb} batches)")
        model, opt = fresh_model(data.num_classes, seed, lr, t.momentum, t.weight_decay)
        dt, loss = timed(lambda: training_pass(loaders["base"], model, opt))
        times["train"].append(dt)
        losses.append(loss)
        log(f"loader: rep {r + 1}/{reps} training pass {dt:.2f}s (mean loss {loss:.4f})")
    return {"times": times, "n": len(train), "batches": len(loaders["base"]), "build": t_build, "losses": losses,
            "batch_size": t.batch_size, "lr": lr}


# ------------------------------------------------------------------------------------------------------ report
def fmt_list(values: list[float], digits: int) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def report(args, machine: list[str], cache: dict, load: dict, total_s: float) -> tuple[str, bool]:
    speedup = cache["cold"] / cache["warm_median"]
    cache_ok = speedup >= CACHE_MIN_SPEEDUP
    med = {k: statistics.median(v) for k, v in load["times"].items()}
    frac = med["base"] / med["train"]
    loader_ok = frac < LOADER_MAX_FRACTION
    n = load["n"]
    lines = [
        *section_head(SECTION, "benchmarks/bench_data.py", args.argv),
        *machine,
        f"- Seed: {args.seed}; data: `{args.data}` (CIFAR-10 JPEG tree, 50k train / 10k test); script runtime "
        f"{total_s / 60:.1f} min; load average at the end: {os.getloadavg()[0]:.2f}",
        "- Method: every repetition is interleaved (loader, Cutout, RandAugment, training, loader, ...) and medians "
        f"are reported; torch is pinned to {args.threads} thread(s) (`--threads`) for every measurement.",
        *([f"- Conditions: {args.note}"] if args.note else []),
        "",
        "### a. Image cache (`cached_split` + `read_image_folder`, CIFAR-10 train split, 50,000 images)",
        "",
        "| Load | Seconds | Notes |",
        "|---|---:|---|",
        f"| Cold (fresh cache dir: read tar, decode JPEGs, store entry) | {cache['cold']:.2f} | once |",
        f"| Warm (from the cache entry) | {cache['warm_median']:.3f} | median of {len(cache['warm'])}: "
        f"{fmt_list(cache['warm'], 3)} |",
        f"| &nbsp;&nbsp;of which: source fingerprint (SHA-256 of the {Path(args.data).stat().st_size / 1e6:.1f} MB "
        f"archive) | {cache['fingerprint']:.3f} | "
        "median, measured separately |",
        f"| &nbsp;&nbsp;of which: read + verify entry ({cache['entry_mb']:.0f} MB `images.npy`, SHA-256 of both "
        f"arrays) | {cache['entry_load']:.3f} | median, measured separately |",
        "",
        f"Speed-up warm vs cold: **{speedup:.1f}x**. Acceptance (warm >= {CACHE_MIN_SPEEDUP:.0f}x faster than cold): "
        f"**{'PASS' if cache_ok else 'FAIL'}**. The warm load reads a file that was just written, so it is served "
        "from the page cache; a first run after a reboot additionally reads the entry from disk.",
        "",
        f"### b. Loader throughput (CIFAR-10-LT IR 100 training split, {n:,} images, {load['batches']} batches of "
        f"{load['batch_size']})",
        "",
        "Loader: the trainer's `BatchLoader` (instance sampler, `Augment(crop_padding=4, flip=True)`, normalisation, "
        "channels_last), iterated to the end without a model. Training pass: the same loader feeding ResNet-32 "
        f"(channels_last, CE, SGD momentum 0.9, weight decay 2e-4, lr {load['lr']:g}), forward + backward + step, "
        "fresh model per repetition.",
        "",
        "| Pass | Seconds (median) | Repetitions | Images/s | % of training pass |",
        "|---|---:|---|---:|---:|",
    ]
    rows = [("Loader: crop + flip (the recipe)", "base"), ("Loader: crop + flip + Cutout 16", "cutout"),
            ("Loader: RandAugment + crop + flip", "randaugment"), ("Training pass (loader + ResNet-32 step)", "train")]
    for label, key in rows:
        v = load["times"][key]
        lines.append(f"| {label} | {med[key]:.3f} | {fmt_list(v, 3)} | {n / med[key]:,.0f} | "
                     f"{100 * med[key] / med['train']:.1f}% |")
    lines += [
        "",
        f"Loader pass / training pass: **{100 * frac:.2f}%**. Acceptance (< {100 * LOADER_MAX_FRACTION:.0f}%): "
        f"**{'PASS' if loader_ok else 'FAIL'}**. Cutout and RandAugment rows are informational (no threshold); "
        "RandAugment runs torchvision's `v2.RandAugment` per image.",
        "",
    ]
    return "\n".join(lines), cache_ok and loader_ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="CIFAR-10 JPEG tree archive (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of warm loads and of loader/training "
                        "passes (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="", help="a sentence on the measuring conditions for the report")
    parser.add_argument("--write-docs", action="store_true", help=f"replace the section in {DOCS.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not Path(args.data).is_file():
        parser.error(f"{args.data} not found")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    machine = machine_lines(torch.get_num_threads())  # load average before the script itself adds load
    tmp = Path(tempfile.mkdtemp(prefix="tailwise-bench-cache-"))
    try:
        cache = bench_cache(args.data, tmp, args.reps)
        load = bench_loader(args.data, tmp, args.reps, args.seed)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    section, ok = report(args, machine, cache, load, time.perf_counter() - start)
    publish(section, args.write_docs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
