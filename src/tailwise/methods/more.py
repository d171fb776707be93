"""``method: more`` -- MOdel REbalancing (MORE, arXiv 2510.08177): a low-rank, minority-specific component on every
conv / linear weight, trained with a prior-weighted discrepancy loss on a sine schedule, merged away at the end.

Reparametrisation. Every selected layer (``layers: all | conv | linear``) computes with ``W = W_g + B·A`` where
``W_g`` is the layer's own ``weight`` (the *general* part, still named ``weight`` so the model's state dict stays a
superset of the base architecture's), ``B`` (``m x r``, ``more_B``) and ``A`` (``r x k``, ``more_A``) with
``m`` = output channels, ``k`` = ``in/groups · kh · kw`` (``in_features`` for linear layers), and the rank
``r = max(1, round(ratio · min(m, k)))`` (round half up; ``ratio`` 0.1 as the paper's Fig. 2d). ``B = 0`` at
initialisation and ``A ~ U(-1/sqrt(k), 1/sqrt(k))`` (LoRA's ``kaiming_uniform(a=sqrt(5))`` bound, drawn from a
private generator seeded by ``run.seed`` so the rest of the run's random streams are unchanged): the reparametrised
model computes exactly the base model at the start. The layers keep their classes' behaviour (``isinstance``
holds, the module class is swapped for a subclass, as ``torch.nn.utils.parametrize`` does); ``B·A`` is reshaped
to the weight's shape (``(B·A)ᵀ`` for the cosine head :class:`~tailwise.models.NormedLinear`, whose weight is
stored ``in x out``). Biases and BatchNorm affine parameters are shared (general) parameters.

Loss (one training step)::

    L = L_base(f(x; W_g + BA), y) + alpha(tau) · mean_i pi_{y_i} · D(f(x; W_g + BA)_i, f(x; W_g)_i)

``pi`` is the empirical class prior of the training set, ``D`` the squared L2 distance of the logits
(``discrepancy: l2``, the paper's) or ``KL(softmax(z_gen) || softmax(z_full))`` (``kl``, ablation). The
general-only pass ``f(x; W_g)`` runs the same model inside :func:`general_only`: the low-rank terms are dropped and
BatchNorm layers normalise with the batch's own statistics (as the full pass does in training mode) without
updating ``running_mean`` / ``running_var`` / ``num_batches_tracked`` -- the running statistics, and therefore the
merged model, are those of the full path. ``detach_general: true`` runs the general pass under ``no_grad``
(``z_gen`` is a constant target; cheaper); the default ``false`` back-propagates through both passes, the
formula read literally.

Schedule. ``alpha(tau) = A · s(tau / T)`` with ``s(u) = sin(pi u)`` (``sine``, the paper's), ``1`` (``constant``)
or ``(1 + cos(pi u)) / 2`` (``cosine``: annealed from ``A`` to 0). ``tau`` / ``T`` are the epoch index (from 0)
and ``train.epochs`` by default (``unit: epoch``), or the global optimizer step and ``epochs x steps per epoch``
(``unit: step``). The amplitude is given normalised, ``amplitude`` = ``A' = A / C`` (``C`` classes; paper optimum
``A' ≈ 2``), so ``A = A' · C`` and the per-sample weight ``A · pi_y = A' · (C pi_y)`` is ``A'`` times the class's
frequency relative to a uniform prior. Where ``alpha(tau) = 0`` (the first epoch of the sine schedule, or
``amplitude: 0`` -- the "low-rank branch with A = 0" control) the general pass is skipped: the loss is then exactly
the base loss.

Deployment. ``finalize`` builds a fresh registry model (``build_model(**model.arch)``), loads ``W_g + B·A`` into
every reparametrised weight and everything else unchanged, and checks on every run, in eval mode with TF32 off,
that its logits equal the unmerged model's to ``merge_tol`` (1e-5) relative, on random inputs and on real test
images; :class:`MergeError` otherwise. The deployed network has exactly the base architecture's parameters and MACs.

Overhead. With ``measure_overhead`` (default on) the wall time of every training step (from the start of the loss
to the end of the optimizer step; CUDA synchronised) is accumulated separately for steps with the general pass and
steps without it (``alpha = 0``: base loss only, same reparametrised model); ``describe()["overhead"]`` gives both
means and their ratio, and ``metrics.jsonl`` the per-epoch step time and general-pass time.
``python -m tailwise.methods.more`` times dense / base-only / MORE steps of ResNet-32 on CIFAR-sized batches.

Branch size. ``finalize`` also records how large the trained tail component is (``describe()["branch"]``,
:func:`branch_size`): per layer ``||B·A||_F / ||W_g||_F`` (median, max and the layer of the max) and, on the real
test images of the merge check in eval mode, ``mean_i ||f(x_i; W_g + BA) - f(x_i; W_g)|| / mean_i ||f(x_i; W_g +
BA)||``, the branch's share of the logits. Near zero means the discrepancy term (and weight decay, which applies to
``B`` and ``A`` like every parameter) drove the branch out: the deployed model is then the general model.
"""
from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import bounded, choice
from ..errors import ConfigError, TailwiseError
from ..models import NormedLinear, build_model
from . import Method, register_method

SCHEDULES = ("sine", "constant", "cosine")
DISCREPANCIES = ("l2", "kl")
LAYERS = ("all", "conv", "linear")
UNITS = ("epoch", "step")


class MergeError(TailwiseError):
    """The merged (deployed) model's logits differ from the trained low-rank model's beyond the tolerance."""


# ----------------------------------------------------------------------------------------------- reparametrisation
class LowRankMixin:
    """``W = weight + B·A`` (``weight`` alone inside :func:`general_only`). Mixed into a layer class by swapping
    the module's ``__class__`` (see :func:`reparametrize`)."""

    more_general = False  # instance attribute set by general_only

    def more_delta(self) -> torch.Tensor:
        delta = self.more_B @ self.more_A  # m x k
        if isinstance(self, NormedLinear):
            return delta.t()  # NormedLinear stores its weight in x out
        return delta.view_as(self.weight)

    def effective_weight(self) -> torch.Tensor:
        if self.more_general:
            return self.weight
        return self.weight + self.more_delta()

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        return (self.weight + self.more_delta()).detach().clone()


class MoreConv2d(LowRankMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)


class MoreLinear(LowRankMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


class MoreNormedLinear(LowRankMixin, NormedLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1).mm(F.normalize(self.effective_weight(), dim=0))


_SWAP = {nn.Conv2d: MoreConv2d, nn.Linear: MoreLinear, NormedLinear: MoreNormedLinear}


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """``(m, k)``: output channels and fan-in (``in/groups · kh · kw`` for convolutions)."""
    if isinstance(module, nn.Conv2d):
        return module.out_channels, module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
    return module.out_features, module.in_features


def lowrank_rank(m: int, k: int, ratio: float) -> int:
    """``max(1, round(ratio · min(m, k)))``, rounding half up."""
    return max(1, int(math.floor(ratio * min(m, k) + 0.5)))


def reparametrize(model: nn.Module, ratio: float = 0.1, layers: str = "all",
                  generator: torch.Generator | None = None) -> dict[str, int]:
    """Give every selected conv / linear layer of ``model`` a zero-initialised low-rank term, in place.
    Returns ``{layer name: rank}``. Layers of other (sub)classes are left alone."""
    ranks = {}
    for name, module in model.named_modules():
        kind = type(module)
        if kind not in _SWAP:
            continue
        if (layers == "conv" and kind is not nn.Conv2d) or (layers == "linear" and kind is nn.Conv2d):
            continue
        m, k = layer_dims(module)
        r = lowrank_rank(m, k, ratio)
        w = module.weight
        bound = 1.0 / math.sqrt(k)
        a = torch.empty(r, k, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        module.__class__ = _SWAP[kind]
        module.register_parameter("more_A", nn.Parameter(a.to(device=w.device, dtype=w.dtype)))
        module.register_parameter("more_B", nn.Parameter(torch.zeros(m, r, device=w.device, dtype=w.dtype)))
        ranks[name] = r
    return ranks


def lowrank_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LowRankMixin)]


@contextlib.contextmanager
def general_only(model: nn.Module):
    """Run ``model`` as ``f(x; W_g)``: low-rank terms dropped, BatchNorm running statistics left untouched (in
    training mode the batch statistics still normalise, exactly as in the full pass)."""
    layers = [m for _, m in lowrank_layers(model)]
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in layers:
        m.more_general = True
    for bn in bns:
        bn.track_running_stats = False  # training mode: batch statistics, no running update, no counter
    try:
        yield model
    finally:
        for m in layers:
            m.more_general = False
        for bn in bns:
            bn.track_running_stats = True


def merge(model: nn.Module) -> nn.Module:
    """A plain registry model (``build_model(**model.arch)``) with ``W = W_g + B·A`` in every reparametrised layer."""
    state = model.state_dict()
    merged = {}
    for name, module in lowrank_layers(model):
        prefix = f"{name}." if name else ""
        merged[prefix + "weight"] = module.merged_weight()
        state.pop(prefix + "more_A")
        state.pop(prefix + "more_B")
    state.update(merged)
    weight = next(model.parameters())
    plain = build_model(**model.arch).to(device=weight.device, dtype=weight.dtype)
    plain.load_state_dict(state, strict=True)
    plain.train(model.training)
    return plain


# ----------------------------------------------------------------------------------------------------- the loss
def schedule_value(schedule: str, amplitude: float, tau: float, total: float) -> float:
    """``alpha(tau)`` for ``schedule`` with raw amplitude ``A`` over ``T = total``."""
    u = min(max(tau / total, 0.0), 1.0) if total > 0 else 0.0
    if schedule == "sine":
        s = 0.0 if u in (0.0, 1.0) else math.sin(math.pi * u)  # exact zeros at both ends
    elif schedule == "constant":
        s = 1.0
    elif schedule == "cosine":
        s = 0.5 * (1.0 + math.cos(math.pi * u))
    else:
        raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    return amplitude * s


def discrepancy(z_full: torch.Tensor, z_gen: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Per-sample ``D_i``: ``||z_full - z_gen||²`` (l2) or ``KL(softmax(z_gen) || softmax(z_full))`` (kl)."""
    z_full, z_gen = z_full.float(), z_gen.float()
    if kind == "l2":
        return (z_full - z_gen).pow(2).sum(1)
    if kind == "kl":
        return F.kl_div(F.log_softmax(z_full, 1), F.log_softmax(z_gen, 1), reduction="none", log_target=True).sum(1)
    raise ValueError(f"unknown discrepancy {kind!r}; allowed: {', '.join(DISCREPANCIES)}")


def more_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, prior: torch.Tensor, alpha: float,
              kind: str = "l2", detach_general: bool = False) -> tuple[torch.Tensor, dict]:
    """``L_base(z_full, y) + alpha · mean_i prior[y_i] · D_i``; returns the loss and its parts (tensors)."""
    z_full = model(x)
    base = loss_fn(z_full.float(), y)
    parts = {"logits": z_full, "base": base}
    if alpha == 0.0:
        return base, parts
    with general_only(model), (torch.no_grad() if detach_general else contextlib.nullcontext()):
        z_gen = model(x)
    term = (prior[y] * discrepancy(z_full, z_gen, kind)).mean()
    parts["more"] = term
    return base + alpha * term, parts


# --------------------------------------------------------------------------------------------------- the method
@dataclass
class MoreOptions:
    ratio: float = bounded(0.1, 0.0, 1.0, low_open=True)  # rank r = max(1, round(ratio · min(m, k))) (paper Fig. 2d)
    layers: str = choice(*LAYERS, default="all")  # which layers get the low-rank term
    amplitude: float = bounded(2.0, 0.0)  # normalised A' = A / C (paper Fig. 2c: ≈ 2); 0 = the "A = 0" control
    schedule: str = choice(*SCHEDULES, default="sine")  # alpha(tau) shape
    unit: str = choice(*UNITS, default="epoch")  # tau / T: epoch / train.epochs, or step / total steps
    discrepancy: str = choice(*DISCREPANCIES, default="l2")  # D: squared L2 of logits (paper) | KL
    detach_general: bool = False  # z_gen as a constant target (general pass under no_grad)
    merge_tol: float = bounded(1e-5, 0.0, low_open=True)  # relative logit tolerance of the merge check
    measure_overhead: bool = True  # time steps with / without the general pass


@register_method
class MoreRebalancing(Method):
    """``method: more`` (see the module docstring)."""

    name = "more"
    summary = ("MORE: a low-rank tail branch W = W_g + BA trained with a prior-weighted discrepancy loss on a sine "
               "schedule, merged into a plain model at the end")
    Options = MoreOptions

    def __init__(self, options: MoreOptions):
        super().__init__(options)
        self.ranks: dict[str, int] = {}
        self.lowrank_params = 0
        self.num_classes = 0
        self.prior: torch.Tensor | None = None
        self.total_steps = 0
        self.merge_check: dict | None = None
        self.branch: dict | None = None
        self.epoch_acc = self._fresh_epoch()
        self.timing = {"with_s": 0.0, "with_n": 0, "without_s": 0.0, "without_n": 0, "general_s": 0.0}
        self._step_start: float | None = None
        self._step_general: bool = False
        self._sync = lambda: None

    @staticmethod
    def _fresh_epoch() -> dict:
        return {"loss_more": 0.0, "alpha": 0.0, "n": 0, "correct": 0, "step_s": 0.0, "timed": 0, "general_s": 0.0}

    @classmethod
    def check_options(cls, o: MoreOptions, cfg) -> None:
        if not math.isfinite(o.amplitude):  # the range is the field's own
            raise ConfigError(f"method.amplitude: {o.amplitude} is out of range; must be a finite number >= 0")

    # ---------------------------------------------------------------------------------------------- hooks
    def setup(self, ctx) -> None:
        o = self.options
        generator = torch.Generator().manual_seed(int(ctx.cfg.run.seed) * 7919 + 2510)
        self.ranks = reparametrize(ctx.model, o.ratio, o.layers, generator)
        if not self.ranks:
            raise ConfigError(f"method.layers={o.layers}: the model has no such conv / linear layer to reparametrise")
        self.lowrank_params = sum(m.more_A.numel() + m.more_B.numel() for _, m in lowrank_layers(ctx.model))
        counts = torch.tensor(ctx.data.class_counts, dtype=torch.float64)
        self.num_classes = len(counts)
        self.prior = (counts / counts.sum()).float().to(ctx.device)
        self.total_steps = ctx.cfg.train.epochs * len(ctx.trainer.train_loader) if ctx.trainer is not None else 0
        self._sync = (lambda: torch.cuda.synchronize(ctx.device)) if ctx.device.type == "cuda" else (lambda: None)
        ctx.rebuild_optimizer()

    @property
    def amplitude_raw(self) -> float:
        """``A = A' · C``."""
        return self.options.amplitude * self.num_classes

    def alpha(self, ctx) -> float:
        o = self.options
        if o.unit == "epoch":
            tau, total = ctx.epoch, ctx.cfg.train.epochs
        else:
            tau, total = ctx.step, self.total_steps
        return schedule_value(o.schedule, self.amplitude_raw, tau, total)

    def on_epoch_start(self, ctx, epoch: int) -> None:
        self.epoch_acc = self._fresh_epoch()

    def training_loss(self, ctx, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        o = self.options
        alpha = self.alpha(ctx)
        if o.measure_overhead:
            self._sync()
            self._step_start = time.perf_counter()
        self._step_general = alpha != 0.0
        z_full = ctx.model(x)
        base = ctx.loss_fn(z_full.float(), y)
        acc = self.epoch_acc
        acc["n"] += len(y)
        acc["alpha"] = alpha
        acc["correct"] += int((z_full.detach().argmax(1) == y).sum())
        if alpha == 0.0:
            return base
        if o.measure_overhead:
            self._sync()
            start = time.perf_counter()
        with general_only(ctx.model), (torch.no_grad() if o.detach_general else contextlib.nullcontext()):
            z_gen = ctx.model(x)
        term = (self.prior[y] * discrepancy(z_full, z_gen, o.discrepancy)).mean()
        if o.measure_overhead:
            self._sync()
            spent = time.perf_counter() - start
            acc["general_s"] += spent
            self.timing["general_s"] += spent
        acc["loss_more"] += float(term.detach()) * len(y)
        return base + alpha * term

    def after_step(self, ctx) -> None:
        if self._step_start is None:
            return
        self._sync()
        spent = time.perf_counter() - self._step_start
        self._step_start = None
        if ctx.step == 0:
            return  # the first step of a run carries one-off allocation costs
        key = "with" if self._step_general else "without"
        self.timing[f"{key}_s"] += spent
        self.timing[f"{key}_n"] += 1
        self.epoch_acc["step_s"] += spent
        self.epoch_acc["timed"] += 1

    def on_epoch_end(self, ctx, epoch: int, val: dict | None) -> dict:
        acc = self.epoch_acc
        n, loss_more, correct = ctx.dist.totals([acc["n"], acc["loss_more"], acc["correct"]])  # every process's
        n = max(1, n)
        record = {"more_alpha": acc["alpha"], "more_loss": loss_more / n, "more_train_acc": 100.0 * correct / n}
        if self.options.measure_overhead and acc["timed"]:
            record["more_step_s"] = round(acc["step_s"] / acc["timed"], 5)
            record["more_general_fwd_s"] = round(acc["general_s"] / acc["timed"], 5)
        return record

    @torch.no_grad()
    def finalize(self, ctx) -> nn.Module:
        model = ctx.model
        deployed = merge(model)
        if ctx.cfg.train.channels_last:
            deployed = deployed.to(memory_format=torch.channels_last)
        inputs = [torch.randn(8, *ctx.data.train.image_shape, generator=torch.Generator().manual_seed(0))]
        real = ctx.data.test.example(32).float()
        mean = torch.tensor(ctx.trainer.mean).view(1, -1, 1, 1) * 255 if ctx.trainer is not None else 127.5
        std = torch.tensor(ctx.trainer.std).view(1, -1, 1, 1) * 255 if ctx.trainer is not None else 63.75
        inputs.append((real - mean) / std)
        inputs = [x.to(ctx.device) for x in inputs]
        self.merge_check = check_merge(model, deployed, inputs, self.options.merge_tol)
        self.branch = branch_size(model, inputs[-1])
        return deployed

    def overhead(self) -> dict:
        t = self.timing
        with_s = t["with_s"] / t["with_n"] if t["with_n"] else None
        without_s = t["without_s"] / t["without_n"] if t["without_n"] else None
        return {"step_s_with_more": None if with_s is None else round(with_s, 5),
                "step_s_without_more": None if without_s is None else round(without_s, 5),
                "ratio": round(with_s / without_s, 4) if with_s and without_s else None,
                "general_fwd_s": round(t["general_s"] / t["with_n"], 5) if t["with_n"] else None,
                "steps_with": t["with_n"], "steps_without": t["without_n"],
                "note": "wall time per training step (loss to optimizer step); without = base loss only on the "
                        "same reparametrised model (alpha = 0 steps)"}

    def describe(self) -> dict:
        out = super().describe()
        out.update({"amplitude_raw": self.amplitude_raw, "num_classes": self.num_classes,
                    "tau": "epoch index / train.epochs" if self.options.unit == "epoch" else "optimizer step / total steps",
                    "init": "B = 0, A ~ U(-1/sqrt(k), 1/sqrt(k))", "rank_rule": "max(1, round_half_up(ratio*min(m,k)))",
                    "layers_reparametrised": len(self.ranks), "lowrank_params": self.lowrank_params,
                    "ranks": dict(self.ranks), "overhead": self.overhead(), "merge_check": self.merge_check,
                    "branch": self.branch})
        return out

    def state_dict(self) -> dict:
        # B and A are model parameters (model.state_dict()); here: the bookkeeping for metrics and timing
        return {"ranks": dict(self.ranks), "epoch_acc": dict(self.epoch_acc), "timing": dict(self.timing)}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if self.ranks and state.get("ranks") and state["ranks"] != self.ranks:
            raise TailwiseError(f"cannot resume: the checkpoint's low-rank ranks {state['ranks']} differ from this "
                                f"config's {self.ranks}; use the run's own config (method.ratio / method.layers)")
        self.epoch_acc = dict(state.get("epoch_acc", self._fresh_epoch()))
        self.timing = dict(state.get("timing", self.timing))


@torch.no_grad()
def check_merge(model: nn.Module, deployed: nn.Module, inputs: list[torch.Tensor], tol: float = 1e-5) -> dict:
    """Compare logits of the low-rank ``model`` and the merged ``deployed`` model in eval mode with TF32 off;
    :class:`MergeError` if ``max|a - b| / max|a|`` exceeds ``tol`` on any input batch."""
    was = model.training, deployed.training
    model.eval()
    deployed.eval()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        worst_abs, worst_rel = 0.0, 0.0
        for x in inputs:
            a, b = model(x).float(), deployed(x).float()
            diff = float((a - b).abs().max())
            rel = diff / max(float(a.abs().max()), 1e-12)
            worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, rel)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        model.train(was[0])
        deployed.train(was[1])
    report = {"max_abs_diff": worst_abs, "max_rel_diff": worst_rel, "tol": tol,
              "batches": len(inputs), "samples": sum(len(x) for x in inputs)}
    if not worst_rel <= tol:
        raise MergeError(f"MORE merge check failed: the merged model's logits differ from the trained model's by "
                         f"{worst_rel:.3g} (relative; tolerance {tol:g}). The weights were not deployed; report this "
                         "as a bug, or raise method.merge_tol if the run used reduced precision")
    return report


@torch.no_grad()
def branch_size(model: nn.Module, x: torch.Tensor) -> dict:
    """How much the low-rank tail component contributes: per layer ``||B·A||_F / ||W_g||_F`` (median, max, and
    the layer of the max) and, in eval mode on ``x``, ``mean_i ||z_full_i - z_gen_i|| / mean_i ||z_full_i||``."""
    ratios = {name: float(m.more_delta().norm() / m.weight.norm().clamp_min(1e-12))
              for name, m in lowrank_layers(model)}
    largest = max(ratios, key=ratios.get)
    was = model.training
    model.eval()
    try:
        z_full = model(x).float()
        with general_only(model):
            z_gen = model(x).float()
    finally:
        model.train(was)
    logit_share = float((z_full - z_gen).norm(dim=1).mean() / z_full.norm(dim=1).mean().clamp_min(1e-12))
    return {"weight_ratio_median": round(statistics.median(ratios.values()), 8),
            "weight_ratio_max": round(ratios[largest], 8),
            "weight_ratio_max_layer": largest, "logit_share": round(logit_share, 8), "samples": len(x),
            "note": "||B A||_F / ||W_g||_F per layer; logit_share = mean ||z_full - z_gen|| / mean ||z_full|| "
                    "on real test images, eval mode"}


# ---------------------------------------------------------------------------------------------- overhead bench
def measure_overhead(steps: int = 6, threads: int = 1, batch: int = 128, device: str = "cpu",
                     model_name: str = "resnet32", num_classes: int = 10) -> dict:
    """Median seconds per training step (forward, backward, SGD step) of the dense model, the reparametrised
    model with the base loss only, and MORE (general pass with and without gradient)."""
    import statistics

    from ..losses import build_loss

    torch.set_num_threads(threads)
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(dev)
    y = torch.randint(0, num_classes, (batch,), generator=g).to(dev)
    counts = [int(500 * 0.01 ** (i / (num_classes - 1))) for i in range(num_classes)]
    loss_fn = build_loss("balanced_softmax", counts).to(dev)
    prior = torch.tensor(counts, dtype=torch.float32, device=dev)
    prior = prior / prior.sum()
    dense = build_model(model_name, num_classes).to(dev).train()
    lowrank = copy.deepcopy(dense)
    reparametrize(lowrank, 0.1, "all", g)
    amp = 2.0 * num_classes

    def timed(model, alpha, detach):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            loss, _ = more_loss(model, x, y, loss_fn, prior, alpha, "l2", detach)
            loss.backward()
            opt.step()
            sync()

        step(), step()  # warm-up
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    dense_s = timed(dense, 0.0, False)
    base_s = timed(lowrank, 0.0, False)
    more_s = timed(lowrank, amp, False)
    detached_s = timed(lowrank, amp, True)
    return {"device": str(dev), "threads": threads, "batch": batch, "model": model_name,
            "dense_step_s": round(dense_s, 4), "lowrank_base_only_step_s": round(base_s, 4),
            "more_step_s": round(more_s, 4), "more_detached_step_s": round(detached_s, 4),
            "ratio_more_vs_base_only": round(more_s / base_s, 3), "ratio_more_vs_dense": round(more_s / dense_s, 3),
            "ratio_detached_vs_base_only": round(detached_s / base_s, 3)}


def main() -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Time MORE's second forward pass (ResNet-32, CIFAR-sized batches)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    a = parser.parse_args()
    print(json.dumps(measure_overhead(a.steps, a.threads, a.batch, a.device), indent=1))


if __name__ == "__main__":
    main()
