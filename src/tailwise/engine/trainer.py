"""The one training loop. Methods change behaviour only through their hooks (:mod:`tailwise.methods`).

A run: build data, model, loss and method from the config; train ``train.epochs`` epochs with SGD, evaluating
the validation split after each; checkpoint atomically every epoch (and on SIGINT/SIGTERM, mid-epoch); at the
end evaluate the test split, let the method produce the deployable model, measure its cost and write
``result.json`` and ``model/``. ``--resume`` restores every piece of state, so on CPU a resumed run ends with the
same weights and metrics as an uninterrupted one.
"""
from __future__ import annotations

import copy
import math
import platform
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..compress.cost import count_macs, count_params
from ..config import Config
from ..data.dataset import build_data
from ..data.factory import make_train_loader
from ..data.stats import normalization
from ..deploy import _resize_to, save_model
from ..errors import TrainingError
from ..eval.evaluate import evaluate_split
from ..losses import build_loss
from ..methods import Method, build_method
from ..methods.context import MethodContext
from ..models import build_model
from .branch import copy_source_metrics, load_branch_point, read_branch_record, write_branch_record
from .dist import Dist, use_global_batchnorm
from ..atomic import atomic_write_json
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, seed_everything, set_rng_state
from .log import MetricsLog, format_groups, progress_mode
from .rundir import config_record, read_resume_checkpoint
from .precision import DTYPES, precision_warning, resolve_precision
from .schedule import LRSchedule


class Interrupted(Exception):
    """Raised after a checkpoint was saved because SIGINT/SIGTERM arrived."""


def _pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"run.device={setting} but CUDA is not available; use run.device=cpu or auto")
    return torch.device(setting)


def _versions() -> dict:
    from importlib.metadata import version  # torchvision's own import costs seconds (torch._dynamo)

    return {"tailwise": __version__, "torch": torch.__version__, "torchvision": version("torchvision"),
            "numpy": np.__version__, "python": platform.python_version(), "machine": platform.machine()}


class Trainer:
    """One run. Under torchrun, ``dist`` is this process's place in the job (:mod:`.dist`): every process
    builds the same run and trains on its share of each batch; only rank 0 logs and writes files."""

    def __init__(self, cfg: Config, out: str | Path, log: Callable[[str], None] | None = None,
                 dist: Dist | None = None, device: str | None = None):
        self.cfg, self.out = cfg, Path(out)
        self.dist = dist or Dist()
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        if not self.dist.is_main:
            self.log = lambda msg: None
        self._stop_signal: int | None = None
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.device = _pick_device(device or cfg.run.device)
        seed_everything(cfg.run.seed)
        if not self.dist.is_main:
            self.dist.barrier()  # rank 0 decodes first and fills the shared decode cache; the others then read it
        self.data = build_data(cfg.data, self.log)
        if self.dist.is_main:
            self.dist.barrier()
        t, d = cfg.train, self.data
        counts = d.class_counts
        self.loss_fn = build_loss(cfg.loss.name, counts, **cfg.loss.kwargs()).to(self.device)
        normed = cfg.model.normed_head if cfg.model.normed_head is not None else self.loss_fn.requires_normed_head
        model = build_model(cfg.model.name, d.num_classes, normed_head=normed)
        self.mean, self.std = normalization(d.train, cfg.data, self.log)  # data.mean/std, else of the data
        self.schedule = LRSchedule.from_config(t)
        self.precision = resolve_precision(t.precision, self.device)
        if (warning := precision_warning(self.precision, self.device)) is not None:
            self.log(warning)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.train_loader = make_train_loader(d.train, cfg, self.mean, self.std, self.device, self.dist.rank,
                                              self.dist.world)
        self.method: Method = build_method(cfg.method)
        self.ctx = MethodContext(cfg, model, None, self.loss_fn, d, self.device, self.train_loader, self.scaler,
                                 self.dist, self.mean, self.std, channels_last=t.channels_last, precision=DTYPES[self.precision],
                                 _rebuild_optimizer=self.rebuild_optimizer, _evaluate=self.evaluate,
                                 _place=self.place, _train_step=self.train_step,
                                 _log=self.log)
        self.place(model)  # NHWC unless a method switches back (place(..., contiguous=True))
        self.ctx.optimizer = self.make_optimizer(model)
        example = d.train.example(1).float().to(self.device)  # the base architecture's cost, before a method adds to it
        self.dense_cost = {"params": count_params(model), "macs": count_macs(model, example)}
        self.method.setup(self.ctx)
        self.start_epoch, self.best, self.elapsed = 0, None, 0.0
        self.epoch_stats = {"loss": 0.0, "correct": 0, "seen": 0, "counted": 0}
        self.metrics = MetricsLog(self.out / "metrics.jsonl", self.out / "tensorboard" if cfg.run.tensorboard else None,
                                  enabled=self.dist.is_main)

    # ---------------------------------------------------------------------------------------------- pieces
    def place(self, model: nn.Module, contiguous: bool = False) -> nn.Module:
        """Move ``model`` to the run's device and memory format (in place; returned for convenience).

        ``contiguous=True`` trains and evaluates in NCHW from now on (model, batches). Pruning asks for it after
        the shrink: on CPU, torch 2.14's channels-last convolution backward corrupts memory for some irregular
        channel widths at odd batch sizes (e.g. a pruned ResNet-20 at batch 107 with 2 threads; dense widths are
        unaffected)."""
        if contiguous:
            self.ctx.channels_last = self.train_loader.channels_last = False
        model.to(self.device)
        if self.dist.enabled:
            use_global_batchnorm(model)
        fmt = torch.channels_last if self.ctx.channels_last else torch.contiguous_format
        return model.to(memory_format=fmt)

    def rebuild_optimizer(self, carry: dict | None = None) -> None:
        """New optimizer over the model's parameters (:meth:`MethodContext.rebuild_optimizer`)."""
        ctx, old = self.ctx, self.ctx.optimizer
        if self.dist.enabled:  # surgery may have created plain BatchNorm layers
            use_global_batchnorm(ctx.model)
        ctx.optimizer = self.make_optimizer(ctx.model)
        for group_new, group_old in zip(ctx.optimizer.param_groups, old.param_groups):
            group_new["lr"] = group_old["lr"]
        for p in (p for group in ctx.optimizer.param_groups for p in group["params"]):  # a method may leave some out
            if carry and p in carry:
                ctx.optimizer.state[p] = carry[p]
            elif p in old.state:
                ctx.optimizer.state[p] = old.state[p]

    def replicated_state(self) -> list[torch.Tensor | None]:
        """Weights, buffers and SGD momentum: what every process of a data-parallel run must hold identically
        (in the same order on every process)."""
        ctx = self.ctx
        momentum = [ctx.optimizer.state.get(p, {}).get("momentum_buffer") for g in ctx.optimizer.param_groups
                    for p in g["params"]]
        return [*ctx.model.parameters(), *ctx.model.buffers(), *momentum]

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        t = self.cfg.train
        return torch.optim.SGD(self.method.param_groups(model), lr=t.lr, momentum=t.momentum,
                               weight_decay=t.weight_decay, nesterov=t.nesterov)

    def evaluate(self, split: str, predict: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict | None:
        """Accuracy summary (overall, per group, balanced, per class) of ``split`` with the method's predict, or
        with ``predict`` where given (:meth:`MethodContext.evaluate`)."""
        data = {"val": self.data.val, "test": self.data.test, "train": self.data.train}[split]
        if data is None:
            return None
        was_training = self.ctx.model.training
        self.ctx.model.eval()
        try:
            predict = predict or (lambda x: self.method.predict(self.ctx, x))
            return evaluate_split(predict, data, self.data.groups, self.mean,
                                  self.std, self.cfg.train.eval_batch_size, self.device, self.loss_fn.adjust_logits,
                                  self.ctx.precision, self.ctx.channels_last, self.dist, self.cfg.run.workers)
        finally:
            self.ctx.model.train(was_training)

    # ----------------------------------------------------------------------------------------- checkpoint
    def _state(self, epoch: int) -> dict:
        return {"model": self.ctx.model.state_dict(), "optimizer": self.ctx.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": epoch, "loader": self.train_loader.state_dict(),
                "rng": rng_state(), "method": self.method.state_dict(), "best": self.best,
                "elapsed": self.elapsed, "epoch_stats": dict(self.epoch_stats), "step": self.ctx.step,
                "normalization": {"mean": list(self.mean), "std": list(self.std)}, **config_record(self.cfg)}

    def save(self, epoch: int) -> None:
        if self.dist.is_main:
            save_checkpoint(self.out / "checkpoints" / "last.pt", self._state(epoch))

    def resume(self, state: dict | None = None) -> None:
        """Continue from ``checkpoints/last.pt``: ``state`` when the caller has read it already, else read here
        (:func:`.rundir.read_resume_checkpoint` refuses an unreadable one or one trained under another config).
        A checkpoint that does not fit this run's model and method raises :class:`TrainingError`."""
        path = self.out / "checkpoints" / "last.pt"
        state = read_resume_checkpoint(self.out, self.cfg) if state is None else state
        try:
            _resize_to(self.ctx.model, state["model"])  # a method may have changed layer shapes (shrink, growth)
            self.place(self.ctx.model)
            self.method.load_state_dict(state["method"])
            self._load_training_state(state)
        except (KeyError, IndexError, RuntimeError, TypeError, ValueError) as exc:
            raise TrainingError(f"checkpoint {path} does not fit this run ({' '.join(str(exc).split())[:300]}); it was "
                                "written by another version of tailwise or altered. Delete it to restart from "
                                "scratch") from None
        self.log(f"resumed {self.out} at epoch {self.start_epoch}"
                 + (f", batch {self.train_loader.position}" if self.train_loader.position else ""))

    def branch(self, checkpoint: str | Path) -> None:
        """Start from a plain run's end-of-epoch checkpoint (:mod:`.branch`); the method keeps its fresh state
        and best-on-validation considers only this run's epochs."""
        state, record = load_branch_point(checkpoint, self.cfg, self.method.first_active_epoch())
        self._load_training_state(state)
        self.best = None
        if self.dist.is_main:
            copy_source_metrics(Path(record["source"]), self.metrics.path, self.start_epoch)
            write_branch_record(self.out, record)
        self.log(f"branched {self.out} from {checkpoint} at epoch {self.start_epoch}")

    def _load_training_state(self, state: dict) -> None:
        """Model weights, optimizer, scaler, sampler, RNG, counters and normalisation from a checkpoint."""
        self.ctx.model.load_state_dict(state["model"])
        self.ctx.rebuild_optimizer()
        self.ctx.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.train_loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        self.start_epoch, self.best, self.elapsed = state["epoch"], state["best"], state["elapsed"]
        self.epoch_stats, self.ctx.step = state["epoch_stats"], state["step"]
        if "normalization" in state:  # the statistics the run started with, whatever this version computes
            self.mean, self.std = state["normalization"]["mean"], state["normalization"]["std"]
            self.train_loader.set_normalization(self.mean, self.std)
        self.metrics.truncate_after(self.start_epoch)

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum
        self.log("signal received: saving a checkpoint after this batch")

    # ------------------------------------------------------------------------------------------------ loop
    def _step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int, int | None]:
        """One optimizer step on this process's batch: the method's loss (or the loss function's), backward,
        gradient averaging over processes, the method's hooks, clipping, the SGD step. Returns the summed loss,
        the number of images and the correct predictions over all processes (None where the method computed
        its loss without handing back logits)."""
        ctx, t = self.ctx, self.cfg.train
        if self.dist.enabled:  # engine.dist rule 1: this process's part of the global batch's loss
            weight = self.loss_fn.batch_weight(y)
            ctx.batch_share = weight * self.dist.world / self.dist.totals([weight])[0]
        with ctx.autocast(), self.dist.data_parallel():
            loss, logits = self.method.training_loss(ctx, x, y), None
            if isinstance(loss, tuple):  # the method also hands back the logits it computed
                loss, logits = loss
            if loss is None:
                logits = ctx.model(x)
                loss = self.loss_fn(logits.float(), y)
            ctx.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss * ctx.batch_share if self.dist.enabled else loss).backward()
        correct = int((logits.argmax(1) == y).sum()) if logits is not None else 0
        loss_sum, seen, correct = self.dist.sync_step(  # gradients averaged over processes
            list(ctx.model.parameters()), [float(loss.detach()) * len(y), len(y), correct])
        if not math.isfinite(loss_sum):
            raise TrainingError(f"the training loss became {loss_sum / seen} at epoch {ctx.epoch + 1}, step {ctx.step}; "
                                "lower train.lr or enable train.grad_clip. "
                                + (f"The last good checkpoint is kept in {self.out / 'checkpoints'}"
                                   if (self.out / "checkpoints" / "last.pt").is_file()
                                   else "No epoch had finished, so there is no checkpoint to keep"))
        self.method.after_backward(ctx)
        if t.grad_clip:
            self.scaler.unscale_(ctx.optimizer)
            nn.utils.clip_grad_norm_(ctx.model.parameters(), t.grad_clip)
        self.scaler.step(ctx.optimizer)
        self.scaler.update()
        self.method.after_step(ctx)
        return loss_sum, int(seen), (int(correct) if logits is not None else None)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """:meth:`MethodContext.train_step`: one step outside the epoch loop (e.g. DO's retraining); the batch's
        mean loss."""
        loss_sum, seen, _ = self._step(x, y)
        return loss_sum / seen

    def train_epoch(self, epoch: int) -> dict:
        ctx, t = self.ctx, self.cfg.train
        ctx.epoch = epoch
        lr = self.schedule(epoch)
        ctx.set_lr(lr)
        self.loss_fn.set_epoch(epoch)
        if self.train_loader.position == 0:
            self.method.on_epoch_start(ctx, epoch)
            self.epoch_stats = {"loss": 0.0, "correct": 0, "seen": 0, "counted": 0}
        self.train_loader.set_epoch(epoch)
        ctx.model.train()
        stats = self.epoch_stats
        bar = None
        if progress_mode(self.cfg.run.progress) == "bar" and self.dist.is_main:
            from tqdm import tqdm

            bar = tqdm(total=len(self.train_loader), initial=self.train_loader.position,
                       desc=f"epoch {epoch + 1}/{t.epochs}", leave=False, dynamic_ncols=True)
        for x, y in self.train_loader:
            loss_sum, seen, correct = self._step(x, y)
            ctx.step += 1  # the loop's batches only (train_step's extra steps, e.g. DO's retraining, do not count)
            stats["loss"] += loss_sum
            stats["seen"] += seen
            if correct is not None:
                stats["correct"] += correct
                stats["counted"] += seen
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss'] / stats['seen']:.4f}", lr=f"{lr:.4g}")
            if self.dist.any(self._stop_signal is not None):  # a signal reached some process: all stop here
                self.save(epoch)
                self.dist.barrier()  # nobody exits (torchrun then stops the rest) before rank 0 has saved
                raise Interrupted(f"interrupted at epoch {epoch + 1}; checkpoint saved. Continue with "
                                  f"`tailwise run --resume {self.out}`")
        if bar is not None:
            bar.close()
        return {"lr": ctx.base_lr(),  # what was used (a method may own the learning rate: DO), unscaled
                "train_loss": stats["loss"] / max(1, stats["seen"]),
                "train_acc": 100.0 * stats["correct"] / stats["counted"] if stats["counted"] else None}

    def fit(self) -> dict:
        cfg = self.cfg
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.log(f"training {cfg.model.name} on {self.data.info['name']} ({self.data.info['train_size']} images, "
                     f"{self.data.num_classes} classes, groups {self.data.groups.sizes()}) with loss {cfg.loss.name}, "
                     f"method {cfg.method['name']}, on {self.device}"
                     + (f" x {self.dist.world} processes ({self.dist.backend}, global batch {cfg.train.batch_size})"
                        if self.dist.enabled else "") + f"; run directory {self.out}")
            for epoch in range(self.start_epoch, cfg.train.epochs):
                start = time.perf_counter()
                record = {"epoch": epoch, **self.train_epoch(epoch)}
                val = self.evaluate("val")
                record["val"] = val
                if cfg.train.eval_test_every_epoch or (val is None and cfg.data.val == "test"):
                    record["test"] = self.evaluate("test")
                selection_acc = val or record.get("test")
                record.update(self.method.on_epoch_end(self.ctx, epoch, selection_acc))
                if self.dist.broadcast_(self.replicated_state()):  # replicas must be identical: say when not
                    record["replicas_resynced"] = True  # e.g. non-deterministic GPU kernels in a method's own steps
                    self.log(f"epoch {epoch + 1}: the processes' weights had drifted apart; rank 0's were restored")
                self.elapsed += time.perf_counter() - start
                record["time_s"] = round(time.perf_counter() - start, 3)
                self.metrics.write(record)
                if val is not None and cfg.run.keep_best and self.method.selectable(epoch) and (self.best is None or val["balanced"] > self.best["val"]["balanced"]):
                    self.best = {"epoch": epoch, "val": {k: v for k, v in val.items() if k != "per_class"}}
                    if self.dist.is_main:
                        save_checkpoint(self.out / "checkpoints" / "best.pt", {
                            "model": self.ctx.model.state_dict(), "method": self.method.state_dict(), "epoch": epoch})
                self.save(epoch + 1)
                if epoch + 1 in cfg.run.keep_checkpoints and self.dist.is_main:  # e.g. the epoch pruned runs branch from
                    shutil.copyfile(self.out / "checkpoints" / "last.pt",
                                    self.out / "checkpoints" / f"epoch_{epoch + 1:03d}.pt")
                self.log(f"epoch {epoch + 1}/{cfg.train.epochs}  lr {record['lr']:.4g}  loss {record['train_loss']:.4f}  "
                         f"val {format_groups(selection_acc)}  {record['time_s']:.1f}s")
            return self.finish()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # ---------------------------------------------------------------------------------------------- finish
    def _evaluate_best(self) -> dict | None:
        if self.best is None:
            return None
        self.dist.barrier()  # rank 0 wrote it
        best = load_checkpoint(self.out / "checkpoints" / "best.pt", "cpu")
        current_model, current_method = self.ctx.model, self.method.state_dict()
        model = copy.deepcopy(current_model)
        _resize_to(model, best["model"])
        model.load_state_dict(best["model"])
        self.ctx.model = self.place(model)
        self.method.load_state_dict(best["method"])
        try:
            return {**self.best, "accuracy": self.evaluate("test")}
        finally:
            self.ctx.model = current_model
            self.method.load_state_dict(current_method)

    def finish(self) -> dict:
        cfg, d = self.cfg, self.data
        test = self.evaluate("test")
        best = self._evaluate_best()
        deployed = self.method.finalize(self.ctx)
        if deployed is not self.ctx.model:  # report what is deployed: evaluate the finalized model itself
            trained, self.ctx.model = self.ctx.model, deployed
            try:
                test = self.evaluate("test")
            finally:
                self.ctx.model = trained
        example = d.train.example(1).float().to(self.device)
        cost = {"params": count_params(deployed), "macs": count_macs(deployed, example),
                "params_dense": self.dense_cost["params"], "macs_dense": self.dense_cost["macs"]}
        cost["flops"] = 2 * cost["macs"]  # FLOPs = 2 x MACs (multiply + add)
        cost["F"] = round(100.0 * cost["macs"] / cost["macs_dense"], 4)
        preprocess = {"mean": self.mean, "std": self.std, "input_shape": list(d.train.image_shape)}
        if self.dist.is_main:
            save_model(deployed, self.out / "model", preprocess, d.classes)
        result = {
            "dataset": {k: v for k, v in d.info.items() if k != "classes"},
            "groups": d.groups.to_json(),
            "accuracy": {k: v for k, v in test.items() if k != "group_sizes"},
            "selection": "last",
            "cost": cost,
            "method": self.method.describe(),
            "loss": cfg.loss.name,
            "loss_config": self.loss_fn.describe(),
            "model": cfg.model.name,
            "epochs": cfg.train.epochs,
            "seed": cfg.run.seed,
            "precision": self.precision,
            "time_s": round(self.elapsed, 2),
            "versions": _versions(),
        }
        if best is not None:
            result["best_on_val"] = best
        branched = read_branch_record(self.out)
        if branched is not None:
            result["branched_from"] = branched
        if self.dist.enabled:
            result["distributed"] = {"world_size": self.dist.world, "backend": self.dist.backend}
        if self.dist.is_main:
            atomic_write_json(self.out / "result.json", result)
        self.dist.barrier()  # every process returns once the run is complete on disk
        return result

