"""``tailwise.LTAP`` -- the Long-Tailed Adaptive Pruner (paper sections 2-4, App. D-E) as a standalone pruner on
the shared structured pruning machinery (:class:`tailwise.methods.pruning.StructuredPruner`: budgets, global
bottom-K selection, masks on weights/gradients/momentum, physical compression).

Per stage: the five criteria (:mod:`.criteria`) are computed over the scoring window (the ``observe`` calls since
the last stage), each normalised over all live channels, mixed as ``S = sum_k alpha_k s_k`` over the active
criteria (eq. 1), and the globally lowest-``S`` live channels are removed until the stage's budget is met.

``vote`` chooses ``alpha``:

* ``trial`` (default; beyond the paper): at every stage, before pruning, each criterion prunes a copy of the model
  to the stage's budget alone (:mod:`.trial`), its BatchNorm statistics are recomputed on ``trial_bn_batches``
  calibration batches (20 by default), and it is evaluated on the validation split (weights and statistics restored
  bit for bit afterwards, optimizer and RNG untouched); LT-Vote (:mod:`.vote`) credits each criterion per class
  against the mean over criteria, Proposition 1's class weights turn votes into importance (eq. 4), ``alpha =
  softmax(I / tau)`` (eq. 5), one criterion is suppressed (section 2.2), and the stage prunes with that updated
  ``alpha``. Why: read literally, eq. 6 credits one accuracy change to every active criterion alike, so the weights
  move only through the random suppression (issue #21); the trial gives each criterion its own evidence. The
  statistics pass goes beyond the issue's first build too (``trial_bn_batches: 0`` keeps the running statistics):
  with half the budget removed, stale statistics break every trial network alike (:mod:`.trial`). Cost per stage:
  per criterion, ``trial_bn_batches`` forward passes and one validation evaluation; the same for the mixed mask
  (recorded).
* ``paper``: the literal reading (eq. 6): a round closes at every stage (or, in the trainer, every epoch of the
  pruning phase); every criterion active in the round that just ended gets a vote for each class whose validation
  accuracy rose since the previous round. ``adaptive``, its former name, still loads (with a warning).
* ``uniform``: ``alpha_k = 1/K`` over the selected criteria, no suppression ("w.o. vote" in the paper).
* ``public-code``: the public code's effective behaviour (audit section 3): the fixed weights magnitude 0,
  avg_magnitude 1.25, cosine 1, taylor-1 1, taylor-2 1 (normalised to sum 1 for reporting; the ranking is the
  same), ``second_order: public-code`` and one-shot pruning (``stages: 1``) unless set explicitly.

Paper defaults: ``stages`` P = 5 (eq. 7), ``tau`` 0.5 (section 4.1's "pau"), hard zeroing (section 2.2 (iii):
"setting the weights ... to zero"), tail-biased class weights (Proposition 1).

The budget and the normalisation are chosen to land at the paper's operating point, which keeps 30% of the
parameters at F = 22.6-24% of the dense MACs: with no target given, ``target_macs: 0.25`` (F = 25% by
construction), and ``normalize: group-mean``. Measured from the Balanced Softmax ResNet-32 epoch-99 checkpoint
(CIFAR-10-LT IR 100, uniform mix, 5 stages, ``round_to`` 8, gradient criteria from random inputs;
``benchmarks/ltap_budget_probe.py``): ``target_params: 0.3`` ends at F = 49% under either
normalisation (``round_to: 8`` keeps at least 8 of the first stage's 16 channels; at ``round_to: 1``, group-mean
reaches F = 28%); ``target_macs: 0.25`` keeps 18.7% of the parameters under group-mean and 10.7% under the public
code's global l2, which protects the residual-stream channels (their vectors span many tensors) and strips the
block-internal ones. What moves F: ``target_macs`` sets it; at a parameter budget, ``normalize`` and ``round_to``.
Under group-mean ``avg_magnitude`` duplicates ``magnitude`` (:mod:`.criteria`), so the default criteria are the
other four. The trainer's schedule (``start_epoch`` 100 of 200, ``stage_interval`` 10) is
:class:`~tailwise.methods.ltap.method.LTAPMethod`'s.
"""
from __future__ import annotations

import itertools
import time
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ...data.longtail import ShotGroups, shot_groups
from ...errors import ConfigError
from ...eval.metrics import group_accuracy
from ...options import bounded, choice
from ..batchnorm import recompute_batchnorm
from ..pruning import PruningOptions, StructuredPruner, _identity
from .criteria import (CRITERIA, GRADIENT_CRITERIA, NORMALISATIONS, SECOND_ORDER, ChannelLayout, CriteriaAccumulator,
                       default_criteria, mix, normalise)
from .trial import loader_accuracy, trial_accuracy
from .vote import CLASS_WEIGHTS, INCREMENTS, LTVote, as_accuracy, class_weights

VOTES = ("trial", "paper", "uniform", "public-code", "adaptive")  # adaptive: the former name of paper
# the public code's weights at the pruning step (audit section 3: the vote never updates, magnitude is suppressed)
PUBLIC_CODE_WEIGHTS = {"magnitude": 0.0, "avg_magnitude": 1.25, "cosine_similarity": 1.0,
                       "taylor_first_order": 1.0, "taylor_second_order": 1.0}


DUPLICATE_UNDER_GROUP_MEAN = (
    "method.criteria: under normalize: group-mean, avg_magnitude ranks channels exactly as magnitude does (the "
    "channels of a group own equally many live elements, so ||w_c|| / n_c is ||w_c|| times a per-group constant, "
    "which the group mean divides out): the vote counts one criterion twice and uniform gives it double weight")


@dataclass
class LTAPOptions(PruningOptions):
    stages: int | None = bounded(None, 1)  # P; None: 5 (paper), or 1 (one-shot) with vote: public-code
    stage_interval: int = bounded(10, 1)  # trainer: epochs between stages (not in the paper)
    # per-criterion scale: group-mean (within each channel group) | l2 (public code) | mean | max (over all live
    # channels of the network)
    normalize: str = choice(*NORMALISATIONS, default="group-mean")
    # trial (per-criterion trial masks) | paper (eq. 6 literally) | uniform (w.o. vote) | public-code
    vote: str = choice(*VOTES, default="trial")
    # subset of the five, any order; None: all five, but avg_magnitude under group-mean (where it equals magnitude)
    criteria: list[str] | None = None
    class_weights: str = choice(*CLASS_WEIGHTS, default="tail")  # tail (Proposition 1) | counts | inverse | uniform
    tau: float = bounded(0.5, 0.0, low_open=True)  # softmax temperature (section 4.1)
    second_order: str | None = None  # fisher (default) | public-code (0.5 <w,g>^2; default with vote: public-code)
    vote_every: str = choice("stage", "epoch", default="stage")  # vote: paper -- when a round closes
    # indicator: +1 per class above the comparison (eq. 6) | gain: + the margin / 100 (Lemma A); the comparison is
    # the mean over criteria (trial) or the previous round's accuracy (paper)
    vote_increment: str = choice(*INCREMENTS, default="indicator")
    suppression: str = choice("inverse", "none", default="inverse")  # inverse: one criterion per round, p ∝ 1/alpha
    score_window: int = bounded(1, 1)  # trainer: epochs before each stage over which gradient criteria accumulate
    # vote: trial -- calibration batches on which each trial's BatchNorm statistics are recomputed (then restored);
    # 0: the trials read the model's running statistics
    trial_bn_batches: int = bounded(20, 0)

    def __post_init__(self):
        if self.target_params is None and self.target_macs is None and self.target_sparsity is None:
            self.target_macs = 0.25  # F = 25%: the paper's operating point (F 22.6-24% at 30% of the parameters)
        super().__post_init__()
        if self.vote == "adaptive":
            warnings.warn("method.vote: 'adaptive' is now called 'paper' (the literal reading of eq. 6); the "
                          "default is 'trial'", FutureWarning, stacklevel=2)
            self.vote = "paper"
        if self.stages is None:
            self.stages = 1 if self.vote == "public-code" else 5
        if self.second_order is None:
            self.second_order = "public-code" if self.vote == "public-code" else "fisher"
        if self.second_order not in SECOND_ORDER:
            raise ConfigError(f"method.second_order: {self.second_order!r} is not allowed; allowed: "
                              f"{', '.join(SECOND_ORDER)}")
        if self.criteria is None:
            self.criteria = default_criteria(self.normalize)
        if not self.criteria:
            raise ConfigError("method.criteria: give at least one of " + ", ".join(CRITERIA))
        unknown = [c for c in self.criteria if c not in CRITERIA]
        if unknown:
            raise ConfigError(f"method.criteria: {unknown[0]!r} is not allowed; allowed: {', '.join(CRITERIA)}")
        if len(set(self.criteria)) != len(self.criteria):
            raise ConfigError(f"method.criteria: {self.criteria} lists a criterion twice")
        self.criteria = [c for c in CRITERIA if c in self.criteria]  # canonical order
        if self.normalize == "group-mean" and {"magnitude", "avg_magnitude"} <= set(self.criteria):
            warnings.warn(DUPLICATE_UNDER_GROUP_MEAN, UserWarning, stacklevel=2)
        if self.vote == "public-code" and not any(PUBLIC_CODE_WEIGHTS[c] > 0 for c in self.criteria):
            raise ConfigError("method.criteria: with vote: public-code, magnitude alone has weight 0; "
                              "add another criterion")


class LTAP(StructuredPruner):
    """LTAP on any PyTorch model and loop (module docstring).

    ``class_counts``: training images per class (Proposition 1's vote weights); ``groups``: the many / medium /
    few membership the records use (default: from ``class_counts``, thresholds 100 / 20); the options are
    :class:`LTAPOptions`' fields. ``step(val)`` takes the validation feedback of the vote: a loader of ``(x, y)``
    batches, or a function returning the model's per-class accuracy in percent. ``step(val, calibration=...)``:
    the batches (``x`` or ``(x, y)``; a re-iterable, or a function returning a fresh iterable) on whose first
    ``trial_bn_batches`` each trial's BatchNorm statistics are recomputed, such as training batches; by default the
    inputs of a ``val`` loader.

    >>> import torch, tailwise
    >>> from tailwise.models import build_model
    >>> model = build_model("resnet20", 3)
    >>> x, y = torch.randn(12, 3, 32, 32), torch.arange(12) % 3
    >>> ltap = tailwise.LTAP(model, x[:1], class_counts=[100, 30, 5], target_params=0.5, stages=2)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.01)
    >>> for stage in range(2):
    ...     loss = torch.nn.functional.cross_entropy(model(x), y)
    ...     opt.zero_grad(); ltap.observe(loss); opt.step(); ltap.enforce(opt)
    ...     event = ltap.step([(x, y)])  # trial vote on the validation batches, then prune
    >>> small = ltap.compress()
    >>> sum(p.numel() for p in small.parameters()) <= 0.5 * sum(p.numel() for p in model.parameters())
    True
    """

    Options = LTAPOptions

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, class_counts: Sequence[int],
                 options: LTAPOptions | None = None, *, seed: int = 0, groups: ShotGroups | None = None, **kwargs):
        super().__init__(model, example_inputs, options, seed=seed, **kwargs)
        o = self.options
        self.class_counts = list(class_counts)
        self.class_w = class_weights(self.class_counts, o.class_weights)
        self.shot_groups = groups if groups is not None else shot_groups(self.class_counts)
        self.vote: LTVote | None = None
        self.round_record: dict | None = None  # the vote's record of the last stage
        self.trial_times: list[float] = []  # seconds the trials took, per stage (wall clock)
        self._calibrate = None  # within step(): recomputes the trial network's BatchNorm statistics
        if o.vote in ("trial", "paper"):
            self.vote = LTVote(o.criteria, self.class_w, o.tau, o.suppression == "inverse", o.vote_increment,
                               seed=seed)

    @property
    def computed(self) -> list[str]:
        """The criteria computed at a stage (all selected ones but those public-code weighs 0)."""
        o = self.options
        return [c for c in o.criteria if o.vote != "public-code" or PUBLIC_CODE_WEIGHTS[c] > 0]

    @property
    def wants_gradients(self) -> bool:
        return any(c in GRADIENT_CRITERIA for c in self.computed)

    def build_structures(self, model) -> None:
        super().build_structures(model)
        self.layout = ChannelLayout(model, self.groups)
        self.accumulator = CriteriaAccumulator(self.layout, self.computed, self.options.second_order)

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

    # ------------------------------------------------------------------------------------------------ loop
    def accumulate(self, grad_scale: float = 1.0) -> None:
        self.accumulator.accumulate(self.model, grad_scale)

    def close_round(self, accuracy) -> dict | None:
        """``vote: paper``: close an LT-Vote round with the model's per-class validation accuracy (percent); the
        first call records the reference (returns None)."""
        return self.vote.observe(accuracy)

    def evaluator(self, val):
        """``val`` as a function returning per-class accuracy: itself if callable, else a loader of ``(x, y)``."""
        if val is None or callable(val):
            return val
        return loader_accuracy(self.model, val, len(self.class_counts))

    def calibrator(self, val, calibration):
        """The function that recomputes a trial network's BatchNorm statistics on the first ``trial_bn_batches``
        batches of ``calibration`` (default: the inputs of a ``val`` loader); None with ``trial_bn_batches: 0``."""
        n = self.options.trial_bn_batches
        if self.options.vote != "trial" or n == 0:
            return None
        source = calibration if calibration is not None else (None if val is None or callable(val) else val)
        if source is None:
            raise ValueError("LTAP trial vote with trial_bn_batches > 0 recomputes each trial's BatchNorm statistics: "
                             "pass step(val, calibration=batches), or a loader as val, or set trial_bn_batches=0")
        device = next(self.model.parameters()).device

        def inputs():
            for batch in itertools.islice(source() if callable(source) else source, n):
                yield (batch[0] if isinstance(batch, (tuple, list)) else batch).to(device)

        return lambda: recompute_batchnorm(self.model, inputs())

    def step(self, val=None, *, calibration=None, reduce=_identity, decay_steps: int | None = None,
             **record) -> dict:
        """One LTAP stage: criteria, vote (``trial``: trial masks on ``val``, statistics recomputed on
        ``calibration``; ``paper``: a round closed with the accuracy of the model on ``val``, when given), mix,
        prune. The vote's record is ``self.round_record``, the trials' wall-clock time ``self.trial_times[-1]``."""
        evaluate = self.evaluator(val)
        if self.options.vote == "trial" and evaluate is None:
            raise ValueError("LTAP with vote: trial needs validation feedback: step(val_loader)")
        self._calibrate = self.calibrator(val, calibration)
        self.round_record = None
        try:
            if self.options.vote == "paper" and evaluate is not None:
                self.round_record = self.close_round(as_accuracy(evaluate()))
            event = super().step(evaluate, reduce=reduce, decay_steps=decay_steps, **record)
            event.update(alpha=self.alpha(), suppressed=self.suppressed(), agreement=self._agreement())
            if self.options.vote == "trial":
                self.round_record["mixed"] = self._accuracy_record(self._trial({}, evaluate))
        finally:
            self._calibrate = None
        return event

    def scores(self, val=None, reduce=_identity) -> list[torch.Tensor]:
        live = [self.masks.live(i) for i in range(len(self.groups))]
        flat_live = torch.cat(live)
        raw = self.accumulator.compute(self.model, live)
        self.accumulator.reset()
        segments = [(o, g.size) for o, g in zip(self.layout.offsets, self.groups)]
        names = list(raw)
        normalised = dict(zip(names, reduce([normalise(raw[k].cpu(), flat_live, self.options.normalize, segments)
                                             for k in names])))  # identical on every process
        self._last = (normalised, flat_live)
        if self.options.vote == "trial":
            self.round_record = self._trial_vote(normalised, val)
        return self.layout.split(mix(normalised, self.alpha()))

    def _trial(self, selection: dict[int, torch.Tensor], evaluate) -> torch.Tensor:
        live = [self.masks.live(i) for i in range(len(self.groups))]
        return trial_accuracy(self.model, self.groups, self.layout.tensors(self.model), live, selection, evaluate,
                              self._calibrate)

    def _accuracy_record(self, accuracy: torch.Tensor) -> dict:
        groups = group_accuracy(accuracy, self.shot_groups)
        return {"per_class": [None if a != a else round(float(a), 4) for a in accuracy],
                "groups": {g: None if v is None else round(v, 4) for g, v in groups.items()}}

    def _trial_vote(self, normalised: dict[str, torch.Tensor], evaluate) -> dict:
        """Every criterion's trial at this stage's budget, then one LT-Vote round (eq. 4-6 with the trial credit)."""
        start = time.perf_counter()
        stage = self.stage + 1
        accuracy = {k: self._trial(self.select(self.layout.split(normalised[k]), stage), evaluate)
                    for k in self.vote.criteria}
        record = self.vote.observe_trials([accuracy[k] for k in self.vote.criteria])
        record["trials"] = {k: self._accuracy_record(a) for k, a in accuracy.items()}
        record["trial_bn_batches"] = self.options.trial_bn_batches if self._calibrate is not None else 0
        self.trial_times.append(round(time.perf_counter() - start, 3))  # wall clock: not in the vote's history
        return record

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
        membership = list(self.shot_groups.membership)
        by_group = {g: float(self.class_w[[c for c, m in enumerate(membership) if m == g]].sum())
                    for g in ("many", "medium", "few") if g in membership}
        return {"overhead": {"trial_s_per_stage": list(self.trial_times)}, "ltap": {
            "alpha_final": self.alpha(),
            "suppressed_final": self.suppressed(),
            "class_weights": {"kind": o.class_weights, "by_group": by_group},
            "vote_matrix": self.vote.summary(membership) if self.vote is not None else None,
            "rounds": self.vote.history if self.vote is not None else [],
            "choices": {
                "groups": "structured channels; a channel's vector = all its group members' slices",
                "criteria": ("avg_magnitude left out: under group-mean it ranks channels as magnitude does"
                             if o.normalize == "group-mean" and "avg_magnitude" not in o.criteria
                             else "as selected"),
                "budget": "target_macs 0.25 when no target is given (the paper's F)",
                "normalisation": (f"{o.normalize} over all live channels of the network, per criterion"
                                  if o.normalize != "group-mean" else "mean within each group, per criterion"),
                "cosine": "1 + mean over the window of cos(w, minibatch loss gradient)",
                "second_order": ("0.5 * sum_i mean_t(g_i^2) * w_i^2 (Fisher diagonal)" if o.second_order == "fisher"
                                 else "mean over the window of 0.5 * <w, g>^2 (public code)"),
                "vote": {"trial": "per stage, each criterion's trial mask at the stage budget on validation; "
                                  f"credit ({o.vote_increment}) against the per-class mean over criteria; every "
                                  "criterion votes every round (beyond the paper: eq. 6 has no k); "
                                  + (f"each trial's BatchNorm statistics recomputed on {o.trial_bn_batches} "
                                     "calibration batches, then restored" if o.trial_bn_batches
                                     else "the trials read the model's running BatchNorm statistics"),
                         "paper": "eq. 6 literally: the criteria active in a round share its accuracy gains",
                         "uniform": "alpha = 1/K, no suppression (w.o. vote)",
                         "public-code": "fixed weights 0/1.25/1/1/1 (audit section 3)"}[o.vote],
                "suppression": ("p(m) ∝ 1/alpha_m, weight redistributed uniformly" if o.suppression == "inverse"
                                else "none"),
                "importance": "I = D @ w / rounds, alpha = softmax(I / tau)",
            },
        }}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "accumulator": self.accumulator.state_dict(),
                "vote": self.vote.state_dict() if self.vote is not None else None, "trial_times": list(self.trial_times)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.accumulator.load_state_dict(state["accumulator"], next(self.model.parameters()).device)
        if self.vote is not None:
            self.vote.load_state_dict(state["vote"])
        self.trial_times = list(state["trial_times"])
