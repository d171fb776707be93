"""Neuron growth and removal during training (``method: plasticity``; Sakai & Hotta 2025, arXiv 2507.09940).

The trainer's adapter over the standalone :class:`~.growth.Plasticity` (``tailwise.Plasticity``), which holds the
whole method; this module decides *when*. In short (details and equations in the docstrings of
:class:`~.growth.Plasticity` and :mod:`.surgery`):

1. **Ranking.** Each channel scores the epoch-accumulated L1 magnitude of the gradient of its incoming weights
   under the class-reweighted loss ``L_w = 1/N sum_i w_{y_i} l_i``, ``w_c ∝ n_c^-p`` (mean 1), observed on the
   epoch that ends in an event (``accumulate: epoch``) or its last batch (``last_batch``); ``ranking: l1`` uses
   the weights' L1 norm at the event.
2. **Events.** After epochs E_mod, 2·E_mod, … (``every_epochs``; the paper: 30 on CIFAR, 20 on ImageNet-LT), in
   every layer the ``floor(alpha · n)`` lowest-scoring channels are removed (never a member of the previous
   event's pairs: ``exempt: pairs``) and the as many highest-scoring are duplicated into the freed slots; widths
   never change. Scores are multiplied first by each channel's split factor (``pair_scores: lineage``: 2 per
   50/50 split in its lineage, which halved its outgoing weights and with them its gradient score).
3. **Duplication.** The copy takes its source's incoming weights (``weight_noise``: plus noise) and running
   statistics, fresh BN γ and β drawn from the layer's own distribution (``copy_bn: layer``; ``perturb``: the
   source's plus ``N(0, bn_noise²)``) and zero momentum (the source's is kept, ``source_momentum``); the
   outgoing weights are split 50/50 between source and copy.
4. **Weight scaling.** Each consumer's group slice is multiplied by
   ``s = sqrt(sum_c ||W[:, c]||² / sum_{c kept} ||W[:, c]||²)``, keeping the Frobenius norm of its effective
   weights after the removal.
5. **Schedule.** The paper says "throughout training" and nothing about the learning-rate schedule; measured on
   CIFAR-10-LT (``docs/benchmarks.md``), an event after the LR decay cannot be recovered from (events to epoch
   180 under the LDAM-DRW schedule: 68.54% against 72.44% without the method; to 150: 72.30%). So
   ``last_event_epoch: null`` (default) stops the events while the LR is at its base value
   (:func:`.options.base_lr_end`: the epoch before the first step milestone; the cosine's midpoint), and the
   event epochs are logged at the start.
6. **Twin diagnostic.** Before and after each event's surgery (``twins_before`` / ``twins`` in its record: the
   count before an event tells whether the previous event's copies diverged in the ``E_mod`` epochs since) and at
   the end (``twins`` in the last epoch's
   metrics.jsonl record and in result.json): per layer the channels whose incoming-weight cosine with another
   exceeds ``twin_cosine`` (0.99), and the effective width (distinct channels).

Scoring cost: the training loss is left unchanged (``training_loss`` returns exactly what the trainer would
compute); on scoring steps with the reweighted ranking it also runs the object's partial backward from the logits
to the incoming weights (:meth:`Plasticity.observe`), on 1 epoch in ``every_epochs``. Without reweighting the
scores come from the trainer's own backward (``after_backward``) at no extra cost.
"""
from __future__ import annotations

from ...errors import ConfigError
from .. import Method, register_method
from .growth import Plasticity
from .options import PlasticityOptions, event_epochs, last_event


@register_method
class PlasticityMethod(Method):
    name = "plasticity"
    summary = ("neuron growth and removal: every every_epochs epochs duplicate the top-alpha channels of each layer by "
               "class-reweighted gradient and remove the bottom alpha (widths unchanged)")
    Options = PlasticityOptions

    def __init__(self, options: PlasticityOptions):
        super().__init__(options)
        self.history: list[dict] = []
        self.final_twins: dict | None = None

    @classmethod
    def check_options(cls, o: PlasticityOptions, cfg) -> None:
        last = last_event(o, cfg.train)
        if o.every_epochs > last:
            raise ConfigError(f"method.every_epochs ({o.every_epochs}) leaves no growth event before epoch {last} "
                              f"(train.epochs {cfg.train.epochs}, schedule {cfg.train.schedule}); lower "
                              "method.every_epochs or set method.last_event_epoch")

    def setup(self, ctx) -> None:
        example = ctx.data.train.example(1).float().to(ctx.device)
        self.growth = Plasticity(ctx.model, ctx.class_counts, example, self.options, seed=ctx.cfg.run.seed + 11)
        self.events = event_epochs(self.options, ctx.cfg.train)
        self.epochs = ctx.cfg.train.epochs
        ctx.log(f"plasticity: growth events after epochs {self.events} (E_mod {self.options.every_epochs}, "
                f"last_event_epoch {last_event(self.options, ctx.cfg.train)})")

    def first_active_epoch(self) -> int:
        """The epoch that ends in the first event (E_mod - 1, 0-based): its steps score the channels. Before it
        the method neither changes nor observes training, so a run may branch from the plain run's checkpoint
        ``epoch_{E_mod - 1}.pt`` (``epoch_029.pt`` for E_mod 30)."""
        return self.options.every_epochs - 1

    def event_after(self, epoch: int) -> bool:
        """An event runs at the end of 0-based ``epoch``."""
        return epoch + 1 in self.events

    def selectable(self, epoch: int) -> bool:
        """Not an epoch that ends in an event: its validation accuracy was measured before the surgery, so it does
        not describe the model that a best-on-validation checkpoint would store."""
        return not self.event_after(epoch)

    def scoring_step(self, ctx) -> bool:
        if self.options.ranking != "gradient" or not self.event_after(ctx.epoch):
            return False
        if self.options.accumulate == "epoch":
            return True
        loader = ctx.train_loader
        return loader.position == len(loader)  # the loader sets position = b + 1 before yielding batch b

    def training_loss(self, ctx, x, y):
        if not (self.options.reweight and self.scoring_step(ctx)):
            return None
        logits = ctx.model(x)
        loss = ctx.loss_fn(logits.float(), y)
        self.growth.observe(loss * ctx.batch_share, logits, y, scale=ctx.grad_scale(), reduce=ctx.dist.average_all_)
        return loss, logits  # the trainer still counts train_acc

    def after_backward(self, ctx) -> None:
        if not self.options.reweight and self.scoring_step(ctx):
            self.growth.observe(scale=ctx.grad_scale())

    def on_epoch_end(self, ctx, epoch: int, val: dict | None) -> dict:
        out = {}
        if self.event_after(epoch):
            scores = ctx.dist.average_all_(self.growth.scores())  # identical ranking on every process
            event = {"epoch": epoch, **self.growth.event(ctx.optimizer, scores)}
            self.history.append(event)
            out["plasticity"] = event
        if epoch == self.epochs - 1:
            self.final_twins = out["twins"] = self.growth.twins()
        return out

    def describe(self) -> dict:
        o = self.options
        return {**super().describe(), "event_epochs": self.events,
                "class_weights": [round(float(w), 6) for w in self.growth.weights],
                "groups": [{"name": g.name, "kind": g.kind, "width": g.size} for g in self.growth.groups],
                "scoring": ("extra partial backward of the reweighted loss to the incoming weights on scoring steps"
                            if o.ranking == "gradient" and o.reweight else
                            "trainer's gradient" if o.ranking == "gradient" else "weight l1 at the event"),
                "twins": self.final_twins, "history": self.history}

    def state_dict(self) -> dict:
        return {"growth": self.growth.state_dict(), "history": list(self.history), "twins": self.final_twins}

    def load_state_dict(self, state: dict) -> None:
        self.growth.load_state_dict(state["growth"])
        self.history = list(state["history"])
        self.final_twins = state["twins"]
