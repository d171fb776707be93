"""Benchmark the framework overhead: one tailwise training epoch vs a minimal hand-written PyTorch loop.

tailwise: ``Trainer(cfg, out=tmpdir)`` from the bundled recipe ``cifar10_lt_ir100_resnet32_ce`` (CIFAR-10-LT IR 100,
ResNet-32, CE) with ``train.epochs=1``; timed: ``trainer.train_epoch(0)`` (the real loop: method hooks, autocast
and GradScaler wrappers, NaN check, loss/accuracy accounting, the trainer's ``BatchLoader``), and separately the
``trainer.evaluate("val")`` and the per-epoch checkpoint that ``fit`` adds to every epoch.

hand: the same uint8 tensors (``trainer.data.train``), ResNet-32 built with the same seed, batch 128, the same
augmentation (``tailwise.data.loader.random_crop`` / ``random_flip`` with generators seeded as the trainer's
loader seeds them, so both see the same batches), the same normalisation, SGD with the recipe's epoch-0
hyperparameters, channels_last model and input; the loop is gather -> crop -> flip -> normalise -> forward ->
CE -> zero_grad -> backward -> step, plus a running loss sum.

Order: hand, tailwise, hand, tailwise, ... (``--reps`` each); every repetition starts from the same initial
weights with a fresh optimizer (hand: a freshly built model; tailwise: the trainer's model reset to its initial
state dict). Acceptance: median(tailwise) / median(hand) <= 1.10.

Usage (repository root)::

    PYTHONPATH=src .venv/bin/python benchmarks/bench_overhead.py [--write-docs] [--threads 1] [--reps 3]

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

SECTION = "## Framework overhead: tailwise run vs a hand-written loop"
RECIPE = "cifar10_lt_ir100_resnet32_ce"
MAX_RATIO = 1.10


# ------------------------------------------------------------------------------------------------ hand loop
class HandLoop:
    """A minimal PyTorch training epoch over in-memory uint8 tensors."""

    def __init__(self, images, labels, num_classes, mean, std, seed, batch_size, lr, momentum, weight_decay,
                 nesterov):
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
            correct += int((model(x).argmax(1) == labels[start:start + batch_size]).sum())
        return 100.0 * correct / len(labels)


# ----------------------------------------------------------------------------------------------------- bench
def run(args) -> dict:
    overrides = [f"data.root={args.data}", "train.epochs=1", f"run.seed={args.seed}", "run.device=cpu",
                 f"run.threads={args.threads}", "run.progress=log", "run.tensorboard=false"]
    if args.cache_dir:
        overrides.append(f"data.cache_dir={args.cache_dir}")
    try:
        cfg = load_config(RECIPE, overrides)
    except ConfigError as exc:  # a config check may reject epochs=1 with the recipe's 5 warm-up epochs
        if "warmup" not in str(exc):
            raise
        log(f"config refused train.epochs=1 ({exc}); adding train.warmup_epochs=0")
        overrides.append("train.warmup_epochs=0")
        cfg = load_config(RECIPE, overrides)
    out = Path(tempfile.mkdtemp(prefix="tailwise-bench-run-"))
    try:
        log("building the Trainer (data from the cache, model, loss, loader) ...")
        t_init, trainer = timed(lambda: Trainer(cfg, out=out, log=lambda msg: log("  trainer: " + msg)))
        t = cfg.train
        data = trainer.data
        lr = trainer.schedule(0)
        hand = HandLoop(data.train.images, data.train.labels, data.num_classes, trainer.mean, trainer.std,
                        cfg.run.seed, t.batch_size, lr, t.momentum, t.weight_decay, t.nesterov)
        init_state = copy.deepcopy(trainer.ctx.model.state_dict())
        probe, _ = hand.fresh_model()
        same_init = all(torch.equal(a, b) for a, b in zip(probe.state_dict().values(), init_state.values()))
        del probe

        def reset_trainer():
            trainer.ctx.model.load_state_dict(init_state)
            trainer.ctx.optimizer = trainer.make_optimizer(trainer.ctx.model)
            trainer.ctx.step = 0
            trainer.train_loader.load_state_dict({"epoch": 0, "position": 0, "aug_state": None})

        # warm-up (untimed): oneDNN primitives for the training and the evaluation shapes, allocator
        log("warm-up ...")
        model, opt = hand.fresh_model()
        hand.epoch(model, opt, max_batches=3)
        hand.evaluate(model, data.val.images, data.val.labels, t.eval_batch_size)
        trainer.evaluate("val")

        times = {"hand": [], "tailwise": [], "evaluate": [], "hand_eval": [], "checkpoint": []}
        losses = {"hand": [], "tailwise": []}
        for r in range(args.reps):
            model, opt = hand.fresh_model()
            dt, loss = timed(lambda: hand.epoch(model, opt))
            times["hand"].append(dt)
            losses["hand"].append(loss)
            dt_eval, _ = timed(lambda: hand.evaluate(model, data.val.images, data.val.labels, t.eval_batch_size))
            times["hand_eval"].append(dt_eval)
            log(f"rep {r + 1}/{args.reps} hand epoch {dt:.2f}s (loss {loss:.4f}), hand val eval {dt_eval:.2f}s")
            del model, opt

            reset_trainer()
            dt, record = timed(lambda: trainer.train_epoch(0))
            times["tailwise"].append(dt)
            losses["tailwise"].append(record["train_loss"])
            dt_eval, val = timed(lambda: trainer.evaluate("val"))
            times["evaluate"].append(dt_eval)
            dt_ckpt, _ = timed(lambda: trainer.save(1))
            times["checkpoint"].append(dt_ckpt)
            log(f"rep {r + 1}/{args.reps} tailwise train_epoch {dt:.2f}s (loss {record['train_loss']:.4f}), "
                f"evaluate('val') {dt_eval:.2f}s, checkpoint {dt_ckpt:.3f}s")
        return {"times": times, "losses": losses, "same_init": same_init, "init_s": t_init, "lr": lr,
                "n": len(data.train), "batches": len(trainer.train_loader), "val_n": len(data.val),
                "eval_batch": t.eval_batch_size, "cfg": cfg}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def fmt_list(values, digits):
    return ", ".join(f"{v:.{digits}f}" for v in values)


def report(args, machine: list[str], res: dict, total_s: float) -> tuple[str, bool]:
    tm = res["times"]
    med = {k: statistics.median(v) for k, v in tm.items()}
    ratio = med["tailwise"] / med["hand"]
    ok = ratio <= MAX_RATIO
    fit_epoch = med["tailwise"] + med["evaluate"] + med["checkpoint"]
    cfg = res["cfg"]
    lines = [
        *section_head(SECTION, "benchmarks/bench_overhead.py", args.argv),
        *machine,
        f"- Seed: {args.seed}; recipe `{RECIPE}` with `train.epochs=1`, data `{args.data}`; script runtime "
        f"{total_s / 60:.1f} min; load average at the end: {os.getloadavg()[0]:.2f}",
        f"- Method: interleaved hand, tailwise, hand, tailwise, ... ({args.reps} each), medians; every repetition "
        "starts from the same initial weights with a fresh optimizer (hand: model rebuilt with the seed; tailwise: "
        "the Trainer's model reset to its initial state dict, new optimizer, loader rewound to epoch 0). Torch is "
        f"pinned to {args.threads} thread(s) (`--threads`, passed to tailwise as `run.threads`).",
        *([f"- Conditions: {args.note}"] if args.note else []),
        "",
        f"Workload: ResNet-32 on CIFAR-10-LT IR 100, {res['n']:,} training images, {res['batches']} batches of "
        f"{cfg.train.batch_size}, crop 4 + flip, SGD lr {res['lr']:g} "
        + (f"(epoch 0 of the {cfg.train.warmup_epochs}-epoch warm-up)" if cfg.train.warmup_epochs else "(no warm-up)")
        + f", momentum {cfg.train.momentum}, weight decay {cfg.train.weight_decay:g}, channels_last. "
        "Both loops draw the same batches and augmentations (same generator seeds) from the same initial weights "
        f"(initial weights identical: {'yes' if res['same_init'] else 'NO'}); mean training loss hand "
        f"{statistics.median(res['losses']['hand']):.4f} vs tailwise {statistics.median(res['losses']['tailwise']):.4f}.",
        "",
        "| Measurement | Seconds (median) | Repetitions |",
        "|---|---:|---|",
        f"| Hand-written loop, one epoch | {med['hand']:.2f} | {fmt_list(tm['hand'], 2)} |",
        f"| tailwise `trainer.train_epoch(0)` | {med['tailwise']:.2f} | {fmt_list(tm['tailwise'], 2)} |",
        f"| tailwise `trainer.evaluate(\"val\")` ({res['val_n']} images, batch {res['eval_batch']}; `fit` runs it every "
        f"epoch) | {med['evaluate']:.3f} | {fmt_list(tm['evaluate'], 3)} |",
        f"| Hand-written val evaluation (same images, batch {res['eval_batch']}, accuracy only) | {med['hand_eval']:.3f} | "
        f"{fmt_list(tm['hand_eval'], 3)} |",
        f"| tailwise checkpoint `trainer.save()` (`fit` writes it every epoch) | {med['checkpoint']:.3f} | "
        f"{fmt_list(tm['checkpoint'], 3)} |",
        f"| Trainer construction (data from the warm cache, model, mean/std, MACs; once per run) | {res['init_s']:.2f} | 1 |",
        "",
        f"Ratio tailwise `train_epoch` / hand loop (medians): **{ratio:.3f}**; per interleaved pair: "
        f"{fmt_list([b / a for a, b in zip(tm['hand'], tm['tailwise'])], 3)}. Acceptance (<= {MAX_RATIO:.2f}): "
        f"**{'PASS' if ok else 'FAIL'}**.",
        "",
        f"For reference, a whole `fit` epoch (train_epoch + evaluate + checkpoint) is {fit_epoch:.2f} s, "
        f"{fit_epoch / med['hand']:.3f}x the hand-written training epoch (which evaluates nothing).",
        "",
    ]
    return "\n".join(lines), ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="CIFAR-10 JPEG tree archive (default: %(default)s)")
    parser.add_argument("--cache-dir", default=None, help="tailwise cache dir (default: tailwise's own)")
    parser.add_argument("--reps", type=int, default=3, help="epochs per side (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both loops (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="", help="a sentence on the measuring conditions for the report")
    parser.add_argument("--write-docs", action="store_true", help=f"replace the section in {DOCS.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not Path(args.data).is_file():
        parser.error(f"{args.data} not found")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    machine = machine_lines(args.threads)
    res = run(args)
    section, ok = report(args, machine, res, time.perf_counter() - start)
    publish(section, args.write_docs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
