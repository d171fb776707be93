"""Structured channel pruning on a multi-stage schedule: the machinery LTAP and the pruning baselines share.

Schedule: the first stage fires after epoch ``start_epoch`` (epochs counted from 1; the paper prunes from
epoch 100 of 200), then every ``stage_interval`` epochs, ``stages`` times in all. Stage ``k`` of ``P`` brings
the retained fraction to ``r_k = 1 - (1 - r) * k / P`` of the chosen budget (``target_sparsity``: fraction of
channels removed, so ``r = 1 - target_sparsity``; ``target_params`` / ``target_macs``: fraction of the dense
parameters / MACs kept). Each stage removes the globally lowest-scoring live channels, the fewest that meet
``r_k`` (a binary search over the mask-aware cost), never the last channel of a group. Removal is immediate
(``zeroing: hard``) or decayed over ``decay_steps`` optimizer steps (``progressive``). Fine-tuning continues
to the end of training; ``finalize`` returns the physically compressed model.

``shrink: true`` (default): once the final budget is in force (the epoch after the last stage, or after its
decay), the pruned channels are removed physically (``compress``, with its masked == compressed check) and
fine-tuning continues on the smaller model, with SGD momentum carried over sliced
(:func:`~tailwise.compress.slim.drop_pruned_entries`): the same computation as masked fine-tuning up to
floating-point summation order, at the smaller model's cost. ``shrink: false`` keeps training the masked model.

Scores are computed by the subclass over the scoring window, the epoch before each stage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..compress.cost import count_macs, count_params
from ..compress.groups import channel_groups
from ..compress.masks import ChannelMasks
from ..compress.slim import compress, drop_pruned_entries
from ..config import bounded, choice
from ..deploy import _resize_to
from ..errors import ConfigError, TrainingError
from . import Method, register_method


_FRACTION = dict(low=0.0, high=1.0, low_open=True, high_open=True)


@dataclass
class PruningOptions:
    target_params: float | None = bounded(None, **_FRACTION)  # fraction of dense parameters retained (default 0.3)
    target_macs: float | None = bounded(None, **_FRACTION)  # fraction of dense MACs retained
    target_sparsity: float | None = bounded(None, **_FRACTION)  # fraction of channels removed
    start_epoch: int = bounded(100, 1)
    stages: int = bounded(5, 1)
    stage_interval: int = bounded(10, 1)
    scope: str = choice("all", "internal", default="all")  # internal: block-internal channels only
    zeroing: str = choice("hard", "progressive", default="hard")
    decay_steps: int = bounded(0, 0)  # progressive zeroing: optimizer steps per stage (0 = one epoch)
    normalize: str = choice("mean", "none", default="mean")  # baselines: each group's scores / their mean (none: raw)
    round_to: int = bounded(1, 1)  # keep every group's live channel count a multiple of this (8 helps CPU/GPU kernels)
    shrink: bool = True  # after the final stage, fine-tune the physically smaller model (False: the masked one)


def check_pruning_options(o: PruningOptions, cfg) -> None:
    """Cross-checks of pruning options (ranges and choices are the fields' own); with no target given, the
    paper's default (30% of parameters kept)."""
    targets = [t for t in (o.target_params, o.target_macs, o.target_sparsity) if t is not None]
    if len(targets) > 1:
        raise ConfigError("method: set only one of target_params, target_macs, target_sparsity")
    if not targets:
        o.target_params = 0.3
    last = o.start_epoch + (o.stages - 1) * o.stage_interval
    if last > cfg.train.epochs:
        raise ConfigError(f"method: the last pruning stage is after epoch {last} but train.epochs is "
                          f"{cfg.train.epochs}; lower method.start_epoch, method.stage_interval or method.stages")


class StructuredPruning(Method):
    """Base class: schedule, masks, enforcement, budgeted global selection, compression."""

    Options = PruningOptions
    wants_gradients = False  # subclasses that score with gradients accumulate in the scoring window

    def __init__(self, options: PruningOptions):
        super().__init__(options)
        self.history: list[dict] = []
        self.kept: list[torch.Tensor] | None = None  # set by the shrink: each dense group's surviving channels

    @classmethod
    def check_options(cls, options, cfg) -> None:
        check_pruning_options(options, cfg)

    # ---------------------------------------------------------------------------------------------- set-up
    def setup(self, ctx) -> None:
        self.example = ctx.data.train.example(1).float().to(ctx.device)
        self.model, self.trainer = ctx.model, getattr(ctx, "trainer", None)
        self.build_structures(ctx.model)
        self.generator = torch.Generator().manual_seed(ctx.cfg.run.seed + 7)
        self.dense = {"params": count_params(ctx.model), "macs": count_macs(ctx.model, self.example)}
        self.stage_epochs = [self.options.start_epoch + k * self.options.stage_interval for k in range(self.options.stages)]
        self.dense_groups = [{"name": g.name, "kind": g.kind, "size": g.size, "producers": list(g.producers),
                              "consumers": list(g.consumers)} for g in self.groups]

    @property
    def shrunk(self) -> bool:
        """The model was physically compressed (masks now cover the smaller model)."""
        return self.kept is not None

    def build_structures(self, model) -> None:
        """Groups and all-live masks for ``model`` (at set-up, and again after the model was compressed)."""
        self.groups = channel_groups(model, self.example, self.options.scope)
        self.masks = ChannelMasks(model, self.groups)

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
        return epoch + 1 >= self.stage_epochs[-1] and not self.masks.decays

    # ---------------------------------------------------------------------------------------------- hooks
    def on_epoch_start(self, ctx, epoch: int) -> None:
        if self.options.shrink and not self.shrunk and len(self.history) == self.options.stages and not self.masks.decays:
            self.shrink(ctx)

    def after_backward(self, ctx) -> None:
        if self.shrunk:  # nothing left to mask or score
            return
        self.masks.enforce_grads()
        if self.wants_gradients and self.in_scoring_window(ctx.epoch):
            self.accumulate(ctx)

    def after_step(self, ctx) -> None:
        if self.shrunk:
            return
        self.masks.step_decay()
        self.masks.enforce_weights()
        self.masks.enforce_optimizer(ctx.optimizer)

    def on_epoch_end(self, ctx, epoch: int, val: dict | None) -> dict:
        record = {}
        if (epoch + 1) in self.stage_epochs:
            stage = self.stage_epochs.index(epoch + 1) + 1
            scores = ctx.dist.average_all_(self.scores(ctx, epoch, val))  # identical ranking on every process
            selection = self.select(scores, stage)
            steps = self.options.decay_steps or len(ctx.trainer.train_loader)
            self.masks.prune(selection, steps if self.options.zeroing == "progressive" else 1)
            self.masks.enforce_optimizer(ctx.optimizer)
            removed = sum(len(v) for v in selection.values())
            event = {"stage": stage, "epoch": epoch, "removed_channels": removed}
            self.history.append(event)
            record["pruning_stage"] = event
        record.update(self.cost_record())
        return record

    def cost_record(self) -> dict:
        params, macs = count_params(self.model, self.masks), count_macs(self.model, self.example, self.masks)
        live = self.masks.layer_live()
        return {"active_params": params, "active_macs": macs,
                "live_channels": {name: lo[1] for name, lo in live.items() if name in self._producers()}}

    def _producers(self) -> set[str]:
        return {p for g in self.groups for p in g.producers}

    # ------------------------------------------------------------------------------------------ selection
    def scores(self, ctx, epoch: int, val: dict | None) -> list[torch.Tensor]:
        """One score per channel of every group (higher = more important)."""
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
        channel for q = 1) always survive.
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

    # ------------------------------------------------------------------------------------------- compress
    def _compressed(self, ctx):
        """The physically compressed copy of ``ctx.model`` (checked against the masked model on real images)."""
        batch = ctx.data.val if ctx.data.val is not None else ctx.data.test
        real = ctx.trainer.train_loader.normalize(batch.example(64))
        return compress(ctx.model, self.masks, self.example, [real])

    def shrink(self, ctx) -> None:
        """Replace the masked model's layers by the compressed ones in place; carry momentum, sliced."""
        model = ctx.model
        slim = self._compressed(ctx)
        names = {p: n for n, p in model.named_parameters()}
        momentum = drop_pruned_entries(self.masks, {names[p]: st["momentum_buffer"] for p, st in ctx.optimizer.state.items()
                                                    if st.get("momentum_buffer") is not None})
        self.kept = [k.clone() for k in self.masks.keep]
        state = slim.state_dict()
        _resize_to(model, state)
        model.load_state_dict(state)
        ctx.trainer.use_contiguous_format()  # irregular widths: see Trainer.use_contiguous_format
        ctx.trainer._place(model)
        params = dict(model.named_parameters())
        ctx.rebuild_optimizer({params[n]: {"momentum_buffer": torch.empty_like(params[n]).copy_(m)}
                               for n, m in momentum.items()})
        self.build_structures(model)

    # -------------------------------------------------------------------------------------------- results
    def finalize(self, ctx):
        for d in self.masks.decays:  # training ended inside a decay: finish it at once
            self.masks.keep[d.group][d.channels] = False
        self.masks.decays = []
        self.masks.enforce_weights()
        return self._compressed(ctx)

    def kept_channels(self) -> list[torch.Tensor]:
        """Per dense group, which of its channels survive (``kept`` after the shrink, else the masks)."""
        return self.kept if self.shrunk else [self.masks.live(i) for i in range(len(self.groups))]

    def describe(self) -> dict:
        """The record in ``result.json``; ``structure`` lists every dense group with the indices it keeps
        (what the report's kernel-mask view draws)."""
        structure = [{**g, "kept": keep.nonzero().flatten().tolist()}
                     for g, keep in zip(self.dense_groups, self.kept_channels())]
        return {**super().describe(), "stage_epochs": self.stage_epochs, "history": self.history,
                "channels": sum(g["size"] for g in self.dense_groups), "live_channels": self.masks.num_live(), "shrunk": self.shrunk,
                "structure": structure}

    def state_dict(self) -> dict:
        return {"masks": self.masks.state_dict(), "history": list(self.history),
                "generator": self.generator.get_state(), "kept": self.kept}

    def load_state_dict(self, state: dict) -> None:
        kept = [k.cpu() for k in state["kept"]] if state.get("kept") is not None else None
        if kept is not None and not self.shrunk:  # Trainer.resume resized the model to the saved shapes first
            self.trainer.use_contiguous_format()
            self.build_structures(self.model)
        elif self.shrunk and kept is None:
            raise TrainingError("a state from before the shrink cannot be restored onto the compressed model")
        self.kept = kept
        self.masks.load_state_dict(state["masks"])
        self.history = list(state["history"])
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


@register_method
class MagnitudePruning(StructuredPruning):
    """Global structured magnitude pruning: channel score = L2 norm of all its group members' weights."""

    name = "magnitude"
    summary = "structured pruning baseline: channel score = L2 norm of its group's weights"

    def scores(self, ctx, epoch, val):
        return self.normalized([s.sqrt() for s in per_channel_sums(self.groups, ctx.model, lambda t: t * t)])


@register_method
class TaylorPruning(StructuredPruning):
    """First-order Taylor (Molchanov et al. 2019): channel score = sum over the scoring window's steps of
    ``|<w_c, g_c>|`` over all its group members' weights (the loss change when the channel is removed)."""

    name = "taylor"
    summary = "structured pruning baseline: first-order Taylor score |<w, g>| summed over the scoring window"
    wants_gradients = True
    window: list[torch.Tensor] | None = None  # per-group |<w, g>| sums of the current scoring window

    def build_structures(self, model) -> None:
        super().build_structures(model)
        self.window = None

    def accumulate(self, ctx) -> None:
        terms = per_channel_sums(self.groups, ctx.model,
                                 lambda t: t * t.grad if t.grad is not None else torch.zeros_like(t))
        self.window = [a + t.abs() for a, t in zip(self.window, terms)] if self.window else [t.abs() for t in terms]

    def scores(self, ctx, epoch, val):
        scores, self.window = self.normalized(self.window), None
        return scores

    def state_dict(self) -> dict:
        return {**super().state_dict(), "window": self.window}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.window = [w.cpu() for w in state["window"]] if state["window"] is not None else None  # as accumulate makes it


@register_method
class RandomPruning(StructuredPruning):
    """Random structured pruning (uniform scores from the run seed): the floor any criterion must beat."""

    name = "random"
    summary = "structured pruning baseline: uniform random channel scores (the floor any criterion must beat)"

    def scores(self, ctx, epoch, val):
        return [torch.rand(g.size, generator=self.generator, dtype=torch.float64) for g in self.groups]
