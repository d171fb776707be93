"""The ``tailwise`` command.

    tailwise run RECIPE.yaml [key=value ...] [--out DIR] [--resume DIR] [--branch-from CHECKPOINT]
    tailwise demo [--out DIR] [--epochs N] [--precision fp32|bf16|auto] [--seed N]
    tailwise eval RUN_DIR [--json]
    tailwise data inspect [RECIPE.yaml] [key=value ...] [--json]
    tailwise data verify RECIPE.yaml [key=value ...] | --list FILE [--list FILE ...] --root DIR  [--workers N]
    tailwise methods [NAME]
    tailwise recipes
    tailwise export RUN_DIR --onnx
    tailwise bench-latency RUN_DIR [--batch 1 128]
    tailwise report RUN_DIR... [--baseline RUN_DIR] [--diff RUN_DIR REF_RUN_DIR]... [--out DIR]

User errors (bad config, missing or corrupt data, NaN loss) print one message and exit with code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import TailwiseError

def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _split_recipe(args: list[str]) -> tuple[str | None, list[str]]:
    """The first positional argument without '=' is the recipe; the rest are key=value overrides."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _table(rows: list[tuple[str, dict]]) -> str:
    """Per-group accuracy and cost of one or more runs (``(label, result.json)`` pairs), one line each."""
    groups = rows[0][1]["groups"]
    rule = "" if groups.get("rule", "thresholds") == "thresholds" else f"  ({groups['rule']}: a threshold group was empty)"
    width = max(10, *(len(label) + 2 for label, _ in rows))
    lines = [f"{'':{width}s}{'many':>8s}{'medium':>8s}{'few':>8s}{'all':>8s}{'balanced':>10s}{'params':>11s}{'MMACs':>8s}"
             f"{'F %':>7s}",
             f"{'classes':{width}s}{groups['many']:>8d}{groups['medium']:>8d}{groups['few']:>8d}{rule}"]

    def fmt(v, w=8):
        return f"{v:{w}.2f}" if v is not None else f"{'-':>{w}s}"

    for label, result in rows:
        acc, cost = result["accuracy"], result["cost"]
        lines.append(f"{label:{width}s}{fmt(acc['many'])}{fmt(acc['medium'])}{fmt(acc['few'])}{fmt(acc['all'])}"
                     f"{fmt(acc['balanced'], 10)}{cost['params']:>11,d}{cost['macs'] / 1e6:>8.2f}{cost['F']:>7.1f}")
    return "\n".join(lines)


def cmd_run(ns) -> int:
    from . import run

    recipe, overrides = _split_recipe(ns.args)
    if ns.resume:
        if not (Path(ns.resume) / "config.yaml").is_file():
            raise TailwiseError(f"--resume {ns.resume}: no config.yaml there, not a tailwise run directory")
        from .config import RESUME_OVERRIDES  # a checkpoint records the rest (tailwise.engine.rundir)

        if recipe or any(o.split("=", 1)[0] not in RESUME_OVERRIDES for o in overrides):
            raise TailwiseError("--resume continues a run with its saved config.yaml; do not pass a recipe or "
                                f"overrides other than {', '.join(RESUME_OVERRIDES)} (they do not change results)")
    elif recipe is None:
        raise TailwiseError("tailwise run needs a recipe (a YAML file or a name from `tailwise recipes`)")
    if ns.resume and ns.branch_from:
        raise TailwiseError("--branch-from starts a new run; it cannot be combined with --resume")
    from .engine.dist import launched

    rank, world = launched()  # under torchrun: --out is required (run() says so), rank 0 prints
    out = ns.resume or ns.out or (None if world > 1 else f"runs/{Path(recipe).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    result = run(recipe, overrides, out, resume=bool(ns.resume), branch_from=ns.branch_from)
    if rank == 0:
        print(_table([("top-1 %", result)]))
        print(f"run directory: {out}")
    return 0


def cmd_demo(ns) -> int:
    from . import run
    from .demo import demo_runs

    out = Path(ns.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    _log("tailwise demo: ResNet-20 on a small real CIFAR-10-LT subset shipped with the package, dense and pruned "
         "with LTAP (under 3 minutes on 2 CPU cores)")
    rows = []
    for label, overrides, directory, branch_from in demo_runs(out, ns.epochs, ns.precision, ns.seed):
        result = run("demo", overrides, directory, branch_from=branch_from)
        rows.append((label, result))
    print(_table(rows))
    print(_noise_note(rows[0][1]["dataset"]))
    print(f"run directories: {out / 'dense'} and {out / 'ltap'}  (re-evaluate with `tailwise eval DIR`; load with "
          f"tailwise.load_model(DIR); compare with `tailwise report {out / 'dense'} {out / 'ltap'}`)")
    return 0


def _noise_note(dataset: dict) -> str:
    """How far the demo's test accuracies can move: one test image's worth of a class's accuracy."""
    per_class = dataset["test_size"] / dataset["num_classes"]
    return (f"how much these numbers can move: the test split has {dataset['test_size']} images, about "
            f"{per_class:.0f} images per class, so one image is {100 / per_class:.1f} points of a class's accuracy; "
            "with one short run per column, differences of a few points between columns are within noise")


def cmd_eval(ns) -> int:
    from .engine.log import format_groups
    from .eval.evaluate import evaluate_run

    acc = evaluate_run(Path(ns.run_dir))
    if ns.json:
        print(json.dumps(acc, indent=2))
    else:
        print(format_groups(acc, balanced=True))
    return 0


def cmd_export(ns) -> int:
    from .export import export_onnx

    if not ns.onnx:
        raise TailwiseError("choose an export format: --onnx")
    report = export_onnx(ns.run_dir, ns.out)
    check = (f"checked against onnxruntime (max abs diff {report['max_abs_diff']:.2e})" if report["checked"]
             else "not checked: onnxruntime is not installed")
    print(f"wrote {report['path']}; {check}")
    return 0


def cmd_bench_latency(ns) -> int:
    from .compress.cost import latency_report

    report = latency_report(Path(ns.run_dir), ns.batch, ns.repeats, ns.channels_last)
    if ns.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"latency on {report['machine']} ({report['threads']} threads, {report['memory_format']}), median of "
          f"{ns.repeats} interleaved runs, ms per batch")
    print(f"{'batch':>6s} {'dense':>10s} {'deployed':>10s} {'speed-up':>9s}")
    for row in report["rows"]:
        print(f"{row['batch']:>6d} {row['dense_ms']:>10.2f} {row['deployed_ms']:>10.2f} {row['speedup']:>8.2f}x")
    return 0


def cmd_report(ns) -> int:
    from .eval.report import build_report

    out = Path(ns.out or f"report-{time.strftime('%Y%m%d-%H%M%S')}")
    report = build_report(ns.run_dirs, out, ns.baseline, warn=lambda msg: _log(f"warning: {msg}"), diffs=ns.diff)
    print((out / "table.md").read_text(), end="")
    print(f"report: {report['files']['report.html']} ({len(report['runs'])} runs, {len(report['plots'])} plots; "
          f"also table.csv, report.md, plots/)")
    return 0


def cmd_data_inspect(ns) -> int:
    from .config import load_config
    from .data.dataset import build_data

    recipe, overrides = _split_recipe(ns.args)
    cfg = load_config(recipe, overrides)
    data = build_data(cfg.data, _log)
    info = {**data.info, "groups": data.groups.to_json(), "val_size": len(data.val) if data.val is not None else None}
    if ns.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"dataset {info['name']} from {info['source']}: {info['num_classes']} classes, {info['train_size']} training "
          f"images (long-tailed subset {info['subset_size']}, imbalance ratio {info['imbalance_ratio']}), "
          f"{info['test_size']} test images, validation: {info['val']['source']} ({info['val']['size']} images)")
    print(f"index_sha256: {info['index_sha256']}")
    g = info["groups"]
    print(f"groups ({g['rule']}, many > {g['thresholds'][0]}, few < {g['thresholds'][1]}): "
          f"many {g['many']}, medium {g['medium']}, few {g['few']}")
    width = max(len(c) for c in info["classes"])
    for c, (name, n) in enumerate(zip(info["classes"], info["class_counts"])):
        print(f"  {c:4d} {name:{width}s} {n:7d}  {data.groups.membership[c]}")
    return 0


def cmd_data_verify(ns) -> int:
    """Check every entry of a list-file dataset; exit 0 when clean, 2 when problems were found."""
    from .data.verify import verify_lists

    recipe, overrides = _split_recipe(ns.args)
    if ns.list:
        if recipe or overrides:
            raise TailwiseError("data verify takes either a recipe (and key=value overrides) or --list/--root, not both")
        if not ns.root:
            raise TailwiseError("data verify --list FILE needs --root DIR (the image root the list's paths are "
                                "relative to)")
        lists, root, num_classes, workers = ns.list, ns.root, ns.num_classes, 0
    else:
        from .config import load_config

        if recipe is None:
            raise TailwiseError("data verify needs a recipe of a list-file dataset, or --list FILE --root DIR")
        cfg = load_config(recipe, overrides)
        d = cfg.data
        if d.name != "listfile":
            raise TailwiseError(f"data verify checks list-file datasets (data.name=listfile); {recipe} has "
                                f"data.name={d.name}")
        lists = [p for p in (d.train_list, d.val_list, d.test_list) if p]
        if not lists:
            raise TailwiseError(f"{recipe} sets no data.train_list / val_list / test_list")
        root, num_classes, workers = d.root, ns.num_classes or d.num_classes, cfg.run.workers
    workers = ns.workers if ns.workers is not None else workers
    _log(f"data verify: checking {', '.join(map(str, lists))} against {root} with {max(workers, 1)} process(es)")
    report = verify_lists(lists, root, num_classes, workers, _verify_progress())
    for line in report.details(ns.show):
        print(line)
    print(report.summary())
    return 0 if report.ok else 2


def _verify_progress():
    """A progress callback: a bar on a terminal, otherwise a line about every 10% of the images."""
    from .engine.log import progress_mode

    if progress_mode("auto") == "bar":
        from tqdm import tqdm

        bar = None

        def update(done, total):
            nonlocal bar
            bar = bar or tqdm(total=total, desc="images", unit="img", leave=False, dynamic_ncols=True)
            bar.update(done - bar.n)
            if done == total:
                bar.close()
        return update
    reported = [0]

    def log_line(done, total):
        if done == total or done - reported[0] >= max(1, total // 10):
            reported[0] = done
            _log(f"  checked {done}/{total} images")
    return log_line


def cmd_recipes(ns) -> int:
    from .recipes import RECIPE_DIR, list_recipes

    for name in list_recipes():
        text = (RECIPE_DIR / f"{name}.yaml").read_text()
        title = text.splitlines()[0].lstrip("# ").strip() if text.startswith("#") else ""
        print(f"{name:36s} {title}")
    return 0


def cmd_methods(ns) -> int:
    import inspect
    import sys

    from .options import field_table
    from .methods import list_methods, method_class

    if ns.name is None:
        for name in list_methods():
            print(f"{name:12s} {method_class(name).summary}")
        print("\n`tailwise methods NAME` prints a method's documentation and every method.* option.")
        return 0
    cls = method_class(ns.name)
    print(f"{cls.name}: {cls.summary}\n")
    if cls is not method_class("none"):  # the standalone object's module (if it has its own), then the adapter's
        for module in dict.fromkeys([getattr(cls, "Pruner", cls).__module__, cls.__module__]):
            print(inspect.getdoc(sys.modules[module]), end="\n\n")
    table = field_table(cls.Options)
    if not table:
        print("No options.")
        return 0
    rows = [("key", "type", "default", "allowed"), *(("method." + r[0], *r[1:]) for r in table)]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    print("Options (method.KEY=VALUE on the command line, or under `method:` in a recipe):")
    for r in rows:
        print(("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3]).rstrip())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tailwise", description="Long-tailed recognition with parameter-space rebalancing")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train and evaluate one run from a recipe")
    p.add_argument("args", nargs="*", help="RECIPE.yaml (or bundled name) then key=value overrides, e.g. train.epochs=20")
    p.add_argument("--out", help="run directory (default runs/<recipe>-<timestamp>)")
    p.add_argument("--resume", metavar="DIR", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--branch-from", metavar="CHECKPOINT",
                   help="start from a plain run's end-of-epoch checkpoint (same data/model/loss/train/seed) instead of "
                        "epoch 0; allowed up to the method's first active epoch (pruning: its first scoring window)")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("demo", help="train on the embedded CIFAR-10-LT demo data and print the per-group table")
    p.add_argument("--out", help="run directory (default runs/demo-<timestamp>)")
    p.add_argument("--epochs", type=int, default=None, help="override the demo's number of epochs")
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default=None,
                   help="override the demo's train.precision")
    p.add_argument("--seed", type=int, default=None, help="override the demo's run.seed (default 0)")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("eval", help="re-evaluate a finished run's saved model on its test split")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="print the accuracy block as JSON")
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("export", help="export a run's deployed model (ONNX, checked against onnxruntime)")
    p.add_argument("run_dir")
    p.add_argument("--onnx", action="store_true", help="write model/model.onnx")
    p.add_argument("--out", help="output file (default RUN_DIR/model/model.onnx)")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("bench-latency", help="dense vs deployed (compressed) model latency on this machine")
    p.add_argument("run_dir")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 128])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--channels-last", action="store_true", help="time both models in NHWC memory format")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_bench_latency)
    p = sub.add_parser("report", help="paper-layout table (Markdown, CSV), plots and an HTML page of finished runs",
                       description="Runs that differ only in run.seed form one row: mean ± sample sd over the seeds "
                       "and n; table.csv keeps every run. C, C/F and paired differences compare each seed with the "
                       "baseline's run of the same seed. Runs that would share a row but differ in other config keys "
                       "are refused.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--baseline", metavar="RUN_DIR", help="the row (this run and its other seeds among RUN_DIRs) that C "
                   "and C/F are relative to (default: the dense row of the same loss and dataset)")
    p.add_argument("--diff", nargs=2, action="append", default=[], metavar=("RUN_DIR", "REF_RUN_DIR"),
                   help="also show the paired differences (Head/Medium/Tail/All, per seed, then mean and min…max) of "
                   "the row holding RUN_DIR minus the row holding REF_RUN_DIR (any seed of each); repeatable. Every "
                   "row's difference to its baseline is always shown")
    p.add_argument("--out", help="report directory (default report-<timestamp>)")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("data", help="dataset tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("inspect", help="class counts, shot groups and index_sha256 of a recipe's data")
    q.add_argument("args", nargs="*", help="[RECIPE.yaml] then data.* overrides, e.g. data.name=cifar10-lt data.root=PATH")
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_data_inspect)
    q = dsub.add_parser("verify", help="check every line and image of a list-file dataset (missing, corrupt, "
                        "malformed, label out of range); exit 2 when problems are found")
    q.add_argument("args", nargs="*", help="RECIPE.yaml then key=value overrides, e.g. data.root=PATH")
    q.add_argument("--list", action="append", metavar="FILE", help="a list file to check instead of a recipe's "
                   "(repeatable; the first is the training list, which defines the label range)")
    q.add_argument("--root", metavar="DIR", help="the image root of --list")
    q.add_argument("--num-classes", type=int, help="labels must be < this (default: data.num_classes, else one more "
                   "than the largest training label)")
    q.add_argument("--workers", type=int, help="processes checking images (default: run.workers; 0 with --list)")
    q.add_argument("--show", type=int, default=5, help="offending entries shown per problem kind (default 5)")
    q.set_defaults(fn=cmd_data_verify)
    p = sub.add_parser("methods", help="list the methods, or print one method's documentation and options")
    p.add_argument("name", nargs="?", help="a method name (see the list)")
    p.set_defaults(fn=cmd_methods)
    p = sub.add_parser("recipes", help="list the bundled recipes")
    p.set_defaults(fn=cmd_recipes)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    from .engine.trainer import Interrupted

    try:
        return ns.fn(ns)
    except TailwiseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(str(exc), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`
        return 0
    finally:
        tdist = sys.modules.get("torch.distributed")
        if tdist is not None and tdist.is_available() and tdist.is_initialized():  # a torchrun job: leave cleanly
            tdist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
