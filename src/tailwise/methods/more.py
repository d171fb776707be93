"""``method: more`` -- MOdel REbalancing (MORE, arXiv 2510.08177): a low-rank, minority-specific component on every
conv / linear weight, trained with a prior-weighted discrepancy loss on a sine schedule, merged away at the end.

Library API (no trainer needed; ``examples/more.py``): :func:`reparametrize` (``W = W_g + B·A`` in place),
:func:`general_logits` (``f(x; W_g)``), :func:`more_loss` (the loss on full logits, general logits, targets, prior
and alpha) and :func:`merge` (a plain model with ``W_g + B·A``). :class:`MOREMethod` is the trainer's thin adapter
over exactly these functions: the phase, the parameter groups, the schedule and the bookkeeping.

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

Loss (one training step, the seed's ``L = L_base + alpha(tau) · L_MORE``)::

    L = L_base(f(x; W_g + BA), y) + alpha(tau) · mean_i pi_{y_i} · D(f(x; W_g + BA)_i, f(x; W_g)_i)

``pi`` is the empirical class prior of the training set, ``D`` the squared L2 distance of the logits
(``discrepancy: l2``, the paper's ``M(x; theta)``) or ``KL(softmax(z_gen) || softmax(z_full))`` (``kl``,
ablation). The general-only pass ``f(x; W_g)`` runs the same model inside :func:`general_only`: the low-rank terms
are dropped and BatchNorm layers normalise with the batch's own statistics (as the full pass does in training mode)
without updating ``running_mean`` / ``running_var`` / ``num_batches_tracked`` -- the running statistics, and
therefore the merged model, are those of the full path. ``detach_general: true`` runs the general pass under
``no_grad`` (``z_gen`` is a constant target; cheaper); the default ``false`` back-propagates through both passes,
the formula read literally.

Schedule. ``alpha(tau) = A · s(tau / T)`` with ``s(u) = sin(pi u)`` (``sine``, the paper's), ``1`` (``constant``)
or ``(1 + cos(pi u)) / 2`` (``cosine``: annealed from ``A`` to 0). ``tau`` / ``T`` count the phase (below): the
epoch index minus ``start_epoch`` and ``train.epochs - start_epoch`` (``unit: epoch``), or the optimizer steps
since the phase began and the phase's steps (``unit: step``). The amplitude is given normalised, ``amplitude`` =
``A' = A / C`` (``C`` classes; paper optimum ``A' ≈ 2``), so ``A = A' · C`` and the per-sample weight
``A · pi_y = A' · (C pi_y)`` is ``A'`` times the class's frequency relative to a uniform prior. Where
``alpha(tau) = 0`` (the first epoch of the sine schedule, or ``amplitude: 0`` -- the "low-rank branch with A = 0"
control) the general pass is skipped: the loss is then exactly the base loss.

Protocol: who trains ``theta_g`` (issue #24). Trained jointly from scratch at full rank, ``W_g`` absorbs any
``BA``: ``(W_g + BA, 0)`` has the same base loss and zero penalty, so the branch vanishes (measured: ~5e-5 of the
logits). The seed initialises ``theta_g`` "from pretrained or random" and fine-tunes pretrained models, so
``general`` chooses (recorded in ``describe()["phase"]``):

- ``joint`` (default): ``W_g``, ``B`` and ``A`` train together at the schedule's rate (the landed behaviour).
- ``frozen``: ``theta_g`` -- every conv / linear weight, bias and BatchNorm affine parameter -- stays fixed, bit for
  bit (``requires_grad`` off, outside the optimizer); ``B`` and ``A`` train with the loss above. The general pass
  then has nothing to differentiate, so it runs under ``no_grad`` (exactly the same gradients, cheaper).
  BatchNorm running statistics are buffers, not ``theta_g``: they keep following the full path ``W_g + BA``, whose
  features the merged model normalises (freezing them would deploy ``W_g + BA`` with ``W_g``'s statistics).
- ``slow``: ``theta_g`` trains at ``general_lr_scale`` (0.1) times the schedule's rate (its own parameter group's
  ``lr_scale``, which the trainer's schedule multiplies in every epoch).

``branch_lr_scale`` (default 1: the paper's single rate) multiplies the rate of ``B`` and ``A`` the same way. A
phase late in a schedule runs at a small rate (epochs 160-199 of the LDAM-DRW schedule: 1e-3, then 1e-5), and a
branch that starts at ``B = 0`` hardly moves there: measured, a ``frozen`` phase ended with ``||BA|| / ||W_g||``
about 1e-3 and 1.7e-3 of the logits, with ``A' = 2`` and with ``A' = 0`` alike, so the penalty was not what kept it
small. ``branch_lr_scale: 100`` trains the branch at the schedule's peak rate (0.1, then 1e-3) -- our extension,
the seed gives one rate for everything; the logged ``lr`` stays the schedule's. Measured at 100x on that
phase: the branch only doubles (4e-3 of ``W_g``) and accuracy is unchanged (docs/benchmarks.md, MORE section).

The phase. With ``start_epoch: N > 0`` the run trains plainly (the trainer's own loss, the base model) for epochs
``0 .. N-1`` and MORE begins at epoch ``N``: reparametrisation, the ``general`` mode, ``alpha``'s schedule over the
remaining ``train.epochs - N`` epochs. ``first_active_epoch() = N``, so ``tailwise run RECIPE --branch-from
PLAIN_RUN/checkpoints/epoch_N.pt`` starts the phase from a plain run's trained model and equals the run from
scratch (:mod:`tailwise.engine.branch`); ``frozen`` requires ``N > 0`` (a trained ``W_g``). Only models of the
phase are chosen as best-on-validation. ``branch_weight_decay`` is the weight decay of ``B`` and ``A`` (null:
``train.weight_decay``). The plain fine-tuning control with the same epochs is the plain run itself: its epochs
``N .. end`` are plain training of the whole model from the same checkpoint with the base loss.

Deployment. ``finalize`` builds a fresh registry model (``build_model(**model.arch)``), loads ``W_g + B·A`` into
every reparametrised weight and everything else unchanged, and checks on every run, in eval mode with TF32 off,
that its logits equal the unmerged model's to ``merge_tol`` (1e-5) relative, on random inputs and on real test
images; :class:`MergeError` otherwise. The deployed network has exactly the base architecture's parameters and MACs.

Overhead. With ``measure_overhead`` (default on) the wall time of every training step of the phase (from the start
of the loss to the end of the optimizer step; CUDA synchronised) is accumulated separately for steps with the
general pass and steps without it (``alpha = 0``: base loss only, same reparametrised model);
``describe()["overhead"]`` gives both means and their ratio, and ``metrics.jsonl`` the per-epoch step time and
general-pass time. ``benchmarks/more_overhead.py`` times dense / base-only / MORE steps of ResNet-32 on CIFAR-sized
batches.

Branch size. ``finalize`` also records how large the trained tail component is (``describe()["branch"]``,
:func:`branch_size`): per layer ``||B·A||_F / ||W_g||_F`` (every layer, the median, max and the layer of the max)
and, in eval mode on up to 512 test images stratified by class, ``mean_i ||f(x_i; W_g + BA) - f(x_i; W_g)|| /
mean_i ||f(x_i; W_g + BA)||``, the branch's share of the logits, over all of them and per class group (many /
medium / few, by the true class). Near zero means the branch was driven out: the deployed model is then the
general model.
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

from ..data.longtail import GROUP_NAMES
from ..errors import ConfigError, TailwiseError
from ..models import NormedLinear, build_model
from ..options import bounded, choice
from . import Method, register_method

SCHEDULES = ("sine", "constant", "cosine")
DISCREPANCIES = ("l2", "kl")
LAYERS = ("all", "conv", "linear")
UNITS = ("epoch", "step")
GENERALS = ("joint", "frozen", "slow")
BRANCH_SAMPLE = 512  # test images (stratified by class) on which finalize measures the branch's share of the logits


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
_UNSWAP = {low: base for base, low in _SWAP.items()}


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


def branch_parameters(model: nn.Module) -> list[nn.Parameter]:
    """``B`` and ``A`` of every reparametrised layer: the tail component ``theta_t``."""
    return [p for _, m in lowrank_layers(model) for p in (m.more_B, m.more_A)]


def general_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every other parameter (``W_g``, biases, BatchNorm affine): the general part ``theta_g``."""
    branch = {id(p) for p in branch_parameters(model)}
    return [p for p in model.parameters() if id(p) not in branch]


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


def _plain_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every reparametrised layer back to its own class, without ``B`` and ``A``."""
    plain = copy.deepcopy(model)
    for _, module in lowrank_layers(plain):
        del module.more_A, module.more_B
        module.__dict__.pop("more_general", None)
        module.__class__ = _UNSWAP[type(module)]
    return plain.requires_grad_(True)


def merge(model: nn.Module) -> nn.Module:
    """The deployable model: ``W = W_g + B·A`` loaded into every reparametrised layer of a plain network with the
    base architecture's parameters and MACs -- a fresh registry model (``build_model(**model.arch)``) for a
    tailwise network, otherwise a copy of ``model`` with its layers' own classes restored."""
    state = model.state_dict()
    for name, module in lowrank_layers(model):
        prefix = f"{name}." if name else ""
        state[prefix + "weight"] = module.merged_weight()
        state.pop(prefix + "more_A")
        state.pop(prefix + "more_B")
    if hasattr(model, "arch"):
        weight = next(model.parameters())
        plain = build_model(**model.arch).to(device=weight.device, dtype=weight.dtype)
    else:
        plain = _plain_copy(model)
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


def general_logits(model: nn.Module, x: torch.Tensor, detach: bool = False) -> torch.Tensor:
    """``z_gen = f(x; W_g)``, the general-only pass (:func:`general_only`); under ``no_grad`` with ``detach``."""
    with general_only(model), (torch.no_grad() if detach else contextlib.nullcontext()):
        return model(x)


def more_loss(z_full: torch.Tensor, z_gen: torch.Tensor | None, targets: torch.Tensor, prior: torch.Tensor,
              alpha: float, base_loss=F.cross_entropy, kind: str = "l2") -> tuple[torch.Tensor, dict]:
    """MORE's training loss (seed ``004_``, "Loss modules"): ``L = L_base(z_full, y) + alpha · mean_i prior[y_i] ·
    D(z_full_i, z_gen_i)`` with ``z_full = f(x; W_g + BA)``, ``z_gen = f(x; W_g)`` (:func:`general_logits`) and
    ``D`` the squared L2 distance of the logits (:func:`discrepancy`). ``base_loss(logits, targets)`` is the base
    loss (cross-entropy by default; a :func:`tailwise.losses.build_loss` loss in the trainer), computed in float32.
    Where ``alpha == 0`` the result is exactly the base loss and ``z_gen`` may be None (no general pass needed).
    Returns the loss and its parts: ``{"base": L_base}`` plus ``{"more": mean_i prior[y_i] · D_i}`` when alpha > 0.

        z_full = model(x)
        z_gen = general_logits(model, x) if alpha else None
        loss, parts = more_loss(z_full, z_gen, y, prior, alpha)
    """
    base = base_loss(z_full.float(), targets)
    if alpha == 0.0:
        return base, {"base": base}
    term = (prior[targets] * discrepancy(z_full, z_gen, kind)).mean()
    return base + alpha * term, {"base": base, "more": term}


# --------------------------------------------------------------------------------------------------- the method
@dataclass
class MOREOptions:
    ratio: float = bounded(0.1, 0.0, 1.0, low_open=True)  # rank r = max(1, round(ratio · min(m, k))) (paper Fig. 2d)
    layers: str = choice(*LAYERS, default="all")  # which layers get the low-rank term
    amplitude: float = bounded(2.0, 0.0)  # normalised A' = A / C (paper Fig. 2c: ≈ 2); 0 = the "A = 0" control
    schedule: str = choice(*SCHEDULES, default="sine")  # alpha(tau) shape
    unit: str = choice(*UNITS, default="epoch")  # tau / T over the phase: epochs, or optimizer steps
    discrepancy: str = choice(*DISCREPANCIES, default="l2")  # D: squared L2 of logits (paper) | KL
    detach_general: bool = False  # z_gen as a constant target (general pass under no_grad)
    general: str = choice(*GENERALS, default="joint")  # how W_g trains in the phase: with B, A | fixed | slower
    general_lr_scale: float = bounded(0.1, 0.0, 1.0, low_open=True)  # slow: W_g's LR = this x the schedule's
    branch_lr_scale: float = bounded(1.0, 0.0, low_open=True)  # B and A's LR = this x the schedule's
    start_epoch: int = bounded(0, 0)  # the phase's first epoch (0-based); before it the run is plain training
    branch_weight_decay: float | None = bounded(None, 0.0)  # weight decay of B and A; null: train.weight_decay
    merge_tol: float = bounded(1e-5, 0.0, low_open=True)  # relative logit tolerance of the merge check
    measure_overhead: bool = True  # time steps with / without the general pass


@register_method
class MOREMethod(Method):
    """``method: more`` -- the trainer's adapter over :func:`reparametrize`, :func:`more_loss` and :func:`merge`
    (see the module docstring)."""

    name = "more"
    summary = ("MORE: a low-rank tail branch W = W_g + BA trained with a prior-weighted discrepancy loss on a sine "
               "schedule, merged into a plain model at the end")
    Options = MOREOptions

    def __init__(self, options: MOREOptions):
        super().__init__(options)
        self.active = False  # the phase has begun: the model is reparametrised
        self.ranks: dict[str, int] = {}
        self.lowrank_params = 0
        self.num_classes = 0
        self.prior: torch.Tensor | None = None
        self.steps_per_epoch = 0
        self.branch_weight_decay = 0.0
        self.merge_check: dict | None = None
        self.branch: dict | None = None
        self.epoch_acc = self._fresh_epoch()
        self.timing = {"with_s": 0.0, "with_n": 0, "without_s": 0.0, "without_n": 0, "general_s": 0.0}
        self._step_start: float | None = None
        self._step_general: bool = False
        self._sync = lambda: None
        self._ctx = None

    @staticmethod
    def _fresh_epoch() -> dict:
        return {"loss_more": 0.0, "alpha": 0.0, "n": 0, "correct": 0, "step_s": 0.0, "timed": 0, "general_s": 0.0}

    @classmethod
    def check_options(cls, o: MOREOptions, cfg) -> None:
        if o.start_epoch >= cfg.train.epochs:
            raise ConfigError(f"method.start_epoch: {o.start_epoch} leaves no epoch for the MORE phase; it must be "
                              f"below train.epochs ({cfg.train.epochs})")
        if o.general == "frozen" and o.start_epoch == 0:
            raise ConfigError("method.general=frozen keeps W_g fixed, so W_g must be a trained model: set "
                              "method.start_epoch to N and start from a plain run's checkpoint with --branch-from "
                              "RUN/checkpoints/epoch_N.pt (or let the run train plainly up to epoch N)")

    @property
    def detach(self) -> bool:
        """Whether the general pass runs without gradient: asked for, or implied (frozen: nothing in it trains)."""
        return self.options.detach_general or self.options.general == "frozen"

    # ---------------------------------------------------------------------------------------------- hooks
    def setup(self, ctx) -> None:
        self._ctx = ctx
        counts = torch.tensor(ctx.data.class_counts, dtype=torch.float64)
        self.num_classes = len(counts)
        self.prior = (counts / counts.sum()).float().to(ctx.device)
        self.steps_per_epoch = len(ctx.train_loader)
        wd = self.options.branch_weight_decay
        self.branch_weight_decay = ctx.cfg.train.weight_decay if wd is None else wd
        self._sync = (lambda: torch.cuda.synchronize(ctx.device)) if ctx.device.type == "cuda" else (lambda: None)
        if self.options.start_epoch == 0:
            self._start_phase(ctx)

    def _start_phase(self, ctx) -> None:
        """Reparametrise the model, fix W_g (``frozen``) and regroup the optimizer at the schedule's current rate."""
        o = self.options
        generator = torch.Generator().manual_seed((int(ctx.cfg.run.seed) * 7919 + 2510) % 2**64)
        self.ranks = reparametrize(ctx.model, o.ratio, o.layers, generator)
        if not self.ranks:
            raise ConfigError(f"method.layers={o.layers}: the model has no such conv / linear layer to reparametrise")
        if o.general == "frozen":
            for p in general_parameters(ctx.model):
                p.requires_grad_(False)
        self.lowrank_params = sum(p.numel() for p in branch_parameters(ctx.model))
        self.active = True
        lr = ctx.base_lr()
        ctx.rebuild_optimizer()
        ctx.set_lr(lr)

    def param_groups(self, model: nn.Module) -> list[dict]:
        if not self.active:
            return super().param_groups(model)
        branch = {"params": branch_parameters(model), "weight_decay": self.branch_weight_decay,
                  "lr_scale": self.options.branch_lr_scale}
        general = [p for p in general_parameters(model) if p.requires_grad]  # none when frozen
        scale = self.options.general_lr_scale if self.options.general == "slow" else 1.0
        return [branch] + ([{"params": general, "lr_scale": scale}] if general else [])

    def first_active_epoch(self) -> int:
        return self.options.start_epoch

    def selectable(self, epoch: int) -> bool:
        return self.active  # a model of the plain part before the phase is not a MORE model

    @property
    def amplitude_raw(self) -> float:
        """``A = A' · C``."""
        return self.options.amplitude * self.num_classes

    def alpha(self, ctx) -> float:
        """``alpha(tau)`` with ``tau`` / ``T`` counted over the phase (from ``start_epoch`` to the end)."""
        o = self.options
        if o.unit == "epoch":
            tau, total = ctx.epoch - o.start_epoch, ctx.cfg.train.epochs - o.start_epoch
        else:
            tau = ctx.step - o.start_epoch * self.steps_per_epoch
            total = (ctx.cfg.train.epochs - o.start_epoch) * self.steps_per_epoch
        return schedule_value(o.schedule, self.amplitude_raw, tau, total)

    def on_epoch_start(self, ctx, epoch: int) -> None:
        if not self.active and epoch >= self.options.start_epoch:
            self._start_phase(ctx)
        self.epoch_acc = self._fresh_epoch()

    def _clock(self) -> float:
        if not self.options.measure_overhead:
            return 0.0
        self._sync()
        return time.perf_counter()

    def training_loss(self, ctx, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        if not self.active:
            return None  # plain training: the trainer's own loss, bit for bit
        alpha = self.alpha(ctx)
        self._step_start = self._clock() if self.options.measure_overhead else None
        self._step_general = alpha != 0.0
        z_full = ctx.model(x)
        z_gen = None
        acc = self.epoch_acc
        if alpha != 0.0:
            start = self._clock()
            z_gen = general_logits(ctx.model, x, self.detach)
            spent = self._clock() - start
            acc["general_s"] += spent
            self.timing["general_s"] += spent
        loss, parts = more_loss(z_full, z_gen, y, self.prior, alpha, ctx.loss_fn, self.options.discrepancy)
        acc["n"] += len(y)
        acc["alpha"] = alpha
        acc["correct"] += int((z_full.detach().argmax(1) == y).sum())
        if "more" in parts:
            acc["loss_more"] += float(parts["more"].detach()) * len(y)
        return loss

    def after_step(self, ctx) -> None:
        if self._step_start is None:
            return
        spent = self._clock() - self._step_start
        self._step_start = None
        if ctx.step == self.options.start_epoch * self.steps_per_epoch:
            return  # the phase's first step carries one-off allocation costs
        key = "with" if self._step_general else "without"
        self.timing[f"{key}_s"] += spent
        self.timing[f"{key}_n"] += 1
        self.epoch_acc["step_s"] += spent
        self.epoch_acc["timed"] += 1

    def on_epoch_end(self, ctx, epoch: int, val: dict | None) -> dict:
        if not self.active:
            return {}
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
        inputs.append(ctx.train_loader.normalize(ctx.data.test.example(32)))
        inputs = [x.to(ctx.device) for x in inputs]
        self.merge_check = check_merge(model, deployed, inputs, self.options.merge_tol)
        test = ctx.data.test
        idx = stratified_indices(test.labels, self.num_classes, BRANCH_SAMPLE)
        groups = {g: ctx.data.groups.indices(g) for g in GROUP_NAMES}
        self.branch = branch_size(model, ctx.train_loader.normalize(test.batch(idx)), test.labels[idx].to(ctx.device),
                                  groups)
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
        o = self.options
        out.update({"amplitude_raw": self.amplitude_raw, "num_classes": self.num_classes,
                    "tau": ("epoch - start_epoch over train.epochs - start_epoch" if o.unit == "epoch"
                            else "optimizer steps since the phase began over the phase's steps"),
                    "phase": {"start_epoch": o.start_epoch, "general": o.general,
                              "general_lr_scale": o.general_lr_scale if o.general == "slow" else 1.0,
                              "branch_lr_scale": o.branch_lr_scale,
                              "branch_weight_decay": self.branch_weight_decay,
                              "general_pass_grad": not self.detach,
                              "batchnorm": "running statistics follow the full path W_g + BA (the merged model's); "
                                           "frozen keeps weights, biases and BN affine parameters fixed"},
                    "init": "B = 0, A ~ U(-1/sqrt(k), 1/sqrt(k))", "rank_rule": "max(1, round_half_up(ratio*min(m,k)))",
                    "layers_reparametrised": len(self.ranks), "lowrank_params": self.lowrank_params,
                    "ranks": dict(self.ranks), "overhead": self.overhead(), "merge_check": self.merge_check,
                    "branch": self.branch})
        return out

    def state_dict(self) -> dict:
        # B and A are model parameters (model.state_dict()); here: the phase flag and the metrics' bookkeeping
        return {"active": self.active, "ranks": dict(self.ranks), "epoch_acc": dict(self.epoch_acc),
                "timing": dict(self.timing)}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if state.get("active", True) and not self.active:  # resuming inside the phase: reparametrise first
            self._start_phase(self._ctx)
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


def stratified_indices(labels: torch.Tensor, num_classes: int, total: int) -> torch.Tensor:
    """The first ``max(1, total // num_classes)`` indices of every class in ``labels``, class by class."""
    per_class = max(1, total // num_classes)
    return torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(num_classes)])


@torch.no_grad()
def branch_size(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None,
                groups: dict[str, list[int]] | None = None) -> dict:
    """How much the low-rank tail component contributes. Per layer ``||B·A||_F / ||W_g||_F`` (all layers, their
    median, max and the layer of the max); in eval mode on ``x``, the branch's share of the logits
    ``mean_i ||z_full_i - z_gen_i|| / mean_i ||z_full_i||`` over all samples and, given labels ``y`` and class
    ``groups`` (name -> class indices, e.g. many / medium / few), over the samples of each group's classes."""
    ratios = {name: float(m.more_delta().norm() / m.weight.norm().clamp_min(1e-12))
              for name, m in lowrank_layers(model)}
    largest = max(ratios, key=ratios.get)
    was = model.training
    model.eval()
    try:
        z_full = model(x).float()
        z_gen = general_logits(model, x).float()
    finally:
        model.train(was)
    moved, size = (z_full - z_gen).norm(dim=1), z_full.norm(dim=1)

    def share(mask: torch.Tensor) -> float | None:
        return round(float(moved[mask].mean() / size[mask].mean().clamp_min(1e-12)), 8) if mask.any() else None

    out = {"weight_ratio": {k: round(v, 8) for k, v in ratios.items()},
           "weight_ratio_median": round(statistics.median(ratios.values()), 8),
           "weight_ratio_max": round(ratios[largest], 8), "weight_ratio_max_layer": largest,
           "logit_share": share(torch.ones_like(moved, dtype=torch.bool)), "samples": len(x)}
    if y is not None and groups:
        masks = {g: torch.isin(y, torch.tensor(classes, dtype=y.dtype, device=y.device)) for g, classes in groups.items()}
        out["logit_share_by_group"] = {g: share(mask) for g, mask in masks.items()}
        out["samples_by_group"] = {g: int(mask.sum()) for g, mask in masks.items()}
    out["note"] = ("||B A||_F / ||W_g||_F per layer; logit_share = mean ||z_full - z_gen|| / mean ||z_full|| on "
                   "test images (by the group of their true class), eval mode")
    return out
