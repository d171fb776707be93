"""``method: ltap`` -- the trainer adapter of :class:`~tailwise.methods.ltap.pruner.LTAP`: the schedule and the
records; every pruning and voting decision is the pruner's.

Schedule (paper: "continuous pruning after the 100th epoch" of 200): the first stage after epoch ``start_epoch``,
then every ``stage_interval`` epochs (10: not given by the paper; the last stage at epoch 140, before the LR drops
at 160, leaving 60 epochs of fine-tuning). Gradient criteria accumulate over the ``score_window`` epochs that end
with each stage.

``vote: trial`` evaluates the trial masks on the run's validation split (``data.val``) at every stage, each
trial's BatchNorm statistics recomputed on ``trial_bn_batches`` training batches (the run's sampler and
augmentation, drawn for a private epoch key per stage: the same batches for every criterion of a stage).
``vote: paper`` closes an LT-Vote round at every stage (``vote_every: stage``: section 2.3's loop "prune, then
update the weights from the pruned model's validation performance, repeat"; the votes of the round that ends at
stage ``k+1`` go to the criteria that chose stage ``k``'s channels; the last round closes ``stage_interval``
epochs after the last stage, for the record) or at every epoch end of the pruning phase (``vote_every: epoch``, the
public code's cadence), from the epoch's own validation accuracy.

``metrics.jsonl`` per epoch: ``ltap_alpha`` and ``ltap_suppressed`` in force after the epoch, ``ltap_vote`` for an
epoch that closed a round (trial: every criterion's trial accuracy per class and group, the votes, alpha before
(``alpha_base``) and after suppression, the mixed mask's accuracy right after pruning). The trials' wall-clock
time per stage is in ``result.json`` (``method.overhead.trial_s_per_stage``): ``metrics.jsonl`` holds no clock
readings but ``time_s``, so that a resumed or branched run's records equal the uninterrupted run's.
"""
from __future__ import annotations

from ...errors import ConfigError
from .. import register_method
from ..batches import training_batches
from ..pruning import StructuredPruningMethod, check_pruning_options
from .pruner import LTAP, LTAPOptions

TRIAL_BATCHNORM_KEY = 3_000_000  # private epoch keys: never a training epoch's batches (DO's are 1e6 and 2e6)


def check_ltap_options(o: LTAPOptions, cfg) -> None:
    check_pruning_options(o, cfg)
    if o.score_window > o.start_epoch or (o.stages > 1 and o.score_window > o.stage_interval):
        raise ConfigError(f"method.score_window: {o.score_window} must be <= start_epoch and (with several stages) "
                          "<= stage_interval")


@register_method
class LTAPMethod(StructuredPruningMethod):
    """LTAP on the trainer's schedule (module docstring)."""

    name = "ltap"
    summary = ("LTAP: multi-stage structured pruning, importance criteria mixed with weights set by LT-Vote from "
               "each criterion's trial-mask accuracy per class on validation")
    Options = LTAPOptions
    Pruner = LTAP

    @classmethod
    def check_options(cls, options, cfg) -> None:
        check_ltap_options(options, cfg)

    def make_pruner(self, ctx, example) -> LTAP:
        return LTAP(ctx.model, example, ctx.data.class_counts, self.options, seed=ctx.cfg.run.seed,
                    groups=ctx.data.groups)

    def setup(self, ctx) -> None:
        super().setup(ctx)
        o = self.options
        self.vote_split = ctx.cfg.data.val
        last, end = self.stage_epochs[-1], ctx.cfg.train.epochs
        close = [last + o.stage_interval] if last + o.stage_interval <= end else []
        if o.vote == "trial":
            self.vote_epochs = list(self.stage_epochs)
        elif o.vote_every == "stage":
            self.vote_epochs = self.stage_epochs + close
        else:
            self.vote_epochs = list(range(self.stage_epochs[0], (close or [last])[0] + 1))

    def in_scoring_window(self, epoch: int) -> bool:
        """Epoch ``epoch`` (0-based) is one of the ``score_window`` epochs that end with a stage."""
        return any(0 <= s - (epoch + 1) < self.options.score_window for s in self.stage_epochs)

    def first_active_epoch(self) -> int:
        """The first epoch of the first scoring window (LT-Vote's reference round closes at the first stage)."""
        return self.options.start_epoch - self.options.score_window

    # ---------------------------------------------------------------------------------------------- hooks
    def step_inputs(self, ctx, val: dict | None) -> dict:
        """``vote: trial``: the validation split's per-class accuracy, and as calibration batches the training
        batches of a private epoch key per stage (the run's sampler and augmentation; the training batches and
        random state are untouched). ``paper`` closes its rounds in on_epoch_end from the epoch's own accuracy."""
        if self.options.vote != "trial":
            return {}
        key = TRIAL_BATCHNORM_KEY + self.pruner.stage
        return {"val": lambda: ctx.evaluate("val")["per_class"],
                "calibration": lambda: training_batches(ctx, ctx.train_loader.sampler, key)}

    def on_epoch_end(self, ctx, epoch: int, val: dict | None) -> dict:
        pruner = self.pruner
        vote_record = self._close_paper_round(epoch, val)
        record = super().on_epoch_end(ctx, epoch, val)  # prunes with the alpha now in force
        if "pruning_stage" in record and self.options.vote == "trial":
            vote_record = pruner.round_record
        record["ltap_alpha"] = {k: round(v, 6) for k, v in pruner.alpha().items()}
        record["ltap_suppressed"] = pruner.suppressed()
        if vote_record is not None:
            record["ltap_vote"] = vote_record
        return record

    def _close_paper_round(self, epoch: int, val: dict | None) -> dict | None:
        if self.options.vote != "paper" or (epoch + 1) not in self.vote_epochs:
            return None
        if not val or val.get("per_class") is None:
            return {"skipped": "no per-class validation accuracy this epoch"}
        record = self.pruner.close_round(val["per_class"])
        return record if record is not None else {"round": 0, "reference": True}

    def describe(self) -> dict:
        out = super().describe()
        out["ltap"].update(vote_epochs=self.vote_epochs, vote_split=self.vote_split)
        return out
