"""``method: do`` -- Decoupled Optimisation (DO; Cong et al., AAAI 2024, ``seeds/003_…``).

Training runs in ``T`` stages over class groups (``stages: 3``: many -> medium -> few from ``ctx.data.groups``;
``order: many-few-medium`` swaps the last two, Table 7; ``stages: 2``: many -> few, Table 6; ``stages: 4``: many ->
medium-top -> medium-low -> few, the medium classes split at their median training count, Table 6). Each stage:

1. **Collaborative Parameter Optimisation (CPO).** The method owns the sampler and the loss:

   * sampler (Eq. 1): a *many* stage samples instances (``p_1 = L[y]``), a *few* stage is class-balanced
     (``p_3 ∝ 1/N_y`` per image = uniform over classes), a *medium*-like stage is ``group_preferred`` with
     ``rho_m`` of every batch from the stage's classes. The trainer's ``train_loader.sampler`` is replaced when a
     stage begins; it is a pure function of the stage index, so a resumed run rebuilds the same sampler.
   * compensation loss (Eq. 2): ``CE(softmax(z - log alpha_t), y)`` with ``alpha_t`` of Eq. 3: ``1`` for a *many*
     stage; ``tau(y) = R(L)[y]`` for a *few* stage, ``R`` reversing the frequency list ``L`` *by frequency rank*
     (the class of rank r gets the frequency of rank K-1-r; identical to reversing the list when classes are
     sorted by count, as in CIFAR-LT); for a *medium* stage Eq. 3 says ``alpha_2 = rho_m``, a constant, which
     would shift every logit equally and leave softmax CE unchanged. We read it, like Eq. 1, per class:
     ``alpha_2(y) = rho_m`` for the stage's classes and ``1 - rho_m`` otherwise (``medium_alpha: per_class``);
     ``medium_alpha: constant`` is the literal (no-op) reading. ``compensation: false`` trains with plain CE
     (Table 8 ablation). The config's ``loss`` must be ``ce`` (prediction uses the raw logits).
   * learning rate: the method **owns the lr schedule** (``train.schedule``/``milestones`` are overridden): stage 1
     is cosine from ``lr[0]`` to 0 over its epochs (with ``train.warmup_epochs`` linear warm-up), later stages use
     the constant ``lr[t]``. It is written into the optimizer at every epoch start and every batch (so a mid-epoch
     resume gets it too); ``metrics.jsonl`` field ``do.lr`` has it (the trainer's own ``lr`` field does not).

2. **Taylor-guided Parameter Decoupling (TPD)**, at the end of every stage but the last:

   * importance ``E_w = sum_b (w · g_b)^2`` of every parameter entry, ``g_b`` the gradient of the stage's
     compensation loss on batch ``b`` of a scoring pass over the *training images of the stage's classes*
     (sequential, unaugmented, ``train.batch_size``, model in eval mode so BatchNorm statistics are not touched;
     at most ``importance_batches`` batches). Scored, frozen and re-initialised are the parameters of every
     non-normalisation layer (conv / linear weights and biases); BatchNorm is kept per sub-model (below).
   * the stage's free entries are ranked (within each tensor, ``rank_scope: layer``, or over all,
     ``global``); the ``gamma[t]`` fraction with the lowest importance is pruned gradually with the cubic
     schedule of Eq. 4 from 0 to ``gamma[t]`` over ``prune_steps`` (Δt = 10) steps, each followed by one training
     iteration (stage sampler and loss, lr ``prune_lr``, default the next stage's lr); ``prune_steps: 0`` prunes
     in one shot. ``gamma`` is the fraction *of the stage's free entries* (paper CIFAR-100 IR 100: 0.5 then 0.8).
     ``gamma_select: sweep`` chooses it instead by the paper's rule: one-shot pruning of 0, 10, ..., 90% of the free
     entries, the validation accuracy on the stage's classes (mean per-class) of each pruned network, and γ_best =
     the ratio just before the largest fall between consecutive ratios (:func:`knee`; "the most compact model with
     the lowest performance drop"); the curve is in ``stages_table[].sweep``.
   * the kept (important) entries are **frozen** for the rest of training: their gradient and SGD momentum entries
     are zeroed after every backward / step and their values restored after every step, so weight decay and
     momentum cannot move them (bit-identical). The pruned entries are re-initialised (a fresh model of the same
     architecture from a seed of ``(run.seed, stage)``), their momentum zeroed, and train in the next stage
     together with the frozen ones (which take part in the forward pass).

3. **Sub-models.** Sub-model ``t`` (``t < T``) is the network with the entries frozen in stages ``1..t`` and zeros
   elsewhere, with its **own BatchNorm state** (affine parameters and running statistics as they are at the end of
   stage ``t``'s pruning, whose retraining iterations run in train mode and adapt them to the pruned network).
   Sub-model ``T`` is the whole final network. They are stored as state dicts (part of the checkpoint) and run
   with ``torch.func.functional_call``.

4. **Inference** (``predict``; the aggregation itself is :mod:`tailwise.models.ensemble`): ``aggregation: average``
   -- the mean of the sub-models' logits (``Ours wo TTL``); ``instance`` -- instance-level test-time learning
   (Eq. 5): per test image ``T`` weights ``lambda = floor + (1 - T floor) softmax(w)`` (``tta_floor`` 0.05 keeps
   every sub-model in play -- the collapse guard of the pitfalls note) from ``tta_steps`` (10) plain gradient-ascent
   steps of size ``tta_lr`` (1.0) on the cosine similarity of the sub-models' weighted softmax mixtures on two
   stochastic views (random crop with ``data.crop_padding`` + flip, seeded by the batch's content) -- the paper
   gives no optimiser settings; ``group`` -- SADE's group-level aggregation (Table 8's ``Agg_gp``): one weight vector
   for all images, learned the same way on the mean similarity over the unlabelled test images at the end of
   training (before that, e.g. for validation during training, the average is used). During training the live
   network stands in for the sub-model of the running stage. ``finalize`` measures the prediction cost per test
   image and, for ``instance``, the mean ``lambda_t`` per class group of the true label (Table 9):
   ``describe()["final"]["test_time"]``; with ``compare_aggregations`` (default) also the test accuracy of the
   same sub-models under each aggregation, ``describe()["final"]["test_by_aggregation"]`` (Table 8's Agg rows),
   and, when the run's own aggregation is not ``instance``, that report for ``instance`` (Table 9's weights and its
   cost): ``describe()["final"]["instance_test_time"]``.

``finalize`` returns a :class:`~tailwise.models.ensemble.SubModelEnsemble` of all ``T`` sub-models with the run's
aggregation: ``model/`` holds every sub-model, ``tailwise eval`` and ``tailwise.load_model`` give the aggregated
prediction, and the reported cost (params, MACs, F) is that of running all of them (F > 100%: DO trades inference
cost for accuracy; ``instance`` adds the two views and the weight steps).

Empty groups: the stage plan is built from ``ctx.data.groups`` (thresholds, or frequency terciles where a threshold
group would be empty, e.g. CIFAR-10). A stage whose group is still empty (e.g. fewer than three classes) is dropped
and its epochs are given to the preceding stage (to the next one, with stage 1's lr, if it is the first);
``describe()["dropped_stages"]`` names them.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import bounded, choice
from ..data.factory import make_eval_loader
from ..data.loader import Sampler, _generator, rank_slice
from ..models.ensemble import AGGREGATIONS, SubModelEnsemble, aggregate, group_weights, view_probabilities
from ..errors import ConfigError, TrainingError
from . import Method, register_method

ORDERS = ("many-medium-few", "many-few-medium")
STAGE_WEIGHTS = {2: (2, 1), 3: (2, 1, 1), 4: (2, 1, 1, 1)}  # paper: 100 / 50 / 50 epochs


@dataclass
class DecoupledOptions:
    stages: int = choice(2, 3, 4, default=3)
    order: str = choice(*ORDERS, default="many-medium-few")  # 3 stages only
    stage_epochs: list[int] | None = None  # default: train.epochs split 2:1:1 (2:1, 2:1:1:1)
    lr: list[float] | None = None  # per stage; default [train.lr, train.lr / 10, ...]
    rho_m: float = bounded(0.7, 0.0, 0.99, low_open=True)
    medium_alpha: str = choice("per_class", "constant", default="per_class")
    compensation: bool = True
    gamma: list[float] | None = None  # per stage but the last; default [0.5, 0.8, 0.8]
    gamma_select: str = choice("fixed", "sweep", default="fixed")
    gamma_min: float = bounded(0.1, 0.0, 0.9, low_open=True)  # sweep: γ_best >= this
    prune_steps: int = bounded(10, 0)  # Δt of Eq. 4; 0 = one shot
    prune_lr: float | None = None  # lr of the retraining iterations; default: the next stage's lr
    rank_scope: str = choice("layer", "global", default="layer")
    importance_batches: int | None = None  # cap on the scoring pass (None: every image of the stage's classes)
    aggregation: str = choice(*AGGREGATIONS, default="average")
    tta_steps: int = bounded(10, 1)  # gradient steps on the per-instance weights
    tta_lr: float = bounded(1.0, 0.0, low_open=True)
    tta_floor: float = bounded(0.05, 0.0)  # lambda_t >= floor (against collapse)
    compare_aggregations: bool = True  # also report the test accuracy of every aggregation (Table 8's Agg rows)


@dataclass
class Stage:
    kind: str  # many | medium | few (the sampler / alpha family)
    name: str  # many | medium | medium-top | medium-low | few
    classes: list[int]
    epochs: int
    start: int  # first epoch (0-based)
    lr: float
    gamma: float | None  # None for the last stage


# ------------------------------------------------------------------------------------------------- pure helpers
def stage_epochs(total: int, n: int, given: list[int] | None = None) -> list[int]:
    """Per-stage epochs: ``given`` or ``total`` split by the paper's 2:1:1 ratio (remainder to stage 1)."""
    if given is not None:
        return list(given)
    w = STAGE_WEIGHTS[n]
    epochs = [total * x // sum(w) for x in w]
    epochs[0] += total - sum(epochs)
    return epochs


def reversed_frequency(counts) -> torch.Tensor:
    """``tau(y) = R(L)[y]``: the class of frequency rank r (descending, ties by label) gets the frequency of rank
    K-1-r."""
    n = torch.as_tensor(list(counts), dtype=torch.float64)
    freq = n / n.sum()
    order = sorted(range(len(n)), key=lambda c: (-float(n[c]), c))
    tau = torch.empty_like(freq)
    for r, c in enumerate(order):
        tau[c] = freq[order[len(order) - 1 - r]]
    return tau


def stage_alpha(kind: str, classes, counts, rho_m: float, medium_alpha: str = "per_class") -> torch.Tensor:
    """``alpha_t`` of Eq. 3 per class (float64)."""
    k = len(counts)
    if kind == "many":
        return torch.ones(k, dtype=torch.float64)
    if kind == "few":
        return reversed_frequency(counts)
    if medium_alpha == "constant":
        return torch.full((k,), rho_m, dtype=torch.float64)
    alpha = torch.full((k,), 1.0 - rho_m, dtype=torch.float64)
    alpha[list(classes)] = rho_m
    return alpha


def compensation_loss(logits: torch.Tensor, y: torch.Tensor, log_alpha: torch.Tensor) -> torch.Tensor:
    """Eq. 2: mean over the batch of ``-log softmax(z - log alpha)[y]``."""
    return F.cross_entropy(logits.float() - log_alpha.to(logits.device, torch.float32), y)


def cubic_ratio(k: int, steps: int, start: float, end: float) -> float:
    """Eq. 4: ``end + (start - end) (1 - k / steps)^3`` (``start`` at k = 0, ``end`` at k = steps)."""
    return end + (start - end) * (1.0 - k / steps) ** 3


def stage_lr(stage: Stage, epoch: int, warmup: int) -> float:
    """Stage 1 (index start 0): cosine from ``stage.lr`` to 0 with linear warm-up; later stages constant."""
    if stage.start != 0:
        return stage.lr
    e = epoch - stage.start
    if e < warmup:
        return stage.lr * (e + 1) / warmup
    span = max(1, stage.epochs - warmup)
    t = min(1.0, (e - warmup) / span)
    return stage.lr * (1 + math.cos(math.pi * t)) / 2


def knee(ratios: list[float], accuracy: list[float]) -> float:
    """γ_best: the ratio just before the largest fall of ``accuracy`` between consecutive ratios (the most compact
    model before the marked drop); ``ratios[0]`` when accuracy never falls."""
    falls = [accuracy[i] - accuracy[i + 1] for i in range(len(ratios) - 1)]
    i = max(range(len(falls)), key=lambda j: (falls[j], -j))
    return ratios[i] if falls[i] > 0 else ratios[0]


def decoupled_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters of every non-normalisation module (conv / linear weights and biases)."""
    norm = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    out = []
    for mname, module in model.named_modules():
        if isinstance(module, norm):
            continue
        for pname, p in module.named_parameters(recurse=False):
            out.append((f"{mname}.{pname}" if mname else pname, p))
    return out


def select_pruned(scores: list[torch.Tensor], free: list[torch.Tensor], ratio: float, scope: str) -> list[torch.Tensor]:
    """Boolean masks of the ``ratio`` fraction of ``free`` entries with the lowest score (per tensor or global).
    Ties broken by position (stable), so the masks are nested in ``ratio``."""
    out = []
    if scope == "global":
        flat = torch.cat([s.flatten()[f.flatten()] for s, f in zip(scores, free)])
        k = int(math.floor(ratio * len(flat) + 0.5))  # half up
        chosen = torch.zeros(len(flat), dtype=torch.bool)
        chosen[torch.argsort(flat, stable=True)[:k]] = True
        offset = 0
        for f in free:
            m = torch.zeros(f.numel(), dtype=torch.bool)
            idx = f.flatten().nonzero().flatten()
            m[idx] = chosen[offset:offset + len(idx)]
            offset += len(idx)
            out.append(m.view_as(f))
        return out
    for s, f in zip(scores, free):
        idx = f.flatten().nonzero().flatten()
        k = int(math.floor(ratio * len(idx) + 0.5))  # half up
        m = torch.zeros(f.numel(), dtype=torch.bool)
        m[idx[torch.argsort(s.flatten()[idx], stable=True)[:k]]] = True
        out.append(m.view_as(f))
    return out


# ------------------------------------------------------------------------------------------------------ method
@register_method
class Decoupled(Method):
    name = "do"
    summary = ("DO: stages many -> medium -> few with group-preferred sampling and a compensation loss, Taylor-guided "
               "decoupling freezes each stage's important weights, sub-models aggregated at test time")
    Options = DecoupledOptions

    def __init__(self, options: DecoupledOptions):
        super().__init__(options)
        self.stage = 0
        self.owner: list[torch.Tensor] = []  # per decoupled tensor, int8: 0 free, t frozen at the end of stage t
        self.frozen_values: list[torch.Tensor] = []
        self.submodels: list[dict] = []  # state dicts of sub-models 1..T-1 (T: the live network)
        self.records: list[dict] = []
        self._mode: int | None = None  # predict with one sub-model only (0-based), or None: aggregate
        self._pruned: list[torch.Tensor] | None = None  # during the gradual pruning
        self._override: dict | None = None  # a state dict predict uses instead (the γ sweep)
        self.group_lambda: torch.Tensor | None = None  # aggregation: group, learned in finalize

    @classmethod
    def check_options(cls, o: DecoupledOptions, cfg) -> None:
        if cfg.loss.name != "ce":
            raise ConfigError(f"method do trains with its own compensation loss and predicts with raw logits; set "
                              f"loss.name=ce (got {cfg.loss.name})")
        if cfg.train.sampler != "instance":
            raise ConfigError("method do sets the sampler of every stage itself; leave train.sampler=instance")
        if o.stage_epochs is not None:
            if len(o.stage_epochs) != o.stages or any(e < 1 for e in o.stage_epochs):
                raise ConfigError(f"method.stage_epochs must be {o.stages} positive numbers, got {o.stage_epochs}")
            if sum(o.stage_epochs) != cfg.train.epochs:
                raise ConfigError(f"method.stage_epochs {o.stage_epochs} sum to {sum(o.stage_epochs)}, not "
                                  f"train.epochs ({cfg.train.epochs})")
        elif cfg.train.epochs < 2 * o.stages:
            raise ConfigError(f"train.epochs ({cfg.train.epochs}) is too short for {o.stages} DO stages; use at least "
                              f"{2 * o.stages} or set method.stage_epochs")
        if o.lr is not None and (len(o.lr) != o.stages or any(x <= 0 for x in o.lr)):
            raise ConfigError(f"method.lr must be {o.stages} positive learning rates, got {o.lr}")
        if o.gamma is not None and (len(o.gamma) != o.stages - 1 or any(not 0 < g < 1 for g in o.gamma)):
            raise ConfigError(f"method.gamma must be {o.stages - 1} pruning ratios in (0, 1), got {o.gamma} (with 0 "
                              "the next stage would have no free parameters to train)")
        if o.aggregation != "average" and o.tta_floor * o.stages >= 1:
            raise ConfigError(f"method.tta_floor {o.tta_floor} x {o.stages} stages must be below 1")
        if o.order != "many-medium-few" and o.stages != 3:
            raise ConfigError("method.order applies to stages=3 only")

    # -------------------------------------------------------------------------------------------- the plan
    def plan(self, ctx) -> list[Stage]:
        o, cfg = self.options, ctx.cfg
        groups, counts = ctx.data.groups, list(ctx.data.class_counts)
        many, medium, few = (groups.indices(g) for g in ("many", "medium", "few"))
        if o.stages == 2:
            spec = [("many", "many", many), ("few", "few", few)]
        elif o.stages == 4:
            ranked = sorted(medium, key=lambda c: (-counts[c], c))
            half = (len(ranked) + 1) // 2
            spec = [("many", "many", many), ("medium", "medium-top", sorted(ranked[:half])),
                    ("medium", "medium-low", sorted(ranked[half:])), ("few", "few", few)]
        else:
            spec = [("many", "many", many), ("medium", "medium", medium), ("few", "few", few)]
            if o.order == "many-few-medium":
                spec = [spec[0], spec[2], spec[1]]
        epochs = stage_epochs(cfg.train.epochs, o.stages, o.stage_epochs)
        lrs = list(o.lr or [cfg.train.lr] + [cfg.train.lr / 10] * (o.stages - 1))
        gammas = (o.gamma or [0.5, 0.8, 0.8][:o.stages - 1]) + [None]
        self.dropped = []
        kept: list[list] = []
        for i, ((kind, name, classes), e, lr, gamma) in enumerate(zip(spec, epochs, lrs, gammas)):
            if classes:
                kept.append([kind, name, classes, e, lr, gamma])
            else:
                self.dropped.append(name)
                target = kept[-1] if kept else None
                if target is not None:
                    target[3] += e
                else:  # the first stage is empty: its epochs and (cosine) lr go to the next one
                    epochs[i + 1] += e
                    lrs[i + 1] = lr
        if not kept:
            raise TrainingError("method do: every class group is empty")
        kept[-1][5] = None
        stages, start = [], 0
        for kind, name, classes, e, lr, gamma in kept:
            stages.append(Stage(kind, name, list(classes), e, start, lr, gamma))
            start += e
        return stages

    def stage_at(self, epoch: int) -> int:
        return max(i for i, s in enumerate(self.stages) if s.start <= epoch)

    def sampler_for(self, ctx, t: int) -> Sampler:
        s, cfg = self.stages[t], ctx.cfg
        labels = ctx.data.train.labels
        kind = {"many": "instance", "few": "class_balanced", "medium": "group_preferred"}[s.kind]
        return Sampler(labels, kind, cfg.run.seed, cfg.train.batch_size, rho=self.options.rho_m,
                       group_classes=s.classes)

    # ---------------------------------------------------------------------------------------------- set-up
    def setup(self, ctx) -> None:
        if ctx.trainer is None:
            raise TrainingError("method do needs the trainer (its loader and optimizer)")
        self.ctx = ctx
        self.stages = self.plan(ctx)
        counts = list(ctx.data.class_counts)
        self.log_alpha = []
        for s in self.stages:
            a = stage_alpha(s.kind, s.classes, counts, self.options.rho_m, self.options.medium_alpha)
            self.log_alpha.append(a.log().float() if self.options.compensation else torch.zeros(len(counts)))
        self.params = decoupled_parameters(ctx.model)
        self.owner = [torch.zeros(p.shape, dtype=torch.int8, device=p.device) for _, p in self.params]
        self.frozen_values = [torch.zeros_like(p.detach()) for _, p in self.params]
        self._masks()
        ctx.trainer.train_loader.sampler = self.sampler_for(ctx, 0)

    def _masks(self) -> None:
        """Float 0/1 tensors multiplying the decoupled tensors: 1 where free (and not being pruned)."""
        free = [(o == 0) for o in self.owner]
        if self._pruned is not None:
            free = [f & ~p.to(f.device) for f, p in zip(free, self._pruned)]
        self.free_f = [f.to(p.dtype) for f, (_, p) in zip(free, self.params)]
        self.any_frozen = any(bool((o != 0).any()) for o in self.owner) or self._pruned is not None

    def current_lr(self, epoch: int) -> float:
        return stage_lr(self.stages[self.stage], epoch, self.ctx.cfg.train.warmup_epochs)

    def _set_lr(self, optimizer, lr: float) -> None:
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    # ----------------------------------------------------------------------------------------------- hooks
    def on_epoch_start(self, ctx, epoch: int) -> None:
        self._set_lr(ctx.optimizer, self.current_lr(epoch))

    def training_loss(self, ctx, x, y):
        self._set_lr(ctx.optimizer, self.current_lr(ctx.epoch))  # also right after a mid-epoch resume
        logits = ctx.model(x)
        return compensation_loss(logits, y, self.log_alpha[self.stage]), logits

    def after_backward(self, ctx) -> None:
        if not self.any_frozen:
            return
        pairs = [(p.grad, m) for (_, p), m in zip(self.params, self.free_f) if p.grad is not None]
        if pairs:
            torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])

    @torch.no_grad()
    def after_step(self, ctx) -> None:
        if not self.any_frozen:
            return
        tensors = [p.data for _, p in self.params]
        torch._foreach_mul_(tensors, self.free_f)  # pruned entries -> 0, frozen -> 0 then restored
        torch._foreach_add_(tensors, self.frozen_values)
        states, masks = [], []
        for (_, p), m in zip(self.params, self.free_f):
            for value in ctx.optimizer.state.get(p, {}).values():
                if torch.is_tensor(value) and value.shape == p.shape:
                    states.append(value)
                    masks.append(m)
        if states:
            torch._foreach_mul_(states, masks)

    def on_epoch_end(self, ctx, epoch: int, val: dict | None) -> dict:
        s = self.stages[self.stage]
        record = {"stage": self.stage + 1, "group": s.name, "lr": self.current_lr(epoch)}
        if epoch == s.start + s.epochs - 1 and self.stage < len(self.stages) - 1:
            record["decoupling"] = self.decouple(ctx, epoch)
        return {"do": record}

    # ------------------------------------------------------------------------------------------ decoupling
    def importance(self, ctx) -> list[torch.Tensor]:
        """``sum_b (w · g_b)^2`` over the scoring pass of the stage's classes (eval mode, unaugmented); under data
        parallelism the batches are shared out and the sums added, so every process gets the whole sum."""
        s, model, tr = self.stages[self.stage], ctx.model, ctx.trainer
        member = torch.zeros(ctx.data.num_classes, dtype=torch.bool)
        member[s.classes] = True
        idx = torch.where(member[ctx.data.train.labels])[0]
        bs = ctx.cfg.train.batch_size
        if self.options.importance_batches is not None:
            idx = idx[:self.options.importance_batches * bs]
        # data parallelism: each process scores a contiguous run of whole batches; the sums are added up
        count = -(-len(idx) // bs)
        mine = range(count)[rank_slice(count, ctx.dist.rank, ctx.dist.world)]
        idx = idx[mine.start * bs:mine.stop * bs]
        loader = make_eval_loader(ctx.data.train.subset(idx), bs, tr.mean, tr.std, ctx.device,
                                  tr.train_loader.channels_last, ctx.cfg.run.workers)
        scores = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for _, p in self.params]
        was = model.training
        model.eval()
        try:
            for x, y in loader:
                loss = compensation_loss(model(x), y, self.log_alpha[self.stage])
                grads = torch.autograd.grad(loss, [p for _, p in self.params], allow_unused=True)
                for sc, g, (_, p) in zip(scores, grads, self.params):
                    if g is not None:
                        sc.add_((p.detach() * g).double().pow(2))
        finally:
            model.train(was)
        return ctx.dist.sum_all_(scores)

    def _retrain_step(self, ctx, x, y) -> float:
        opt = ctx.optimizer
        logits = ctx.model(x)
        loss = compensation_loss(logits, y, self.log_alpha[self.stage])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        self.after_backward(ctx)
        opt.step()
        self.after_step(ctx)
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def decouple(self, ctx, epoch: int) -> dict:
        """TPD at the end of stage ``self.stage``; then move to the next stage."""
        o, t, s = self.options, self.stage, self.stages[self.stage]
        cpo = self._eval_live(ctx)
        scores = [sc.cpu() for sc in self.importance(ctx)]
        free = [(ow == 0).cpu() for ow in self.owner]
        gamma, sweep = s.gamma, None
        if o.gamma_select == "sweep":
            gamma, sweep = self.sweep(ctx, scores, free)
        # gradual pruning (Eq. 4), each step followed by one training iteration
        steps = o.prune_steps
        lr = o.prune_lr if o.prune_lr is not None else self.stages[t + 1].lr
        loader = ctx.trainer.train_loader
        sampler = self.sampler_for(ctx, t)
        key = 1_000_000 + t  # a private epoch key: these batches never collide with a training epoch's
        indices = sampler.epoch_indices(key)
        g = _generator(ctx.cfg.run.seed, key, 1)
        bs = ctx.cfg.train.batch_size
        ctx.model.train()
        losses = []
        self._set_lr(ctx.optimizer, lr)
        for k in range(1, max(steps, 1) + 1):
            ratio = cubic_ratio(k, steps, 0.0, gamma) if steps > 0 else gamma
            self._pruned = select_pruned(scores, free, ratio, o.rank_scope)
            self._masks()
            self.after_step(ctx)  # zero the pruned entries (weights and momentum) now
            if steps > 0:
                j = ((k - 1) * bs) % max(1, len(indices))
                batch = indices[j:j + bs]
                x = loader.augmented_batch(batch, g)  # the training augmentation, policy included
                y = ctx.data.train.labels[batch].to(ctx.device)
                losses.append(self._retrain_step(ctx, loader.normalize(x), y))
        pruned = self._pruned
        # freeze the important entries, store sub-model t, re-initialise the pruned ones
        with torch.no_grad():
            for i, ((_, p), f, pr) in enumerate(zip(self.params, free, pruned)):
                keep = (f & ~pr).to(p.device)
                self.owner[i][keep] = t + 1
                frozen = (self.owner[i] != 0).to(p.dtype)
                self.frozen_values[i] = p.detach() * frozen
            sub = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
            names = {name: i for i, (name, _) in enumerate(self.params)}
            for name, i in names.items():
                sub[name] = sub[name] * (self.owner[i] != 0).to(sub[name].dtype)
            self.submodels.append(sub)
            self._pruned = None
            self._masks()
            self._reinitialise(ctx, pruned, t)
        tpd = self._eval_submodel(ctx, t)
        n_total = sum(p.numel() for _, p in self.params)
        frozen_now = sum(int((ow != 0).sum()) for ow in self.owner)
        record = {"epoch": epoch, "stage": t + 1, "group": s.name, "gamma": gamma, "sweep": sweep,
                  "prune_steps": steps, "prune_lr": lr, "retrain_loss": losses, "frozen_fraction": frozen_now / n_total,
                  "stage_fraction": sum(int((ow == t + 1).sum()) for ow in self.owner) / n_total,
                  "val_cpo": cpo, "val_tpd": tpd}
        self.records.append(record)
        self.stage += 1
        loader.sampler = self.sampler_for(ctx, self.stage)
        self._set_lr(ctx.optimizer, self.current_lr(epoch + 1))
        return record

    def sweep(self, ctx, scores, free) -> tuple[float, dict | None]:
        """γ_best (paper): one-shot pruning of 0, 10, ..., 90% of the free entries, the validation accuracy of the
        pruned network on the stage's classes (mean per-class) for each, and :func:`knee` of that curve."""
        s = self.stages[self.stage]
        ratios = [i / 10 for i in range(10)]
        accs = []
        base = dict(ctx.model.state_dict())
        for r in ratios:
            pruned = select_pruned(scores, free, r, self.options.rank_scope)
            state = dict(base)
            for (name, p), pr in zip(self.params, pruned):
                state[name] = p.detach() * (~pr).to(p.device, p.dtype)
            self._override = state
            try:
                acc = ctx.evaluate("val")
            finally:
                self._override = None
            if acc is None:
                return s.gamma, {"note": "no validation split: the fixed gamma is used"}
            vals = [acc["per_class"][c] for c in s.classes]
            vals = [v for v in vals if v is not None and v == v]  # classes without validation images: NaN
            accs.append(sum(vals) / len(vals) if vals else 0.0)
        best = knee(ratios, accs)
        gamma = max(best, self.options.gamma_min)  # γ = 0 would leave the next stage nothing to train
        return gamma, {"ratios": ratios, "accuracy": [round(a, 4) for a in accs], "knee": best}

    @torch.no_grad()
    def _reinitialise(self, ctx, pruned: list[torch.Tensor], t: int) -> None:
        model = ctx.model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(ctx.cfg.run.seed) * 1_000_003 + 7919 * (t + 1))
            if hasattr(model, "arch"):
                from ..models import build_model
                fresh = build_model(**model.arch)
            else:
                fresh = copy.deepcopy(model).cpu()
                for m in fresh.modules():
                    if hasattr(m, "reset_parameters"):
                        m.reset_parameters()
        new = dict(fresh.named_parameters())
        for (name, p), pr in zip(self.params, pruned):
            pr = pr.to(p.device)
            p.data[pr] = new[name].detach().to(p.device, p.dtype)[pr]
            for value in ctx.optimizer.state.get(p, {}).values():
                if torch.is_tensor(value) and value.shape == p.shape:
                    value[pr] = 0

    # ---------------------------------------------------------------------------------------------- predict
    def _forward(self, ctx, t: int, x: torch.Tensor) -> torch.Tensor:
        if self._override is not None:
            return torch.func.functional_call(ctx.model, self._override, (x,), strict=False)
        if t < len(self.submodels):
            return torch.func.functional_call(ctx.model, self.submodels[t], (x,), strict=False)
        return ctx.model(x)

    def _tta(self, ctx) -> dict:
        """The aggregation settings (views: the training crop padding and flip, without the policy)."""
        o = self.options
        aug = getattr(ctx.trainer.train_loader, "augment", None) if ctx.trainer is not None else None
        pad, flip = (aug.crop_padding, aug.flip) if aug is not None else (4, True)
        return {"steps": o.tta_steps, "lr": o.tta_lr, "floor": o.tta_floor, "padding": pad, "flip": flip,
                "seed": int(ctx.cfg.run.seed)}

    def aggregate(self, ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(logits, lambda)``: the aggregated prediction and the ``B x T`` weights (None for ``average``)."""
        n = len(self.submodels) + 1  # the completed sub-models and the live network
        return aggregate(lambda t, v: self._forward(ctx, t, v), n, x, self.options.aggregation,
                         group_lambda=self.group_lambda, **self._tta(ctx))

    def predict(self, ctx, x: torch.Tensor) -> torch.Tensor:
        if isinstance(ctx.model, SubModelEnsemble):  # the deployed ensemble (finalize) aggregates by itself
            return ctx.model(x)
        if self._mode is not None or self._override is not None:
            return self._forward(ctx, self._mode or 0, x)
        return self.aggregate(ctx, x)[0]

    @torch.no_grad()
    def learn_group_weights(self, ctx, split: str = "test") -> list[float] | None:
        """SADE's group-level weights from ``split``'s images, without their labels."""
        data = {"val": ctx.data.val, "test": ctx.data.test}[split]
        if data is None:
            return None
        tr, tta, n = ctx.trainer, self._tta(ctx), len(self.submodels) + 1
        loader = make_eval_loader(data, ctx.cfg.train.eval_batch_size, tr.mean, tr.std, ctx.device,
                                  workers=ctx.cfg.run.workers)
        was = ctx.model.training
        ctx.model.eval()
        try:
            views = [view_probabilities(lambda t, v: self._forward(ctx, t, v), n, x, tta["padding"], tta["flip"],
                                        tta["seed"]) for x, _ in loader]
        finally:
            ctx.model.train(was)
        return [round(float(v), 6) for v in group_weights(views, tta["steps"], tta["lr"], tta["floor"])]

    @torch.no_grad()
    def aggregation_report(self, ctx, split: str = "test") -> dict:
        """Table 9 (mean lambda_t per class group of the true label, ``instance`` only) and the prediction cost per
        image of the aggregation in use, measured over ``split``."""
        import time

        data = {"val": ctx.data.val, "test": ctx.data.test}[split]
        if data is None:
            return {}
        tr = ctx.trainer
        loader = make_eval_loader(data, ctx.cfg.train.eval_batch_size, tr.mean, tr.std, ctx.device,
                                  workers=ctx.cfg.run.workers)
        was = ctx.model.training
        ctx.model.eval()
        lams, elapsed = [], 0.0
        sync = (lambda: torch.cuda.synchronize(ctx.device)) if ctx.device.type == "cuda" else (lambda: None)
        try:
            for x, _ in loader:
                sync()
                start = time.perf_counter()
                _, lam = self.aggregate(ctx, x)
                sync()
                elapsed += time.perf_counter() - start
                if lam is not None:
                    lams.append(lam.cpu())
        finally:
            ctx.model.train(was)
        out = {"aggregation": self.options.aggregation, "split": split,
               "ms_per_image": round(1000 * elapsed / max(1, len(data)), 4)}
        if lams:
            lam = torch.cat(lams).double()
            member = ctx.data.groups.membership
            table = {}
            for g in ("many", "medium", "few"):
                rows = torch.tensor([member[int(c)] == g for c in data.labels])
                if rows.any():
                    table[g] = [round(float(v), 4) for v in lam[rows].mean(0)]
            out["mean_lambda_per_group"] = table  # Table 9: one list (lambda_1..T) per group
        return out

    def _summary(self, acc: dict | None) -> dict | None:
        if acc is None:
            return None
        return {k: acc.get(k) for k in ("all", "many", "medium", "few", "balanced")}

    def _eval_live(self, ctx) -> dict | None:
        self._mode = len(self.submodels)
        try:
            return self._summary(ctx.evaluate("val"))
        finally:
            self._mode = None

    def _eval_submodel(self, ctx, t: int) -> dict | None:
        self._mode = t
        try:
            return self._summary(ctx.evaluate("val"))
        finally:
            self._mode = None

    def _compare_aggregations(self, ctx) -> tuple[dict, dict]:
        """Test accuracy of the same sub-models under every aggregation (group weights learned if needed), and
        the ``instance`` aggregation's report (Table 9's weights, its cost), whatever the run's aggregation."""
        chosen, learned = self.options.aggregation, self.group_lambda
        out, instance = {}, {}
        try:
            for mode in AGGREGATIONS:
                self.options.aggregation = mode
                if mode == "group" and self.group_lambda is None:
                    self.group_lambda = torch.tensor(self.learn_group_weights(ctx, "test"))
                out[mode] = self._summary(ctx.evaluate("test"))
                if mode == "instance":
                    instance = self.aggregation_report(ctx, "test")
        finally:
            self.options.aggregation, self.group_lambda = chosen, learned
        return out, instance

    def finalize(self, ctx) -> nn.Module:
        """The deployable :class:`SubModelEnsemble` of all sub-models with this run's aggregation (group
        weights learned first, from the test images without labels, as SADE does)."""
        if self.options.aggregation == "group":
            self.group_lambda = torch.tensor(self.learn_group_weights(ctx, "test"))
        self.final = {"val_last_stage": self._eval_live(ctx),
                      "submodels_val": [self._eval_submodel(ctx, t) for t in range(len(self.submodels))],
                      "test_time": self.aggregation_report(ctx, "test")}
        if self.group_lambda is not None:
            self.final["group_lambda"] = self.group_lambda.tolist()
        if self.options.compare_aggregations:
            self.final["test_by_aggregation"], instance = self._compare_aggregations(ctx)
            if self.options.aggregation != "instance":
                self.final["instance_test_time"] = instance  # Table 9 for every run
        members = []
        for t in range(len(self.submodels) + 1):
            member = copy.deepcopy(ctx.model).eval()
            if t < len(self.submodels):
                member.load_state_dict(self.submodels[t])
            members.append(member)
        lam = self.group_lambda.tolist() if self.group_lambda is not None else None
        return SubModelEnsemble(members, self.options.aggregation, group_lambda=lam, **self._tta(ctx))

    # ---------------------------------------------------------------------------------------------- results
    def describe(self) -> dict:
        out = {**super().describe()}
        if hasattr(self, "stages"):
            out["plan"] = [{"stage": i + 1, "group": s.name, "kind": s.kind, "classes": s.classes,
                            "epochs": s.epochs, "start_epoch": s.start, "lr": s.lr, "gamma": s.gamma,
                            "sampler": {"many": "instance", "few": "class_balanced",
                                        "medium": f"group_preferred(rho={self.options.rho_m})"}[s.kind]}
                           for i, s in enumerate(self.stages)]
            out["dropped_stages"] = self.dropped
            out["lr_schedule"] = "owned by the method (stage 1 cosine to 0, later stages constant)"
        keys = ("stage", "group", "gamma", "sweep", "frozen_fraction", "stage_fraction", "val_cpo", "val_tpd")
        out["stages_table"] = [{k: r.get(k) for k in keys} for r in self.records]  # Table 7's CPO / TPD rows
        if hasattr(self, "final"):
            out["final"] = self.final
        out["predict"] = {"average": "average of sub-model logits",
                          "instance": "instance-level test-time aggregation (Eq. 5) of sub-model logits",
                          "group": "group-level (SADE) test-time aggregation: one weight per sub-model, learned on "
                                   "the unlabelled test images"}[self.options.aggregation]
        out["deployed"] = "model/: every sub-model and the aggregation (tailwise.load_model gives the ensemble)"
        return out

    def state_dict(self) -> dict:
        return {"stage": self.stage, "owner": [o.cpu().clone() for o in self.owner],
                "frozen_values": [v.cpu().clone() for v in self.frozen_values],
                "submodels": [{k: v.cpu().clone() for k, v in s.items()} for s in self.submodels],
                "records": list(self.records)}

    def load_state_dict(self, state: dict) -> None:
        self.stage = int(state["stage"])
        self.owner = [o.to(p.device, torch.int8) for o, (_, p) in zip(state["owner"], self.params)]
        self.frozen_values = [v.to(p.device, p.dtype) for v, (_, p) in zip(state["frozen_values"], self.params)]
        dev = self.ctx.device
        self.submodels = [{k: v.to(dev) for k, v in s.items()} for s in state["submodels"]]
        self.records = list(state["records"])
        self._pruned = None
        self._masks()
        self.ctx.trainer.train_loader.sampler = self.sampler_for(self.ctx, self.stage)
