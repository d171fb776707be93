"""Benchmark the framework overhead and the CPU's bf16 path: tailwise epochs vs a minimal hand-written loop, each in
fp32 and in bf16.

tailwise: one ``Trainer(cfg, out=tmpdir)`` per precision from the bundled recipe ``cifar10_lt_ir100_resnet32_ce``
(CIFAR-10-LT IR 100, ResNet-32, CE) with ``train.epochs=1`` and ``train.precision=<p>``; timed:
``trainer.train_epoch(0)`` (the real loop: method hooks, autocast and GradScaler wrappers, NaN check, loss/accuracy
accounting, the trainer's ``BatchLoader``), and separately the ``trainer.evaluate("val")`` and the per-epoch
checkpoint that ``fit`` adds to every epoch.

hand: the same uint8 tensors (``trainer.data.train``), ResNet-32 built with the same seed, batch 128, the same
augmentation (``tailwise.data.loader.random_crop`` / ``random_flip`` with generators seeded as the trainer's
loader seeds them, so both see the same batches), the same normalisation, SGD with the recipe's epoch-0
hyperparameters, channels_last model and input; the loop is gather -> crop -> flip -> normalise -> forward ->
CE -> zero_grad -> backward -> step, plus a running loss sum; in bf16 the forward and the loss run under
``torch.autocast(device_type="cpu", dtype=torch.bfloat16)``, as the trainer's step does.

Order, per repetition: for each precision, hand then tailwise (``--reps`` repetitions); every repetition starts
from the same initial weights with a fresh optimizer (hand: a freshly built model; tailwise: the trainer's model
reset to its initial state dict). Acceptance: median(tailwise) / median(hand) <= 1.10 in every precision. The
bf16 speed-up is median(fp32) / median(bf16) of the same loop.

Usage (repository root)::

    PYTHONPATH=src .venv/bin/python benchmarks/bench_overhead.py [--write-docs] [--threads 1] [--reps 3] \
        [--precisions fp32,bf16]

Prints a Markdown section; ``--write-docs`` replaces the section of the same heading in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import copy
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
from tailwise.errors import ConfigError  # noqa: E402
from tailwise.data.loader import _generator, random_crop, random_flip  # noqa: E402
from tailwise.engine.trainer import Trainer  # noqa: E402
from tailwise.models import build_model  # noqa: E402

SECTION = "## Framework overhead and the bf16 CPU path: tailwise vs a hand-written loop"
PRECISIONS = ("fp32", "bf16")
RECIPE = "cifar10_lt_ir100_resnet32_ce"
MAX_RATIO = 1.10


# ------------------------------------------------------------------------------------------------ hand loop
class HandLoop:
    """A minimal PyTorch training epoch over in-memory uint8 tensors."""

    def __init__(self, images, labels, num_classes, mean, std, seed, batch_size, lr, momentum, weight_decay,
                 nesterov, precision="fp32"):
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        self.images, self.labels, self.num_classes = images, labels, num_classes
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.seed, self.batch_size = seed, batch_size
        self.sgd = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)

    def fresh_model(self):
        torch.manual_seed(self.seed)
        model = build_model("resnet32", self.num_classes).to(memory_format=torch.channels_last)
        return model, torch.optim.SGD(model.parameters(), **self.sgd)

    def normalise(self, x):
        return ((x.float() - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def epoch(self, model, opt, max_batches: int | None = None) -> float:
        model.train()
        n = len(self.labels)
        perm = torch.randperm(n, generator=_generator(self.seed, 0, 0))  # the trainer's sampler/augment seeds
        g = _generator(self.seed, 0, 1)
        total = 0.0
        for b, start in enumerate(range(0, n, self.batch_size)):
            if max_batches is not None and b >= max_batches:
                break
            idx = perm[start:start + self.batch_size]
            x = self.normalise(random_flip(random_crop(self.images[idx], 4, g), g))
            y = self.labels[idx]
            with torch.autocast("cpu", dtype=self.autocast_dtype or torch.bfloat16,
                                enabled=self.autocast_dtype is not None):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(y)
        return total / n

    @torch.no_grad()
    def evaluate(self, model, images, labels, batch_size=512) -> float:
        model.eval()
        correct = 0
        for start in range(0, len(labels), batch_size):
            x = self.normalise(images[start:start + batch_size])
            with torch.autocast("cpu", dtype=self.autocast_dtype or torch.bfloat16,
                                enabled=self.autocast_dtype is not None):
                logits = model(x)
            correct += int((logits.argmax(1) == labels[start:start + batch_size]).sum())
        return 100.0 * correct / len(labels)


# ----------------------------------------------------------------------------------------------------- bench
def load_recipe(args, precision: str):
    overrides = [f"data.root={args.data}", "train.epochs=1", f"run.seed={args.seed}", "run.device=cpu",
                 f"run.threads={args.threads}", "run.progress=log", "run.tensorboard=false",
                 f"train.precision={precision}"]
    if args.cache_dir:
        overrides.append(f"data.cache_dir={args.cache_dir}")
    try:
        return load_config(RECIPE, overrides)
    except ConfigError as exc:  # a config check may reject epochs=1 with the recipe's 5 warm-up epochs
        if "warmup" not in str(exc):
            raise
        log(f"config refused train.epochs=1 ({exc}); adding train.warmup_epochs=0")
        return load_config(RECIPE, overrides + ["train.warmup_epochs=0"])


class Side:
    """One precision's pair of loops: a Trainer and the hand-written loop over the Trainer's own data."""

    def __init__(self, args, precision: str, out: Path):
        self.precision = precision
        self.cfg = cfg = load_recipe(args, precision)
        log(f"building the {precision} Trainer (data from the cache, model, loss, loader) ...")
        self.init_s, self.trainer = timed(lambda: Trainer(cfg, out=out / precision,
                                                           log=lambda msg: log("  trainer: " + msg)))
        trainer, t = self.trainer, cfg.train
        self.lr = trainer.schedule(0)
        self.hand = HandLoop(trainer.data.train.images, trainer.data.train.labels, trainer.data.num_classes,
                             trainer.mean, trainer.std, cfg.run.seed, t.batch_size, self.lr, t.momentum,
                             t.weight_decay, t.nesterov, precision=trainer.precision)
        self.init_state = copy.deepcopy(trainer.ctx.model.state_dict())
        probe, _ = self.hand.fresh_model()
        self.same_init = all(torch.equal(a, b) for a, b in zip(probe.state_dict().values(),
                                                                self.init_state.values()))
        self.times = {"hand": [], "tailwise": [], "evaluate": [], "hand_eval": [], "checkpoint": []}
        self.losses = {"hand": [], "tailwise": []}

    def warm_up(self):
        """Untimed: oneDNN primitives for the training and the evaluation shapes, the allocator."""
        data, t = self.trainer.data, self.cfg.train
        model, opt = self.hand.fresh_model()
        self.hand.epoch(model, opt, max_batches=3)
        self.hand.evaluate(model, data.val.images, data.val.labels, t.eval_batch_size)
        self.trainer.evaluate("val")

    def reset_trainer(self):
        trainer = self.trainer
        trainer.ctx.model.load_state_dict(self.init_state)
        trainer.ctx.optimizer = trainer.make_optimizer(trainer.ctx.model)
        trainer.ctx.step = 0
        trainer.train_loader.load_state_dict({"epoch": 0, "position": 0, "aug_state": None})

    def repetition(self, r: int, reps: int):
        data, t, tm = self.trainer.data, self.cfg.train, self.times
        model, opt = self.hand.fresh_model()
        dt, loss = timed(lambda: self.hand.epoch(model, opt))
        tm["hand"].append(dt)
        self.losses["hand"].append(loss)
        dt_eval, _ = timed(lambda: self.hand.evaluate(model, data.val.images, data.val.labels, t.eval_batch_size))
        tm["hand_eval"].append(dt_eval)
        log(f"rep {r + 1}/{reps} {self.precision} hand epoch {dt:.2f}s (loss {loss:.4f}), val eval {dt_eval:.2f}s")

        self.reset_trainer()
        dt, record = timed(lambda: self.trainer.train_epoch(0))
        tm["tailwise"].append(dt)
        self.losses["tailwise"].append(record["train_loss"])
        dt_eval, _ = timed(lambda: self.trainer.evaluate("val"))
        tm["evaluate"].append(dt_eval)
        dt_ckpt, _ = timed(lambda: self.trainer.save(1))
        tm["checkpoint"].append(dt_ckpt)
        log(f"rep {r + 1}/{reps} {self.precision} tailwise train_epoch {dt:.2f}s (loss {record['train_loss']:.4f}), "
            f"evaluate('val') {dt_eval:.2f}s, checkpoint {dt_ckpt:.3f}s")


def run(args) -> list[Side]:
    out = Path(tempfile.mkdtemp(prefix="tailwise-bench-run-"))
    try:
        sides = [Side(args, p, out) for p in args.precisions]
        log("warm-up ...")
        for side in sides:
            side.warm_up()
        for r in range(args.reps):
            for side in sides:
                side.repetition(r, args.reps)
        return sides
    finally:
        shutil.rmtree(out, ignore_errors=True)


def fmt_list(values, digits):
    return ", ".join(f"{v:.{digits}f}" for v in values)


def report(args, machine: list[str], sides: list[Side], total_s: float) -> tuple[str, bool]:
    med = {side.precision: {k: statistics.median(v) for k, v in side.times.items()} for side in sides}
    ratios = {p: m["tailwise"] / m["hand"] for p, m in med.items()}
    ok = all(r <= MAX_RATIO for r in ratios.values())
    first = sides[0]
    cfg = first.cfg
    lines = [
        *section_head(SECTION, "benchmarks/bench_overhead.py", args.argv),
        *machine,
        f"- Seed: {args.seed}; recipe `{RECIPE}` with `train.epochs=1`, data `{args.data}`; script runtime "
        f"{total_s / 60:.1f} min; load average at the end: {os.getloadavg()[0]:.2f}",
        f"- Method: per repetition, for each precision ({', '.join(args.precisions)}) the hand-written epoch then "
        f"tailwise's ({args.reps} repetitions), medians; every repetition starts from the same initial weights with a "
        "fresh optimizer (hand: model rebuilt with the seed; tailwise: the Trainer's model reset to its initial state "
        "dict, new optimizer, loader rewound to epoch 0). bf16 = `train.precision=bf16` for tailwise and "
        "`torch.autocast(\"cpu\", dtype=torch.bfloat16)` around the hand loop's forward and loss; weights, optimizer "
        f"and loss stay fp32. Torch is pinned to {args.threads} thread(s) (`--threads`, passed to tailwise as "
        "`run.threads`).",
        *([f"- Conditions: {args.note}"] if args.note else []),
        "",
        f"Workload: ResNet-32 on CIFAR-10-LT IR 100, {len(first.trainer.data.train):,} training images, "
        f"{len(first.trainer.train_loader)} batches of {cfg.train.batch_size}, crop 4 + flip, SGD lr {first.lr:g} "
        + (f"(epoch 0 of the {cfg.train.warmup_epochs}-epoch warm-up)" if cfg.train.warmup_epochs else "(no warm-up)")
        + f", momentum {cfg.train.momentum}, weight decay {cfg.train.weight_decay:g}, channels_last. "
        "Both loops draw the same batches and augmentations (same generator seeds) from the same initial weights "
        f"(initial weights identical: {'yes' if all(s.same_init for s in sides) else 'NO'}); mean training loss "
        + "; ".join(f"{s.precision} hand {statistics.median(s.losses['hand']):.4f} vs tailwise "
                    f"{statistics.median(s.losses['tailwise']):.4f}" for s in sides) + ".",
        "",
        "| Measurement | Precision | Seconds (median) | Repetitions |",
        "|---|---|---:|---|",
    ]
    rows = [("Hand-written loop, one epoch", "hand", 2),
            ("tailwise `trainer.train_epoch(0)`", "tailwise", 2),
            (f"tailwise `trainer.evaluate(\"val\")` ({len(first.trainer.data.val)} images, batch "
             f"{cfg.train.eval_batch_size}; `fit` runs it every epoch)", "evaluate", 3),
            (f"Hand-written val evaluation (same images, batch {cfg.train.eval_batch_size}, accuracy only)",
             "hand_eval", 3),
            ("tailwise checkpoint `trainer.save()` (`fit` writes it every epoch)", "checkpoint", 3)]
    for label, key, digits in rows:
        for side in sides:
            lines.append(f"| {label} | {side.precision} | {med[side.precision][key]:.{digits}f} | "
                         f"{fmt_list(side.times[key], digits)} |")
    for side in sides:
        lines.append(f"| Trainer construction (data from the warm cache, model, mean/std, MACs; once per run) | "
                     f"{side.precision} | {side.init_s:.2f} | 1 |")
    lines.append("")
    for side in sides:
        p, tm = side.precision, side.times
        fit_epoch = med[p]["tailwise"] + med[p]["evaluate"] + med[p]["checkpoint"]
        lines.append(f"- {p}: ratio tailwise `train_epoch` / hand loop (medians) **{ratios[p]:.3f}**; per pair: "
                     f"{fmt_list([b / a for a, b in zip(tm['hand'], tm['tailwise'])], 3)}; a whole `fit` epoch "
                     f"(train_epoch + evaluate + checkpoint) {fit_epoch:.2f} s.")
    if "fp32" in med and "bf16" in med:
        speed = {k: med["fp32"][k] / med["bf16"][k] for k in ("hand", "tailwise", "evaluate")}
        lines.append(f"- bf16 speed-up (fp32 / bf16 medians): hand-written epoch **{speed['hand']:.2f}x**, tailwise "
                     f"epoch **{speed['tailwise']:.2f}x**, evaluation {speed['evaluate']:.2f}x.")
    lines += ["", f"Acceptance (tailwise / hand <= {MAX_RATIO:.2f} in every precision): "
              f"**{'PASS' if ok else 'FAIL'}**.", ""]
    return "\n".join(lines), ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="CIFAR-10 JPEG tree archive (default: %(default)s)")
    parser.add_argument("--cache-dir", default=None, help="tailwise cache dir (default: tailwise's own)")
    parser.add_argument("--reps", type=int, default=3, help="epochs per side (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both loops (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precisions", default=",".join(PRECISIONS),
                        help="comma-separated train.precision values to time (default: %(default)s)")
    parser.add_argument("--note", default="", help="a sentence on the measuring conditions for the report")
    parser.add_argument("--write-docs", action="store_true", help=f"replace the section in {DOCS.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not args.precisions or any(p not in PRECISIONS for p in args.precisions):
        parser.error(f"--precisions: choose from {', '.join(PRECISIONS)} (got {args.precisions})")
    if not Path(args.data).is_file():
        parser.error(f"{args.data} not found")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    machine = machine_lines(args.threads)
    sides = run(args)
    section, ok = report(args, machine, sides, time.perf_counter() - start)
    publish(section, args.write_docs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
