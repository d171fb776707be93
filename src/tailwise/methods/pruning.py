"""Structured channel pruning: the standalone pruners (any PyTorch loop) and their thin trainer adapters.

A pruner (:class:`StructuredPruner`; the baselines :class:`MagnitudePruner`, :class:`TaylorPruner`,
:class:`RandomPruner`; LTAP in :mod:`tailwise.methods.ltap`) owns a model's channel groups and keep-masks and
prunes in ``stages`` steps. Stage ``k`` of ``P`` brings the retained fraction to ``r_k = 1 - (1 - r) * k / P`` of
the chosen budget (``target_sparsity``: fraction of channels removed, so ``r = 1 - target_sparsity``;
``target_params`` / ``target_macs``: fraction of the dense parameters / MACs kept; 30% of the parameters when none
is given, the paper's operating point). Each stage removes the globally lowest-scoring live channels, the fewest
that meet ``r_k`` (a binary search over the mask-aware cost), in runs of ``round_to`` channels per group, never
the last run of a group (``round_to`` 8 by default: irregular widths such as 2-42 channels run at a fraction of
the speed a multiple of 8 gets from CPU and GPU kernels, issue #21). Removal is immediate (``zeroing: hard``) or decayed over ``decay_steps`` optimizer steps
(``progressive``).

In a plain loop: ``loss.backward(); pruner.observe(); optimizer.step(); pruner.enforce(optimizer)`` and, at a
stage, ``pruner.step()``; at the end ``pruner.compress()`` returns the physically smaller model.

The trainer adapters (:class:`StructuredPruningMethod`: ``method: magnitude | taylor | random``) add the schedule
-- the first stage after epoch ``start_epoch`` (counted from 1; the paper prunes from epoch 100 of 200), then every
``stage_interval`` epochs, scores taken over the epoch before each stage -- and the shrink: with ``shrink: true``
(default), once the final budget is in force, the pruned channels are removed physically (``compress``, with its
masked == compressed check) and fine-tuning continues on the smaller model, with SGD momentum carried over sliced
(:func:`~tailwise.compress.slim.drop_pruned_entries`): the same computation as masked fine-tuning up to
floating-point summation order, at the smaller model's cost. ``shrink: false`` keeps training the masked model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..compress.cost import count_macs, count_params
from ..compress.groups import channel_groups
from ..compress.masks import ChannelMasks
from ..compress.slim import compress, drop_pruned_entries
from ..options import bounded, build_dataclass, choice
from ..deploy import _resize_to
from ..errors import ConfigError, TrainingError
from . import Method, register_method


_FRACTION = dict(low=0.0, high=1.0, low_open=True, high_open=True)


@dataclass
class PruningOptions:
    target_params: float | None = bounded(None, **_FRACTION)  # fraction of dense parameters retained (default 0.3)
    target_macs: float | None = bounded(None, **_FRACTION)  # fraction of dense MACs retained
    target_sparsity: float | None = bounded(None, **_FRACTION)  # fraction of channels removed
    start_epoch: int = bounded(100, 1)  # trainer: the first stage fires after this epoch
    stages: int = bounded(5, 1)
    stage_interval: int = bounded(10, 1)  # trainer: epochs between stages
    scope: str = choice("all", "internal", default="all")  # internal: block-internal channels only
    zeroing: str = choice("hard", "progressive", default="hard")
    decay_steps: int = bounded(0, 0)  # progressive zeroing: optimizer steps per stage (0 = one epoch)
    normalize: str = choice("mean", "none", default="mean")  # baselines: each group's scores / their mean (none: raw)
    round_to: int = bounded(8, 1)  # keep every group's live channel count a multiple of this (fast kernels; 1: any)
    shrink: bool = True  # trainer: after the final stage, fine-tune the physically smaller model (False: the masked one)

    def __post_init__(self):
        if self.target_params is None and self.target_macs is None and self.target_sparsity is None:
            self.target_params = 0.3  # the paper's operating point


def check_pruning_options(o: PruningOptions, cfg) -> None:
    """Cross-checks of pruning options against the run (ranges and choices are the fields' own)."""
    if sum(t is not None for t in (o.target_params, o.target_macs, o.target_sparsity)) > 1:
        raise ConfigError("method: set only one of target_params, target_macs, target_sparsity")
    last = o.start_epoch + (o.stages - 1) * o.stage_interval
    if last > cfg.train.epochs:
        raise ConfigError(f"method: the last pruning stage is after epoch {last} but train.epochs is "
                          f"{cfg.train.epochs}; lower method.start_epoch, method.stage_interval or method.stages")


def _identity(tensors):
    return tensors


class StructuredPruner:
    """Multi-stage structured channel pruning of ``model`` (module docstring); subclasses give the scores.

    ``example_inputs``: one input batch as the model sees it (traced for the channel groups and the MAC count);
    ``options`` a :class:`PruningOptions` (or the subclass's ``Options``), else keyword arguments naming its fields;
    ``seed`` seeds the pruner's own generator (random scores, LTAP's suppression draw).
    """

    Options = PruningOptions
    wants_gradients = False  # whether ``observe`` accumulates gradient scores

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, options: PruningOptions | None = None, *,
                 seed: int = 0, **kwargs):
        if options is None:
            options = build_dataclass(self.Options, kwargs, type(self).__name__)
        elif kwargs:
            raise TypeError("give either options or keyword options, not both")
        self.options = options
        self.model, self.example = model, example_inputs.detach()
        self.generator = torch.Generator().manual_seed(int(seed) % 2**64)
        self.history: list[dict] = []
        self.build_structures(model)
        self.dense = {"params": count_params(model), "macs": count_macs(model, self.example)}

    def build_structures(self, model: nn.Module) -> None:
        """Groups and all-live masks for ``model`` (at construction, and again after it was compressed in place)."""
        self.groups = channel_groups(model, self.example, self.options.scope)
        self.masks = ChannelMasks(model, self.groups)

    @property
    def stage(self) -> int:
        """Stages done so far."""
        return len(self.history)

    # ------------------------------------------------------------------------------------------ the loop
    def observe(self, loss: torch.Tensor | None = None, grad_scale: float = 1.0) -> None:
        """After ``loss.backward()`` (or, given ``loss``, in its place): zero the gradients of pruned channels and,
        for a gradient criterion, add this step's gradients to the scoring window. ``grad_scale``: the AMP loss
        scale the gradients carry."""
        if loss is not None:
            loss.backward()
        self.masks.enforce_grads()
        if self.wants_gradients:
            self.accumulate(grad_scale)

    def enforce(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """After ``optimizer.step()``: advance progressive zeroing, re-zero pruned weights (and their momentum)."""
        self.masks.step_decay()
        self.masks.enforce_weights()
        if optimizer is not None:
            self.masks.enforce_optimizer(optimizer)

    def step(self, val=None, *, reduce: Callable = _identity, decay_steps: int | None = None, **record) -> dict:
        """Prune the next stage: score, select to the stage's budget, mask. ``val`` is LTAP's validation feedback
        (the baselines ignore it); ``reduce`` averages the scores over data-parallel processes; ``decay_steps``
        overrides the option (progressive zeroing); ``record`` is added to the stage's history entry."""
        stage = self.stage + 1
        if stage > self.options.stages:
            raise RuntimeError(f"all {self.options.stages} stages are done")
        selection = self.select(self.scores(val, reduce), stage)
        steps = decay_steps or self.options.decay_steps or 1
        self.masks.prune(selection, steps if self.options.zeroing == "progressive" else 1)
        event = {"stage": stage, **record, "removed_channels": sum(len(v) for v in selection.values())}
        self.history.append(event)
        return event

    def compress(self, check_inputs: list[torch.Tensor] = ()) -> nn.Module:
        """The physically smaller copy of the model (``model`` keeps its masked layers), checked to compute what
        the masked model computes on random inputs and ``check_inputs``; a decay in progress is finished first."""
        self.masks.finish_decays()
        return compress(self.model, self.masks, self.example, list(check_inputs))

    def cost(self) -> dict:
        """Live parameters and MACs under the masks, and the live output width of every producer layer."""
        params, macs = count_params(self.model, self.masks), count_macs(self.model, self.example, self.masks)
        producers = {p for g in self.groups for p in g.producers}
        return {"active_params": params, "active_macs": macs,
                "live_channels": {n: lo[1] for n, lo in self.masks.layer_live().items() if n in producers}}

    # ------------------------------------------------------------------------------------------ selection
    def accumulate(self, grad_scale: float = 1.0) -> None:
        """Add the current gradients to the scoring window (gradient criteria)."""

    def scores(self, val=None, reduce: Callable = _identity) -> list[torch.Tensor]:
        """One score per channel of every group (higher = more important), ``reduce``-d over processes."""
        return reduce(self.channel_scores())

    def channel_scores(self) -> list[torch.Tensor]:
        """This process's scores (the baselines')."""
        raise NotImplementedError

    def budget(self, stage: int) -> tuple[str, float]:
        o = self.options
        if o.target_sparsity is not None:
            return "channels", 1 - o.target_sparsity * stage / o.stages
        unit, final = ("params", o.target_params) if o.target_params is not None else ("macs", o.target_macs)
        return unit, 1 - (1 - final) * stage / o.stages

    def _retained(self, unit: str) -> float:
        if unit == "channels":
            return self.masks.num_live() / self.masks.num_channels()
        if unit == "params":
            return count_params(self.model, self.masks) / self.dense["params"]
        return count_macs(self.model, self.example, self.masks) / self.dense["macs"]

    def select(self, scores: list[torch.Tensor], stage: int) -> dict[int, torch.Tensor]:
        """The fewest globally lowest-scoring live units whose removal meets this stage's budget.

        A unit is one channel (``round_to: 1``) or, with ``round_to: q``, a run of ``q`` consecutive channels in
        a group's ascending score order (the first run shortened so the live count stays a multiple of ``q``),
        scored by its mean. Within a group, units go lowest first; the group's best ``q`` channels (its best
        channel for q = 1) always survive. The masks are not changed.
        """
        unit, target = self.budget(stage)
        q = self.options.round_to
        units, values = [], []  # units: (group, channels)
        for gi, s in enumerate(scores):
            alive = self.masks.live(gi).nonzero().flatten()
            ranked = alive[torch.argsort(s[alive].double(), stable=True)]
            removable = len(ranked) - max(1, min(q, len(ranked)))
            first = removable % q
            bounds = ([0, first] if first else [0]) + list(range(first + q, removable + 1, q))
            for a, b in zip(bounds, bounds[1:]):
                units.append((gi, ranked[a:b]))
                values.append(float(s[ranked[a:b]].double().mean()))
        if not units:
            return {}
        order = torch.argsort(torch.tensor(values, dtype=torch.float64), stable=True).tolist()

        def selection(k: int) -> dict[int, torch.Tensor]:
            chosen: dict[int, list[torch.Tensor]] = {}
            for i in order[:k]:
                chosen.setdefault(units[i][0], []).append(units[i][1])
            return {gi: torch.cat(parts) for gi, parts in chosen.items()}

        def retained_after(k: int) -> float:
            saved = [keep.clone() for keep in self.masks.keep]
            for gi, ch in selection(k).items():
                self.masks.keep[gi][ch] = False
            value = self._retained(unit)
            self.masks.keep = saved
            return value

        if unit == "channels":
            needed = math.ceil(self.masks.num_live() - target * self.masks.num_channels() - 1e-9)
            removed = torch.tensor([len(units[i][1]) for i in order]).cumsum(0)
            return selection(int((removed < needed).sum()) + 1 if needed > 0 else 0)
        lo, hi = 0, len(order)
        if retained_after(hi) > target:
            return selection(hi)  # the budget is not reachable: prune everything allowed
        while lo < hi:
            mid = (lo + hi) // 2
            if retained_after(mid) <= target:
                hi = mid
            else:
                lo = mid + 1
        return selection(lo)

    def normalized(self, raw: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.options.normalize == "none":
            return raw
        return [r / r.mean().clamp_min(1e-12) for r in raw]

    # ------------------------------------------------------------------------------------------ persistence
    def describe(self) -> dict:
        """Pruner-specific entries of ``result.json`` (the subclasses')."""
        return {}

    def state_dict(self) -> dict:
        return {"masks": self.masks.state_dict(), "history": [dict(h) for h in self.history],
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.masks.load_state_dict(state["masks"])
        self.history = [dict(h) for h in state["history"]]
        self.generator.set_state(state["generator"].cpu())  # a CPU generator; checkpoints load to the run's device


# -------------------------------------------------------------------------------------------------- baselines
def per_channel_sums(groups, model, values) -> list[torch.Tensor]:
    """For each group, ``sum over its slices`` of ``values(tensor)`` reduced over all but the channel dim.

    ``values`` maps a member tensor to an elementwise tensor of its shape (e.g. ``w**2`` or ``w * w.grad``).
    Each (tensor, dim) is reduced once.
    """
    reduced: dict[tuple[int, int], torch.Tensor] = {}
    out = []
    for g in groups:
        total = torch.zeros(g.size, dtype=torch.float64)
        for s in g.slices:
            tensor = getattr(model.get_submodule(s.module_name), s.tensor_name)
            key = (id(tensor), s.dim)
            if key not in reduced:
                v = values(tensor)
                dims = [d for d in range(v.dim()) if d != s.dim]
                reduced[key] = (v.sum(dim=dims) if dims else v).detach().double().cpu()
            total += reduced[key][s.index]
        out.append(total)
    return out


class MagnitudePruner(StructuredPruner):
    """Global structured magnitude pruning: channel score = L2 norm of all its group members' weights (divided by
    the group's mean, ``normalize: mean``).

    >>> import torch, tailwise
    >>> from tailwise.models import build_model
    >>> model = build_model("resnet20", 10)
    >>> pruner = tailwise.MagnitudePruner(model, torch.randn(1, 3, 32, 32), target_params=0.5, stages=1)
    >>> event = pruner.step()  # in a training loop: observe() after backward, enforce(optimizer) after the step
    >>> small = pruner.compress()
    >>> sum(p.numel() for p in small.parameters()) <= 0.5 * sum(p.numel() for p in model.parameters())
    True
    """

    def channel_scores(self):
        return self.normalized([s.sqrt() for s in per_channel_sums(self.groups, self.model, lambda t: t * t)])


class TaylorPruner(StructuredPruner):
    """First-order Taylor (Molchanov et al. 2019): channel score = sum over the scoring window's steps (the
    ``observe`` calls since the last stage) of ``|<w_c, g_c>|`` over all its group members' weights (the loss
    change when the channel is removed). Same use as :class:`MagnitudePruner`, with ``observe()`` after every
    ``backward`` of the scoring window."""

    wants_gradients = True

    def build_structures(self, model) -> None:
        super().build_structures(model)
        self.window: list[torch.Tensor] | None = None  # per-group |<w, g>| sums of the current scoring window

    def accumulate(self, grad_scale: float = 1.0) -> None:
        terms = per_channel_sums(self.groups, self.model,
                                 lambda t: t * t.grad / grad_scale if t.grad is not None else torch.zeros_like(t))
        self.window = [a + t.abs() for a, t in zip(self.window, terms)] if self.window else [t.abs() for t in terms]

    def channel_scores(self):
        if self.window is None:
            raise RuntimeError("TaylorPruner: no gradients observed since the last stage (call observe())")
        scores, self.window = self.normalized(self.window), None
        return scores

    def state_dict(self) -> dict:
        return {**super().state_dict(), "window": self.window}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.window = [w.cpu() for w in state["window"]] if state["window"] is not None else None  # as accumulate makes it


class RandomPruner(StructuredPruner):
    """Random structured pruning (uniform scores from the pruner's seed): the floor any criterion must beat."""

    def channel_scores(self):
        return [torch.rand(g.size, generator=self.generator, dtype=torch.float64) for g in self.groups]


# --------------------------------------------------------------------------------------------- trainer adapters
class StructuredPruningMethod(Method):
    """The trainer adapter of a :class:`StructuredPruner`: the epoch schedule, the shrink, the records. Every
    pruning decision is the pruner's (``self.pruner``)."""

    Options = PruningOptions
    Pruner: type[StructuredPruner] = StructuredPruner

    def __init__(self, options: PruningOptions):
        super().__init__(options)
        self.pruner: StructuredPruner | None = None
        self.kept: list[torch.Tensor] | None = None  # set by the shrink: each dense group's surviving channels

    @classmethod
    def check_options(cls, options, cfg) -> None:
        check_pruning_options(options, cfg)

    # ---------------------------------------------------------------------------------------------- set-up
    def setup(self, ctx) -> None:
        self.ctx = ctx
        example = ctx.data.train.example(1).float().to(ctx.device)
        self.pruner = self.make_pruner(ctx, example)
        self.stage_epochs = [self.options.start_epoch + k * self.options.stage_interval
                             for k in range(self.options.stages)]
        self.dense_groups = [{"name": g.name, "kind": g.kind, "size": g.size, "producers": list(g.producers),
                              "consumers": list(g.consumers)} for g in self.pruner.groups]

    def make_pruner(self, ctx, example: torch.Tensor) -> StructuredPruner:
        return self.Pruner(ctx.model, example, self.options, seed=ctx.cfg.run.seed + 7)

    # the pruner's state, for inspection
    masks = property(lambda self: self.pruner.masks)
    groups = property(lambda self: self.pruner.groups)
    history = property(lambda self: self.pruner.history)

    @property
    def shrunk(self) -> bool:
        """The model was physically compressed (masks now cover the smaller model)."""
        return self.kept is not None

    def in_scoring_window(self, epoch: int) -> bool:
        """Epoch ``epoch`` (0-based) is the one right before a stage."""
        return (epoch + 1) in self.stage_epochs

    def first_active_epoch(self) -> int:
        """The epoch ending with the first stage (its scores are taken then); masks are all-ones before it."""
        return self.options.start_epoch - 1

    def selectable(self, epoch: int) -> bool:
        """Only models at the final budget compete for best-on-validation (with ``shrink``: the smaller ones)."""
        if self.options.shrink:
            return self.shrunk
        return epoch + 1 >= self.stage_epochs[-1] and not self.pruner.masks.decays

    # ---------------------------------------------------------------------------------------------- hooks
    def on_epoch_start(self, ctx, epoch: int) -> None:
        p = self.pruner
        if self.options.shrink and not self.shrunk and p.stage == self.options.stages and not p.masks.decays:
            self.shrink(ctx)

    def after_backward(self, ctx) -> None:
        if self.shrunk:  # nothing left to mask or score
            return
        if self.in_scoring_window(ctx.epoch):
            self.pruner.observe(grad_scale=ctx.grad_scale())
        else:
            self.pruner.masks.enforce_grads()

    def after_step(self, ctx) -> None:
        if not self.shrunk:
            self.pruner.enforce(ctx.optimizer)

    def on_epoch_end(self, ctx, epoch: int, val: dict | None) -> dict:
        record = {}
        if (epoch + 1) in self.stage_epochs:
            with ctx.dist.data_parallel():  # forward passes in train mode (LTAP's trial statistics): global batch
                event = self.pruner.step(**self.step_inputs(ctx, val), reduce=ctx.dist.average_all_,
                                         decay_steps=self.options.decay_steps or len(ctx.train_loader), epoch=epoch)
            self.pruner.masks.enforce_optimizer(ctx.optimizer)
            record["pruning_stage"] = event
        record.update(self.pruner.cost())
        return record

    def step_inputs(self, ctx, val: dict | None) -> dict:
        """The data the pruner's ``step`` gets (LTAP: its validation feedback and calibration batches)."""
        return {}

    # ------------------------------------------------------------------------------------------- compress
    def _compressed(self, ctx):
        """The physically compressed copy of ``ctx.model`` (checked against the masked model on real images)."""
        batch = ctx.data.val if ctx.data.val is not None else ctx.data.test
        return self.pruner.compress([ctx.train_loader.normalize(batch.example(64))])

    def shrink(self, ctx) -> None:
        """Replace the masked model's layers by the compressed ones in place; carry momentum, sliced."""
        model = ctx.model
        slim = self._compressed(ctx)
        names = {p: n for n, p in model.named_parameters()}
        momentum = drop_pruned_entries(self.pruner.masks, {names[p]: st["momentum_buffer"]
                                                           for p, st in ctx.optimizer.state.items()
                                                           if st.get("momentum_buffer") is not None})
        self.kept = [k.clone() for k in self.pruner.masks.keep]
        state = slim.state_dict()
        _resize_to(model, state)
        model.load_state_dict(state)
        ctx.place(model, contiguous=True)  # irregular widths: see Trainer.place
        params = dict(model.named_parameters())
        ctx.rebuild_optimizer({params[n]: {"momentum_buffer": torch.empty_like(params[n]).copy_(m)}
                               for n, m in momentum.items()})
        self.pruner.build_structures(model)

    # -------------------------------------------------------------------------------------------- results
    def finalize(self, ctx):
        return self._compressed(ctx)

    def kept_channels(self) -> list[torch.Tensor]:
        """Per dense group, which of its channels survive (``kept`` after the shrink, else the masks)."""
        masks = self.pruner.masks
        return self.kept if self.shrunk else [masks.live(i) for i in range(len(self.pruner.groups))]

    def describe(self) -> dict:
        """The record in ``result.json``; ``structure`` lists every dense group with the indices it keeps
        (what the report's kernel-mask view draws)."""
        structure = [{**g, "kept": keep.nonzero().flatten().tolist()}
                     for g, keep in zip(self.dense_groups, self.kept_channels())]
        return {**super().describe(), "stage_epochs": self.stage_epochs, "history": self.pruner.history,
                "channels": sum(g["size"] for g in self.dense_groups), "live_channels": self.pruner.masks.num_live(),
                "shrunk": self.shrunk, "structure": structure, **self.pruner.describe()}

    def state_dict(self) -> dict:
        return {**self.pruner.state_dict(), "kept": self.kept}

    def load_state_dict(self, state: dict) -> None:
        kept = [k.cpu() for k in state["kept"]] if state.get("kept") is not None else None
        if kept is not None and not self.shrunk:  # Trainer.resume resized the model to the saved shapes first
            self.ctx.place(self.pruner.model, contiguous=True)
            self.pruner.build_structures(self.pruner.model)
        elif self.shrunk and kept is None:
            raise TrainingError("a state from before the shrink cannot be restored onto the compressed model")
        self.kept = kept
        self.pruner.load_state_dict(state)


@register_method
class MagnitudeMethod(StructuredPruningMethod):
    """``method: magnitude``: :class:`MagnitudePruner` on the trainer's schedule."""

    name = "magnitude"
    summary = "structured pruning baseline: channel score = L2 norm of its group's weights"
    Pruner = MagnitudePruner


@register_method
class TaylorMethod(StructuredPruningMethod):
    """``method: taylor``: :class:`TaylorPruner` on the trainer's schedule (scoring window: the epoch before each
    stage)."""

    name = "taylor"
    summary = "structured pruning baseline: first-order Taylor score |<w, g>| summed over the scoring window"
    Pruner = TaylorPruner


@register_method
class RandomMethod(StructuredPruningMethod):
    """``method: random``: :class:`RandomPruner` on the trainer's schedule (seed: the run seed + 7)."""

    name = "random"
    summary = "structured pruning baseline: uniform random channel scores (the floor any criterion must beat)"
    Pruner = RandomPruner
