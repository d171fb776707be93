"""``method: ltap`` -- the Long-Tailed Adaptive Pruner (paper sections 2-4, App. D-E), on the shared structured
pruning machinery (:class:`tailwise.methods.pruning.StructuredPruning`: schedule, budgets, global bottom-K
selection, masks on weights/gradients/momentum, physical compression).

Per stage: the five criteria (:mod:`.criteria`) are computed over the scoring window (default: the epoch that
ends with the stage), each normalised over all live channels, mixed as ``S = sum_k alpha_k s_k`` over the active
criteria, and the globally lowest-``S`` live channels are removed until the stage's budget is met.

``vote`` chooses ``alpha``:

* ``adaptive`` (default): LT-Vote (:mod:`.vote`) from per-class validation accuracy. A *round* is closed at every
  pruning stage (``vote_every: stage``, default) -- section 2.3's loop "prune, then update the weights from the
  pruned model's validation performance, repeat" and App. D's "T rounds of pruning": the votes of the round that
  ends at stage ``k+1`` go to the criteria that chose stage ``k``'s channels, comparing the validation accuracy just
  before stage ``k+1`` with that just before stage ``k`` (the last round closes ``stage_interval`` epochs after the
  last stage, for the record). ``vote_every: epoch`` closes a round at every epoch end from the first stage to
  that point (the public code's per-epoch cadence; rounds without a stage credit criteria that changed nothing).
* ``uniform``: ``alpha_k = 1/K`` over the selected criteria, no suppression ("w.o. vote" in the paper).
* ``public-code``: the public code's effective behaviour (audit section 3): the fixed weights magnitude 0,
  avg_magnitude 1.25, cosine 1, taylor-1 1, taylor-2 1 (normalised to sum 1 for reporting; the ranking is the
  same), ``second_order: public-code`` and one-shot pruning (``stages: 1``) unless set explicitly.

Paper defaults: ``start_epoch`` 100 of 200 ("continuous pruning after the 100th epoch"), 30% of the parameters
kept (``target_params: 0.3``), ``stages`` P = 5 (eq. 7), ``tau`` 0.5 (section 4.1's "pau"), hard zeroing (section
2.2 (iii): "setting the weights ... to zero"). ``stage_interval`` is not given by the paper: 10 epochs (the last
stage at epoch 140, before the LR drops at 160, leaving 60 epochs of fine-tuning).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ...config import bounded, choice
from ...errors import ConfigError
from .. import register_method
from ..pruning import PruningOptions, StructuredPruning, check_pruning_options
from .criteria import (CRITERIA, GRADIENT_CRITERIA, NORMALISATIONS, SECOND_ORDER, ChannelLayout, CriteriaAccumulator,
                       mix, normalise)
from .vote import CLASS_WEIGHTS, INCREMENTS, LTVote, class_weights

VOTES = ("adaptive", "uniform", "public-code")
# the public code's weights at the pruning step (audit section 3: the vote never updates, magnitude is suppressed)
PUBLIC_CODE_WEIGHTS = {"magnitude": 0.0, "avg_magnitude": 1.25, "cosine_similarity": 1.0,
                       "taylor_first_order": 1.0, "taylor_second_order": 1.0}


@dataclass
class LTAPOptions(PruningOptions):
    stages: int | None = bounded(None, 1)  # P; None: 5 (paper), or 1 (one-shot) with vote: public-code
    stage_interval: int = bounded(10, 1)  # epochs between stages (not in the paper)
    # per-criterion scale over all live channels: l2 (public code) | mean | max | group-mean
    normalize: str = choice(*NORMALISATIONS, default="l2")
    # adaptive (LT-Vote) | uniform (w.o. vote) | public-code (fixed 0/1.25/1/1/1, one-shot)
    vote: str = choice(*VOTES, default="adaptive")
    criteria: list[str] = field(default_factory=lambda: list(CRITERIA))  # subset of the five, any order
    class_weights: str = choice(*CLASS_WEIGHTS, default="tail")  # tail (Proposition 1) | counts | inverse | uniform
    tau: float = bounded(0.5, 0.0, low_open=True)  # softmax temperature (section 4.1)
    second_order: str | None = None  # fisher (default) | public-code (0.5 <w,g>^2; default with vote: public-code)
    vote_every: str = choice("stage", "epoch", default="stage")  # when an LT-Vote round closes
    vote_increment: str = choice(*INCREMENTS, default="indicator")  # indicator (eq. 6: +1) | gain (gain / 100, Lemma A)
    suppression: str = choice("inverse", "none", default="inverse")  # inverse: one criterion per round, p ∝ 1/alpha
    score_window: int = bounded(1, 1)  # epochs before each stage over which gradient criteria accumulate


def check_ltap_options(o: LTAPOptions, cfg) -> None:
    if o.stages is None:
        o.stages = 1 if o.vote == "public-code" else 5
    if o.second_order is None:
        o.second_order = "public-code" if o.vote == "public-code" else "fisher"
    if o.second_order not in SECOND_ORDER:
        raise ConfigError(f"method.second_order: {o.second_order!r} is not allowed; allowed: {', '.join(SECOND_ORDER)}")
    if not o.criteria:
        raise ConfigError("method.criteria: give at least one of " + ", ".join(CRITERIA))
    unknown = [c for c in o.criteria if c not in CRITERIA]
    if unknown:
        raise ConfigError(f"method.criteria: {unknown[0]!r} is not allowed; allowed: {', '.join(CRITERIA)}")
    if len(set(o.criteria)) != len(o.criteria):
        raise ConfigError(f"method.criteria: {o.criteria} lists a criterion twice")
    o.criteria = [c for c in CRITERIA if c in o.criteria]  # canonical order
    if o.vote == "public-code" and not any(PUBLIC_CODE_WEIGHTS[c] > 0 for c in o.criteria):
        raise ConfigError("method.criteria: with vote: public-code, magnitude alone has weight 0; "
                          "add another criterion")
    check_pruning_options(o, cfg)
    if o.score_window > o.start_epoch or (o.stages > 1 and o.score_window > o.stage_interval):
        raise ConfigError(f"method.score_window: {o.score_window} must be <= start_epoch and (with several stages) "
                          "<= stage_interval")


@register_method
class LTAPPruning(StructuredPruning):
    """LTAP: multi-criteria structured pruning with LT-Vote criterion weights (module docstring)."""

    name = "ltap"
    summary = ("LTAP: multi-stage structured pruning, five criteria mixed with weights set by LT-Vote from per-class "
               "validation accuracy")
    Options = LTAPOptions

    def __init__(self, options: LTAPOptions):
        super().__init__(options)
        o = options
        if o.stages is None or o.second_order is None:  # built without check_options (direct use)
            o = self.options = dataclasses.replace(o)
            o.stages = o.stages if o.stages is not None else (1 if o.vote == "public-code" else 5)
            o.second_order = o.second_order or ("public-code" if o.vote == "public-code" else "fisher")
        self.computed = [c for c in o.criteria if o.vote != "public-code" or PUBLIC_CODE_WEIGHTS[c] > 0]
        self.wants_gradients = any(c in GRADIENT_CRITERIA for c in self.computed)
        self.vote: LTVote | None = None

    @classmethod
    def check_options(cls, options, cfg) -> None:
        check_ltap_options(options, cfg)

    # ---------------------------------------------------------------------------------------------- set-up
    def setup(self, ctx) -> None:
        super().setup(ctx)
        o = self.options
        self.device = ctx.device
        self.class_w = class_weights(ctx.data.class_counts, o.class_weights)
        self.membership = list(ctx.data.groups.membership)
        self.vote_split = ctx.cfg.data.val
        if o.vote == "adaptive":
            self.vote = LTVote(o.criteria, self.class_w, o.tau, o.suppression == "inverse", o.vote_increment,
                               seed=ctx.cfg.run.seed)
        last, end = self.stage_epochs[-1], ctx.cfg.train.epochs
        close = [last + o.stage_interval] if last + o.stage_interval <= end else []
        if o.vote_every == "stage":
            self.vote_epochs = self.stage_epochs + close
        else:
            self.vote_epochs = list(range(self.stage_epochs[0], (close or [last])[0] + 1))

    def build_structures(self, model) -> None:
        super().build_structures(model)
        self.layout = ChannelLayout(model, self.groups)
        self.accumulator = CriteriaAccumulator(self.layout, self.computed, self.options.second_order)

    def in_scoring_window(self, epoch: int) -> bool:
        """Epoch ``epoch`` (0-based) is one of the ``score_window`` epochs that end with a stage."""
        return any(0 <= s - (epoch + 1) < self.options.score_window for s in self.stage_epochs)

    def first_active_epoch(self) -> int:
        """The first epoch of the first scoring window (LT-Vote's reference round closes at the first stage)."""
        return self.options.start_epoch - self.options.score_window

    # ---------------------------------------------------------------------------------------------- weights
    def alpha(self) -> dict[str, float]:
        """The criterion weights in force (sum 1; 0 for a suppressed or unselected criterion)."""
        o = self.options
        if self.vote is not None:
            return self.vote.alpha_dict()
        if o.vote == "uniform":
            return {k: 1.0 / len(o.criteria) for k in o.criteria}
        total = sum(PUBLIC_CODE_WEIGHTS[k] for k in o.criteria)
        return {k: PUBLIC_CODE_WEIGHTS[k] / total for k in o.criteria}

    def suppressed(self) -> str | None:
        return self.vote.suppressed_name() if self.vote is not None else None

    # ---------------------------------------------------------------------------------------------- hooks
    def accumulate(self, ctx) -> None:
        scaler = ctx.trainer.scaler
        self.accumulator.accumulate(ctx.model, scaler.get_scale() if scaler.is_enabled() else 1.0)

    def on_epoch_end(self, ctx, epoch: int, val: dict | None) -> dict:
        vote_record = self._close_round(epoch, val)
        record = super().on_epoch_end(ctx, epoch, val)  # prunes with the alpha now in force
        if "pruning_stage" in record:
            record["pruning_stage"].update(alpha=self.alpha(), suppressed=self.suppressed(),
                                           agreement=self._agreement())
        record["ltap_alpha"] = {k: round(v, 6) for k, v in self.alpha().items()}
        record["ltap_suppressed"] = self.suppressed()
        if vote_record is not None:
            record["ltap_vote"] = vote_record
        return record

    def _close_round(self, epoch: int, val: dict | None) -> dict | None:
        if self.vote is None or (epoch + 1) not in self.vote_epochs:
            return None
        if not val or val.get("per_class") is None:
            return {"skipped": "no per-class validation accuracy this epoch"}
        record = self.vote.observe(val["per_class"])
        return record if record is not None else {"round": 0, "reference": True}

    def scores(self, ctx, epoch: int, val: dict | None) -> list[torch.Tensor]:
        live = [self.masks.live(i) for i in range(len(self.groups))]
        flat_live = torch.cat(live)
        raw = self.accumulator.compute(ctx.model, live)
        self.accumulator.reset()
        segments = [(o, g.size) for o, g in zip(self.layout.offsets, self.groups)]
        normalised = {k: normalise(v.cpu(), flat_live, self.options.normalize, segments) for k, v in raw.items()}
        self._last = (normalised, flat_live)
        return self.layout.split(mix(normalised, self.alpha()))

    def select(self, scores: list[torch.Tensor], stage: int) -> dict[int, torch.Tensor]:
        self._selection = super().select(scores, stage)
        return self._selection

    def _agreement(self) -> dict[str, float]:
        """For each criterion: the fraction of this stage's removed channels that the criterion alone ranks
        among the same number of lowest live channels (1.0 everywhere: the weights could not matter)."""
        normalised, live = self._last
        removed = torch.cat([self.layout.offsets[g] + ch for g, ch in self._selection.items()]) \
            if self._selection else torch.zeros(0, dtype=torch.long)
        if len(removed) == 0:
            return {}
        candidates = live.nonzero().flatten()
        out = {}
        for name, values in normalised.items():
            lowest = candidates[torch.argsort(values[candidates], stable=True)[:len(removed)]]
            out[name] = round(float(torch.isin(removed, lowest).double().mean()), 4)
        return out

    # -------------------------------------------------------------------------------------------- results
    def describe(self) -> dict:
        o = self.options
        out = super().describe()
        by_group = {g: float(self.class_w[[c for c, m in enumerate(self.membership) if m == g]].sum())
                    for g in ("many", "medium", "few") if g in self.membership}
        out["ltap"] = {
            "alpha_final": self.alpha(),
            "suppressed_final": self.suppressed(),
            "vote_epochs": self.vote_epochs,
            "vote_split": self.vote_split,
            "class_weights": {"kind": o.class_weights, "by_group": by_group},
            "vote_matrix": self.vote.summary(self.membership) if self.vote is not None else None,
            "rounds": self.vote.history if self.vote is not None else [],
            "choices": {
                "groups": "structured channels; a channel's vector = all its group members' slices",
                "normalisation": (f"{o.normalize} over all live channels of the network, per criterion"
                                  if o.normalize != "group-mean" else "mean within each group, per criterion"),
                "cosine": "1 + mean over the window of cos(w, minibatch loss gradient)",
                "second_order": ("0.5 * sum_i mean_t(g_i^2) * w_i^2 (Fisher diagonal)" if o.second_order == "fisher"
                                 else "mean over the window of 0.5 * <w, g>^2 (public code)"),
                "rounds": "one per pruning stage" if o.vote_every == "stage" else "one per epoch of the pruning phase",
                "suppression": ("p(m) ∝ 1/alpha_m, weight redistributed uniformly" if o.suppression == "inverse"
                                else "none"),
                "importance": "I = D @ w / rounds, alpha = softmax(I / tau)",
            },
        }
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "accumulator": self.accumulator.state_dict(),
                "vote": self.vote.state_dict() if self.vote is not None else None}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.accumulator.load_state_dict(state["accumulator"], self.device)
        if self.vote is not None:
            self.vote.load_state_dict(state["vote"])
