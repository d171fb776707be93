"""``method: do``: the trainer adapter of DO (Decoupled Optimisation; Cong et al., AAAI 2024, ``seeds/003_…``).

:class:`DOMethod` translates the trainer's hooks into calls on the standalone pieces: the stage plan
(:mod:`.plan`), the compensation loss (:mod:`.loss`), the :class:`~.decoupler.Decoupler` with its freeze masks,
the pruning schedule (:mod:`.schedule`), BatchNorm recomputation (:mod:`.batchnorm`), the stage batches
(:mod:`.batches`) and the :class:`~tailwise.models.ensemble.SubModelEnsemble` (:mod:`.report`). Every training
step, the decoupling's retraining steps included, is the trainer's own step (``ctx.train_step``: autocast, loss
scaling, clipping, data-parallel sync).

Each stage:

1. **Collaborative Parameter Optimisation.** The method owns the sampler (Eq. 1, :func:`.plan.stage_sampler`;
   ``few_sampler`` picks the reading of ``p_3 = 1/N_y``: ``per_image``, the default and what tailwise always did,
   draws each image with probability proportional to ``1/N_y``, i.e. uniformly over classes; ``per_class`` draws
   a class with probability proportional to ``1/N_y``), the loss (Eq. 2 with ``alpha_t`` of Eq. 3,
   :mod:`.loss`; ``compensation: false`` is plain CE, Table 8) and the learning rate: stage 1 is cosine from
   ``lr[0]`` to 0 (with ``train.warmup_epochs``), later stages constant ``lr[t]``; it is written into the
   optimizer at every step (so a mid-epoch resume gets it too) and logged as ``do.lr``.

2. **Taylor-guided Parameter Decoupling**, at the end of every stage but the last: importance ``sum_b (w g_b)^2``
   over the training images of the stage's classes (unaugmented, eval mode, at most ``importance_batches``
   batches; shared out under data parallelism and summed); the ``gamma[t]`` fraction of the free entries with
   the lowest importance (``rank_scope``) is pruned gradually by Eq. 4 (``prune_schedule: per_increment``, the
   paper: ``prune_steps`` = Δt retraining steps after every ``prune_grid`` increment of γ, 50 steps to reach 0.5
   at the defaults; ``spread``: ``prune_steps`` over the whole ramp, tailwise before issue #22; ``prune_steps: 0``
   one shot), each step followed by one training step with the stage's sampler, augmentation and loss at
   ``prune_lr`` (default: the next stage's lr). ``gamma_select: sweep`` picks γ by the paper's rule instead
   (:func:`.schedule.knee` over one-shot pruning at 0..90%, mean per-class validation accuracy on the stage's
   classes; ``stages_table[].sweep``). The kept entries are frozen for the rest of training (bit-identical); the
   pruned ones are re-initialised from a fresh model seeded by ``(run.seed, stage)``.

   ``exempt`` (the paper is silent on the classifier): ``classifier`` (default) leaves the last linear layer out
   of decoupling, so it is never frozen, pruned or re-initialised and every sub-model carries the whole
   classifier as it was at its decoupling; ``classifier_bias`` exempts its bias only; ``none`` decouples it like
   every other tensor (tailwise before issue #22). Why ``classifier``: on the 200-epoch CIFAR-10-LT run with
   ``none``, sub-model 2 scored 2.5% on the few classes, whose classifier rows kept 3-7 of 64 weights and whose
   biases were zero, because the classifier is scored on the current group's images only; exempting the bias
   alone leaves those rows sparse, and the classifier is 0.14% of ResNet-32's weights. ``exempt_probe`` (default
   on) makes the choice by validation accuracy within every run, at no extra training: at each decoupling it also
   evaluates the new sub-model as the stricter readings would leave its classifier (:mod:`.probe`; the same
   importance pass scores the classifier; the kept entries are exactly a stricter run's at the first decoupling,
   but the accuracy is not: such a run would retrain 50 steps with the other entries at zero and let the rest of
   the network adapt, so the probe is a pessimistic estimate of the stricter readings), in
   ``stages_table[].exempt_probe`` beside ``val_tpd``. The probe records raw logits; read with the default
   ``prior_correction: sampler`` (``benchmarks/do_exempt_probe.py`` from a checkpoint), ``classifier`` won every
   decoupling measured on the 200-epoch CIFAR-10-LT runs (validation All: sub-model 1 65.8 vs 64.6 / 64.4 for
   ``classifier_bias`` / ``none`` on seed 0, 63.4 vs 62.0 / 62.2 on seed 1; sub-model 2 of seed 1 62.4 vs 54.6 /
   54.8), so it stays the default. With raw logits (``prior_correction: none``) the stricter readings led on the
   mean of the two seeds (sub-model 1 by 0.5-0.6 points, sub-model 2 by 1.9-2.2).

3. **Sub-models.** Sub-model ``t < T`` is the network with the entries frozen in stages ``1..t`` (exempt tensors
   whole) and zeros elsewhere, its BatchNorm affine parameters as at its decoupling and its BatchNorm statistics
   **recomputed** (:func:`tailwise.methods.batchnorm.recompute_batchnorm`) on ``bn_batches`` batches (default:
   one epoch) of the stage's sampler under the stage's training augmentation (RandAugment included where the run
   uses it); ``bn_batches: 0`` keeps the statistics the retraining left (before issue #22). Sub-model ``T`` is the final
   network. They are stored as state dicts (in the checkpoint) and run with ``torch.func.functional_call``.
   ``metrics.jsonl`` (``do.decoupling``) and ``stages_table`` record per stage: ``val_cpo`` (the network after
   collaborative optimisation), ``val_tpd_stale`` (the new sub-model with the statistics the retraining left)
   and ``val_tpd`` (with recomputed ones), each with the many / medium / few groups.

4. **Prediction** (:func:`~tailwise.models.ensemble.aggregate`): ``predict`` always aggregates the completed
   sub-models and the live network, each first adjusted by ``prior_correction`` (below), with ``aggregation``
   (``average``: mean of the logits, the paper's "Ours wo TTL"; ``instance``: Eq. 5 per image, ``tta_steps``
   gradient steps of size ``tta_lr`` with floor ``tta_floor`` -- the paper gives no optimiser settings;
   ``group``: SADE's weights, learned on the unlabelled test images in ``finalize``, the average before); a
   deployed :class:`SubModelEnsemble` predicts by itself. Single networks (one sub-model, a pruned candidate) are
   evaluated by passing their forward to ``ctx.evaluate`` explicitly.
   ``finalize`` returns the ensemble of all ``T`` sub-models and reports ``describe()["final"]``: each sub-model's
   validation accuracy, the prediction cost and (``instance``) Table 9's mean weights per group, and with
   ``compare_aggregations`` the test accuracy under every aggregation (separate ensembles over the same members;
   the options are not touched) and the ``instance`` report whatever the run's own aggregation.

   ``prior_correction`` (beyond the paper, which aggregates raw logits): every stage trains under another label
   distribution ``pi_t`` (:func:`.plan.stage_log_prior`: the instance sampler's ``N_y / N``, the group-preferred
   sampler's ``rho_m`` share of the group, the few stage's class-balanced draw), so sub-model ``t`` carries
   ``log pi_t`` in its logits: sub-model 1 is a many-class model biased by the imbalance itself.
   ``sampler`` (default) subtracts it before aggregating -- post-hoc logit adjustment (Menon et al., ICLR
   2021) per sub-model; the compensation loss's ``alpha_t`` stays in (it is the paper's intended bias, and
   removing it cost the few-stage sub-model 3.2 points of test accuracy on seed 0). ``none`` is the paper.
   Measured on the fixed DO's CIFAR-10-LT seed-0 run (test, no retraining): sub-model 1 alone 56.06 -> 64.99,
   sub-model 2 50.51 -> 63.07, the average 66.35 -> 71.68 (few 44.23 -> 66.30). The per-epoch validation
   accuracy is ``predict``'s, so adjusted; the per-stage records (``val_cpo``, ``val_tpd``...) and
   ``final.submodels_val`` / ``val_last_stage`` are of the raw networks, ``final.members_val_adjusted`` of
   every member as the ensemble runs it.

Empty groups: a stage whose group is empty is dropped (:func:`.plan.plan_stages`), ``describe()["dropped_stages"]``.
Old run directories load unchanged (``model/`` is a :class:`SubModelEnsemble`); resuming a checkpoint written
before issue #22 needs ``exempt: none`` (it decoupled the classifier), and one written before ``prior_correction``
resumes with ``none`` (its validation so far was of raw logits), recorded in ``result.json``.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ...data.loader import Sampler
from ...errors import ConfigError
from ...models.ensemble import AGGREGATIONS, SubModelEnsemble, aggregate
from ...options import bounded, choice
from .. import Method, register_method
from ..batches import training_batches
from ..batchnorm import recompute_batchnorm
from .batches import class_batches
from .decoupler import Decoupler, taylor_importance
from .loss import compensation_loss, stage_alpha
from .masks import EXEMPT
from .probe import ExemptProbe
from .plan import (DEFAULT_GAMMA, FEW_SAMPLERS, ORDERS, plan_stages, sampler_name, stage_log_prior, stage_lr,
                   stage_sampler)
from .report import aggregation_settings, build_ensembles, cost_report
from .schedule import SCHEDULES, knee, pruning_ratios

SUMMARY_KEYS = ("all", "many", "medium", "few", "balanced")
RETRAIN_KEY, BATCHNORM_KEY = 1_000_000, 2_000_000  # private epoch keys: never a training epoch's batches


@dataclass
class DOOptions:
    stages: int = choice(2, 3, 4, default=3)
    order: str = choice(*ORDERS, default="many-medium-few")  # 3 stages only
    stage_epochs: list[int] | None = None  # default: train.epochs split 2:1:1 (2:1, 2:1:1:1)
    lr: list[float] | None = None  # per stage; default [train.lr, train.lr / 10, ...]
    rho_m: float = bounded(0.7, 0.0, 0.99, low_open=True)
    medium_alpha: str = choice("per_class", "constant", default="per_class")
    compensation: bool = True
    few_sampler: str = choice(*FEW_SAMPLERS, default="per_image")  # the reading of p_3 = 1/N_y
    gamma: list[float] | None = None  # per stage but the last; default [0.5, 0.8, 0.8][:stages - 1]
    gamma_select: str = choice("fixed", "sweep", default="fixed")
    gamma_min: float = bounded(0.1, 0.0, 0.9, low_open=True)  # sweep: γ_best >= this
    prune_steps: int = bounded(10, 0)  # Δt of Eq. 4; 0 = one shot
    prune_schedule: str = choice(*SCHEDULES, default="per_increment")
    prune_grid: float = bounded(0.1, 0.0, 1.0, low_open=True)  # the γ increment of per_increment
    prune_lr: float | None = None  # lr of the retraining steps; default: the next stage's lr
    rank_scope: str = choice("layer", "global", default="layer")
    importance_batches: int | None = None  # cap on the scoring pass (None: every image of the stage's classes)
    exempt: str = choice(*EXEMPT, default="classifier")  # what of the classifier is not decoupled
    exempt_probe: bool = True  # also evaluate each sub-model as the stricter exempt readings would leave it
    bn_batches: int | None = bounded(None, 0)  # sub-model BatchNorm recomputation; None: one epoch, 0: off
    aggregation: str = choice(*AGGREGATIONS, default="average")
    tta_steps: int = bounded(10, 1)  # gradient steps on the per-instance weights
    tta_lr: float = bounded(1.0, 0.0, low_open=True)
    tta_floor: float = bounded(0.05, 0.0)  # lambda_t >= floor (against collapse)
    compare_aggregations: bool = True  # also report the test accuracy of every aggregation (Table 8's Agg rows)
    prior_correction: str = choice("sampler", "none", default="sampler")  # each sub-model's logits - log its prior

    def __post_init__(self):
        if self.gamma is None:
            self.gamma = list(DEFAULT_GAMMA[:self.stages - 1])


def accuracy_summary(acc: dict | None) -> dict | None:
    return None if acc is None else {k: acc.get(k) for k in SUMMARY_KEYS}


@register_method
class DOMethod(Method):
    name = "do"
    summary = ("DO: stages many -> medium -> few with group-preferred sampling and a compensation loss, Taylor-guided "
               "decoupling freezes each stage's important weights, sub-models aggregated at test time")
    Options = DOOptions

    def __init__(self, options: DOOptions):
        super().__init__(options)
        self.stage = 0
        self.submodels: list[dict] = []  # state dicts of sub-models 1..T-1 (T: the live network)
        self.records: list[dict] = []
        self.retrain_lr: float | None = None  # while the decoupling's retraining steps run: their lr

    @classmethod
    def check_options(cls, o: DOOptions, cfg) -> None:
        if cfg.loss.name != "ce":
            raise ConfigError(f"method do trains with its own compensation loss and predicts with its sub-models' "
                              f"logits (prior_correction); set "
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
        if len(o.gamma) != o.stages - 1 or any(not 0 < g < 1 for g in o.gamma):
            raise ConfigError(f"method.gamma must be {o.stages - 1} pruning ratios in (0, 1), got {o.gamma} (with 0 "
                              "the next stage would have no free parameters to train)")
        if o.aggregation != "average" and o.tta_floor * o.stages >= 1:
            raise ConfigError(f"method.tta_floor {o.tta_floor} x {o.stages} stages must be below 1")
        if o.order != "many-medium-few" and o.stages != 3:
            raise ConfigError("method.order applies to stages=3 only")

    # ---------------------------------------------------------------------------------------------- set-up
    def setup(self, ctx) -> None:
        o = self.options
        self.ctx = ctx
        groups = {g: ctx.data.groups.indices(g) for g in ("many", "medium", "few")}
        self.stages, self.dropped = plan_stages(groups, ctx.class_counts, ctx.cfg.train.epochs, ctx.cfg.train.lr,
                                                o.stages, o.order, o.stage_epochs, o.lr, o.gamma)
        k = len(ctx.class_counts)
        self.log_alpha = [stage_alpha(s.kind, s.classes, ctx.class_counts, o.rho_m, o.medium_alpha).log().float()
                          if o.compensation else torch.zeros(k) for s in self.stages]
        self.log_priors = self.stage_log_priors(ctx)
        self.decoupler = Decoupler(ctx.model, o.rank_scope, o.exempt)
        self.probe = ExemptProbe(ctx.model, o.exempt) if o.exempt_probe else None
        ctx.set_sampler(self.sampler_for(ctx, 0))

    def stage_log_priors(self, ctx) -> list[torch.Tensor]:
        """``log pi_t`` of every stage on the run's device (zeros under ``prior_correction: none``)."""
        o, k = self.options, len(ctx.class_counts)
        return [(stage_log_prior(s, ctx.data.train.labels, o.rho_m, o.few_sampler)
                 if o.prior_correction == "sampler" else torch.zeros(k)).to(ctx.device) for s in self.stages]

    def sampler_for(self, ctx, t: int) -> Sampler:
        return stage_sampler(self.stages[t], ctx.data.train.labels, ctx.cfg.run.seed, ctx.cfg.train.batch_size,
                             self.options.rho_m, self.options.few_sampler)

    def current_lr(self, epoch: int) -> float:
        return stage_lr(self.stages[self.stage], epoch, self.ctx.cfg.train.warmup_epochs)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The running stage's compensation loss (Eq. 2)."""
        return compensation_loss(logits, y, self.log_alpha[self.stage])

    # ----------------------------------------------------------------------------------------------- hooks
    def on_epoch_start(self, ctx, epoch: int) -> None:
        ctx.set_lr(self.current_lr(epoch))

    def training_loss(self, ctx, x, y):
        ctx.set_lr(self.retrain_lr if self.retrain_lr is not None else self.current_lr(ctx.epoch))
        logits = ctx.model(x)
        return self.loss(logits, y), logits

    def after_backward(self, ctx) -> None:
        self.decoupler.after_backward()

    def after_step(self, ctx) -> None:
        self.decoupler.after_step(ctx.optimizer)

    def decouples_after(self, epoch: int) -> bool:
        """A decoupling runs at the end of 0-based ``epoch`` (the last epoch of every stage but the last)."""
        return any(epoch == s.start + s.epochs - 1 for s in self.stages[:-1])

    def selectable(self, epoch: int) -> bool:
        """Not an epoch that ends in a decoupling: its validation accuracy was measured before the decoupling
        pruned and re-initialised entries, so it does not describe the model a best-on-validation checkpoint
        would store."""
        return not self.decouples_after(epoch)

    def on_epoch_end(self, ctx, epoch: int, val: dict | None) -> dict:
        s = self.stages[self.stage]
        record = {"stage": self.stage + 1, "group": s.name, "lr": self.current_lr(epoch)}
        if self.decouples_after(epoch):
            record["decoupling"] = self.decouple(ctx, epoch)
        return {"do": record}

    def predict(self, ctx, x: torch.Tensor) -> torch.Tensor:
        """The aggregation of the completed sub-models and the live network (a deployed ensemble: its own)."""
        if isinstance(ctx.model, SubModelEnsemble):
            return ctx.model(x)
        def forward(t, v):
            z = self.run_submodel(ctx, t, v) if t < len(self.submodels) else ctx.model(v)
            return z.float() - self.log_priors[t]

        return aggregate(forward, len(self.submodels) + 1, x, self.options.aggregation, **self.settings(ctx))[0]

    # ------------------------------------------------------------------------------------------ decoupling
    def importance(self, ctx) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """:meth:`Decoupler.importance` over the training images of the stage's classes, summed over processes
        (forward passes in the run's precision, scores accumulated in float64); and, from the same pass, the
        scores of the exemption probe's tensors (none without a probe)."""
        batches = class_batches(ctx, self.stages[self.stage].classes, self.options.importance_batches)
        own = [p for _, p in self.decoupler.params]
        probed = [p for _, p in self.probe.params] if self.probe is not None else []
        with ctx.autocast():
            scores = ctx.dist.sum_all_(taylor_importance(ctx.model, own + probed, batches, self.loss))
        return scores[:len(own)], scores[len(own):]

    def decouple(self, ctx, epoch: int) -> dict:
        """TPD at the end of stage ``self.stage``; then move to the next stage."""
        o, t, s = self.options, self.stage, self.stages[self.stage]
        cpo = self.evaluate_network(ctx, ctx.model)
        scores, probe_scores = self.importance(ctx)
        scores = [sc.cpu() for sc in scores]
        gamma, sweep = s.gamma, None
        if o.gamma_select == "sweep":
            gamma, sweep = self.sweep(ctx, scores)
        lr = o.prune_lr if o.prune_lr is not None else self.stages[t + 1].lr
        batches = training_batches(ctx, self.sampler_for(ctx, t), RETRAIN_KEY + t)
        losses = []
        ctx.model.train()
        self.retrain_lr = lr
        try:  # Eq. 4, every pruning step followed by one training step through the trainer's step
            for ratio in pruning_ratios(gamma, o.prune_steps, o.prune_schedule, o.prune_grid):
                self.decoupler.prune(scores, ratio, ctx.optimizer)
                if o.prune_steps > 0:
                    losses.append(ctx.train_step(*next(batches)))
        finally:
            self.retrain_lr = None
        stale_sub = self.decoupler.freeze(self.fresh_model(ctx, t), ctx.optimizer)
        stale = self.evaluate_network(ctx, stale_sub)
        sub = self.recompute_batchnorm(ctx, stale_sub, t)
        self.submodels.append(sub)
        n_total = sum(p.numel() for _, p in self.decoupler.params)
        owner = self.decoupler.masks.owner
        record = {"epoch": epoch, "stage": t + 1, "group": s.name, "gamma": gamma, "sweep": sweep,
                  "prune_steps": len(losses), "prune_lr": lr, "retrain_loss": losses,
                  "frozen_fraction": sum(int((ow != 0).sum()) for ow in owner) / n_total,
                  "stage_fraction": sum(int((ow == t + 1).sum()) for ow in owner) / n_total,
                  "val_cpo": cpo, "val_tpd_stale": stale,
                  "val_tpd": stale if sub is stale_sub else self.evaluate_network(ctx, sub)}
        if self.probe is not None and self.probe.readings:
            self.probe.decouple(probe_scores, gamma)
            record["exempt_probe"] = {r: self.evaluate_network(ctx, self.probe.submodel(r, sub))
                                      for r in self.probe.readings}
        self.records.append(record)
        self.stage += 1
        ctx.set_sampler(self.sampler_for(ctx, self.stage))
        ctx.set_lr(self.current_lr(epoch + 1))
        return record

    def recompute_batchnorm(self, ctx, state: dict, t: int) -> dict:
        """Sub-model ``state`` with BatchNorm statistics recomputed on ``bn_batches`` batches of stage ``t``'s
        sampler and augmentation (the global batch's under data parallelism)."""
        n = self.options.bn_batches if self.options.bn_batches is not None else len(ctx.train_loader)
        if n == 0:
            return state
        network = copy.deepcopy(ctx.model)
        network.load_state_dict(state)
        batches = itertools.islice(training_batches(ctx, self.sampler_for(ctx, t), BATCHNORM_KEY + t), n)
        with ctx.dist.data_parallel(), ctx.autocast():
            recompute_batchnorm(network, (x for x, _ in batches))
        return {k: v.detach().clone() for k, v in network.state_dict().items()}

    def sweep(self, ctx, scores) -> tuple[float, dict | None]:
        """γ_best (paper): one-shot pruning of 0, 10, ..., 90% of the free entries, the validation accuracy of the
        pruned network on the stage's classes (mean per-class) for each, and :func:`.schedule.knee` of that
        curve (at least ``gamma_min``)."""
        s = self.stages[self.stage]
        ratios = [i / 10 for i in range(10)]
        accs = []
        for r in ratios:
            acc = self.evaluate_network(ctx, self.decoupler.pruned_state(scores, r), per_class=True)
            if acc is None:
                return s.gamma, {"note": "no validation split: the fixed gamma is used"}
            vals = [acc["per_class"][c] for c in s.classes]
            vals = [v for v in vals if v is not None and v == v]  # classes without validation images: NaN
            accs.append(sum(vals) / len(vals) if vals else 0.0)
        best = knee(ratios, accs)
        gamma = max(best, self.options.gamma_min)  # γ = 0 would leave the next stage nothing to train
        return gamma, {"ratios": ratios, "accuracy": [round(a, 4) for a in accs], "knee": best}

    def fresh_model(self, ctx, t: int) -> nn.Module:
        """A newly initialised network of the architecture, seeded by ``(run.seed, stage)``: the values the
        pruned entries restart from."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((int(ctx.cfg.run.seed) * 1_000_003 + 7919 * (t + 1)) % 2**64)
            if hasattr(ctx.model, "arch"):
                from ...models import build_model
                return build_model(**ctx.model.arch)
            fresh = copy.deepcopy(ctx.model).cpu()
            for m in fresh.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            return fresh

    # -------------------------------------------------------------------------------------------- evaluation
    def run_submodel(self, ctx, t: int, x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(ctx.model, self.submodels[t], (x,), strict=False)

    def evaluate_network(self, ctx, network: nn.Module | dict, split: str = "val", per_class: bool = False):
        """Accuracy of one network on ``split``: a module, or a state of the live model's architecture."""
        if isinstance(network, dict):
            forward = lambda x: torch.func.functional_call(ctx.model, network, (x,), strict=False)  # noqa: E731
        else:
            forward = network
        acc = ctx.evaluate(split, predict=forward)
        return acc if per_class else accuracy_summary(acc)

    def settings(self, ctx) -> dict:
        o = self.options
        return aggregation_settings(ctx, o.tta_steps, o.tta_lr, o.tta_floor)

    def finalize(self, ctx) -> nn.Module:
        """The deployable :class:`SubModelEnsemble` of all sub-models with this run's aggregation."""
        o = self.options
        log_priors = [p.cpu().tolist() for p in self.log_priors] if o.prior_correction == "sampler" else None
        ensembles = build_ensembles(ctx, self.submodels, AGGREGATIONS if o.compare_aggregations else (o.aggregation,),
                                    {**self.settings(ctx), "log_priors": log_priors})
        deployed = ensembles[o.aggregation]
        self.final = {"val_last_stage": self.evaluate_network(ctx, ctx.model),
                      "submodels_val": [self.evaluate_network(ctx, s) for s in self.submodels],
                      "test_time": cost_report(ctx, deployed)}
        if log_priors is not None:  # each member alone as the ensemble runs it
            self.final["members_val_adjusted"] = [self.evaluate_network(ctx, partial(deployed.member_logits, t))
                                                  for t in range(len(deployed.members))]
        if deployed.settings["group_lambda"] is not None:
            self.final["group_lambda"] = deployed.settings["group_lambda"]
        if o.compare_aggregations:
            self.final["test_by_aggregation"] = {mode: self.evaluate_network(ctx, ens, "test")
                                                 for mode, ens in ensembles.items()}
            if o.aggregation != "instance":
                self.final["instance_test_time"] = cost_report(ctx, ensembles["instance"])  # Table 9 for every run
        return deployed

    # ---------------------------------------------------------------------------------------------- results
    def describe(self) -> dict:
        o = self.options
        out = {**super().describe()}
        if hasattr(self, "stages"):
            out["plan"] = [{"stage": i + 1, "group": s.name, "kind": s.kind, "classes": s.classes,
                            "epochs": s.epochs, "start_epoch": s.start, "lr": s.lr, "gamma": s.gamma,
                            "sampler": sampler_name(s, o.rho_m, o.few_sampler)} for i, s in enumerate(self.stages)]
            out["dropped_stages"] = self.dropped
            out["lr_schedule"] = "owned by the method (stage 1 cosine to 0, later stages constant)"
            out["decoupled_tensors"] = [name for name, _ in self.decoupler.params]
        keys = ("stage", "group", "gamma", "sweep", "frozen_fraction", "stage_fraction", "val_cpo", "val_tpd_stale",
                "val_tpd", "exempt_probe")
        out["stages_table"] = [{k: r.get(k) for k in keys} for r in self.records]  # Table 7's CPO / TPD rows
        if hasattr(self, "final"):
            out["final"] = self.final
        out["predict"] = {"average": "average of sub-model logits",
                          "instance": "instance-level test-time aggregation (Eq. 5) of sub-model logits",
                          "group": "group-level (SADE) test-time aggregation: one weight per sub-model, learned on "
                                   "the unlabelled test images"}[o.aggregation] + (
            ", each minus its stage sampler's log label prior" if o.prior_correction == "sampler" else "")
        out["choices"] = {
            "prune_schedule": f"{o.prune_schedule}: " + ("Δt retraining steps after every grid increment of γ (Eq. 4)"
                                                         if o.prune_schedule == "per_increment" else
                                                         "prune_steps spread over the whole ramp to γ"),
            "exempt": f"{o.exempt}: the paper is silent on decoupling the classifier; stages_table[].exempt_probe "
                      "gives each sub-model's validation accuracy under the stricter readings (see the DOMethod "
                      "docstring)",
            "few_sampler": f"{o.few_sampler}: the reading of p_3 = 1/N_y",
            "medium_alpha": f"{o.medium_alpha}: the reading of alpha_2 = rho_m (Eq. 3)",
            "prior_correction": f"{o.prior_correction}: " + (
                "each sub-model's logits minus the log label distribution of the sampler of the stage that froze it "
                "(post-hoc logit adjustment; beyond the paper)" if o.prior_correction == "sampler" else
                "the sub-models' raw logits (the paper)"),
            "batchnorm": "sub-model statistics recomputed on the stage's sampler and augmentation "
                         f"({'one epoch' if o.bn_batches is None else o.bn_batches} batches)" if o.bn_batches != 0
                         else "sub-model statistics as the retraining left them"}
        out["deployed"] = "model/: every sub-model and the aggregation (tailwise.load_model gives the ensemble)"
        return out

    def state_dict(self) -> dict:
        return {"stage": self.stage, "prior_correction": self.options.prior_correction, **self.decoupler.state_dict(),
                "submodels": [{k: v.cpu().clone() for k, v in s.items()} for s in self.submodels],
                "records": list(self.records),
                "exempt_probe": self.probe.state_dict() if self.probe is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.stage = int(state["stage"])
        if state.get("prior_correction", "none") != self.options.prior_correction:
            # a checkpoint from before the option predicted with raw logits: keep its reading to the end
            self.options.prior_correction = state.get("prior_correction", "none")
            self.log_priors = self.stage_log_priors(self.ctx)
        self.decoupler.load_state_dict(state)
        dev = self.ctx.device
        self.submodels = [{k: v.to(dev) for k, v in s.items()} for s in state["submodels"]]
        self.records = list(state["records"])
        if state.get("exempt_probe") is not None and self.probe is not None:
            self.probe.load_state_dict(state["exempt_probe"])
        elif self.stage > 0:  # a checkpoint from before the probe, past a decoupling: it cannot catch up
            self.probe = None
        self.ctx.set_sampler(self.sampler_for(self.ctx, self.stage))
