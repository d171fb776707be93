"""Neuron growth and removal during training (``method: plasticity``; Sakai & Hotta 2025, arXiv 2507.09940).

Every ``every_epochs`` epochs (E_mod; the paper: 30 on CIFAR, 20 on ImageNet-LT), at the end of the epoch,
within every modifiable layer (a channel group of :func:`tailwise.compress.groups.channel_groups`), up to and
including epoch ``last_event_epoch`` (1-based; default ``train.epochs - 1``, the paper's "throughout training":
events after epochs E, 2E, ... while one epoch is left). The paper says nothing about where the events fall
against the learning-rate schedule. With the LDAM-DRW CIFAR schedule (LR / 100 at epochs 160 and 180) and
E_mod 30 the last event lands after epoch 180, when the LR drops to 1e-5 and the network can no longer adapt to
the removal: measured on CIFAR-10-LT (``docs/benchmarks.md``, neuron growth section) the training loss doubles
at that event and stays there (Balanced Softmax: 68.54% against 72.44% without the method).
``last_event_epoch: 150`` keeps every event in the base-LR phase (the same recipe otherwise: 72.30%).

1. **Ranking.** Channel ``c`` scores ``s_c = sum_t sum_{k in in(c)} |dL_w/dW_k|_t``: the L1 magnitude of the
   gradient of its *incoming* weights (the output rows of the group's producer convs), accumulated over every
   step ``t`` of the epoch that ends at the event (``accumulate: epoch``) or only its last step
   (``last_batch``), under the class-reweighted loss ``L_w = 1/N sum_i w_{y_i} l_i`` with per-class weights
   ``w_c ∝ n_c^-p`` normalised to mean 1 over classes (``reweight_power`` p = 1: inverse frequency), so the
   minority classes drive the ranking. ``ranking: l1`` scores ``sum_{k in in(c)} |W_k|`` at the event instead
   (the paper's Table 4 alternative); ``reweight: false`` ranks with the training loss's own gradient.
2. **Removal and duplication.** With ``k = floor(alpha * n)`` for a group of ``n`` channels, the ``k``
   lowest-scoring channels are removed, never one created at the previous event (``exempt``), and the ``k``
   highest-scoring of the remaining channels are duplicated into the freed slots, so every layer keeps its
   width (and the network its parameter count and MACs) at all times. Surgery edits the tensors in place.
3. **Function-preserving duplication.** The copy gets its source's incoming weights (and bias) and BatchNorm
   entries, running statistics included; every consumer's outgoing weights of the source are split 50/50
   between source and copy. Then the copy's BN ``gamma`` and ``beta`` are perturbed by ``N(0, bn_noise^2)``
   (the paper's "randomized BatchNorm parameters", so that the two copies receive different gradients);
   with ``bn_noise: 0`` the network computes exactly the same function before and after a duplication.
4. **Weight scaling** (``weight_scaling: true``). Removing channels drops their outgoing contribution. For each
   consumer tensor ``W`` (its input slice belonging to the group), measured before the surgery::

       s = sqrt( sum_{c in group} ||W[:, c]||^2  /  sum_{c in group, c not removed} ||W[:, c]||^2 )

   and the consumer's whole group slice is multiplied by ``s`` after the 50/50 split. This keeps the
   Frobenius norm of the consumer's effective (split channels merged) weights, i.e. the magnitude of its
   output for uncorrelated unit-variance inputs; behind a BatchNorm it keeps the BN's running statistics
   valid and the effective step size of the scale-invariant weights unchanged. Duplication alone needs no
   scaling (the split keeps the function), so ``s = 1`` exactly when the removed channels had zero outgoing
   weights.
5. **Optimizer state.** Every state tensor of the optimizer with the shape of an edited parameter (SGD's
   momentum buffer) undergoes the same linear edit as the parameter: a copy inherits its source's momentum
   for the incoming weights and BN entries, outgoing momentum is split and scaled like the weights (so the
   merged pair's velocity is unchanged), surviving channels keep theirs. The noise is not applied to state.
   Parameters are edited in place, so the optimizer keeps the same parameter objects and needs no rebuild.

Scoring cost. The training loss is left unchanged (``training_loss`` returns exactly what the trainer would
compute). On scoring steps only (the epoch before each event, or its last batch), when the ranking uses the
reweighted gradient, ``training_loss`` also computes ``dL/dz`` at the logits (the loss node only), reweights
its rows by ``w_{y_i}`` and runs one ``torch.autograd.grad`` from the logits to the producers' incoming
weights only (``retain_graph``; no other weight gradients are formed). That is an extra partial backward on
1 epoch in ``every_epochs``; every other step costs what the baseline costs. Without reweighting the scores
come from the trainer's own backward (``after_backward``) at no extra cost.

Scope: ``internal`` (default; a BasicBlock's conv1 outputs / conv2 inputs, no residual coupling),
``residual`` (channels tied by residual additions, duplicated/removed in every member at once) or ``all``.
With a ``NormedLinear`` (LDAM) head, residual-scope surgery of the last stage is not exactly
function-preserving (the head normalises its input features and weight columns).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compress.groups import channel_groups
from ..config import bounded, choice
from ..errors import ConfigError, TrainingError
from . import Method, register_method


@dataclass
class PlasticityOptions:
    every_epochs: int = bounded(30, 1)  # E_mod: an event after epochs E, 2E, ... (1-based)
    alpha: float = bounded(0.3, 0.0, 0.5, low_open=True)  # fraction per event
    scope: str = choice("internal", "residual", "all", default="internal")
    ranking: str = choice("gradient", "l1", default="gradient")
    accumulate: str = choice("epoch", "last_batch", default="epoch")
    reweight: bool = True  # rank with the class-reweighted loss's gradient
    reweight_power: float = bounded(1.0, 0.0)  # w_c ∝ n_c^-p, mean 1 over classes
    weight_scaling: bool = True
    bn_noise: float = bounded(0.05, 0.0)  # sigma of the copy's gamma/beta perturbation
    exempt: str = choice("copies", "pairs", "none", default="copies")  # from removal
    last_event_epoch: int | None = None  # no event after this epoch (1-based); None: train.epochs - 1


def last_event(o: PlasticityOptions, cfg) -> int:
    """The last epoch (1-based) that may end in an event: ``last_event_epoch``, or ``train.epochs - 1``."""
    return o.last_event_epoch if o.last_event_epoch is not None else cfg.train.epochs - 1


def class_weights(counts, power: float) -> torch.Tensor:
    """``w_c ∝ n_c^-power`` normalised to mean 1 (float64)."""
    n = torch.as_tensor(list(counts), dtype=torch.float64)
    w = n.pow(-power)
    return w / w.mean()


def _summary(s: torch.Tensor) -> dict:
    s = s.double()
    q = torch.quantile(s, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)).tolist()
    return {"min": q[0], "q25": q[1], "median": q[2], "q75": q[3], "max": q[4], "mean": float(s.mean())}


@register_method
class Plasticity(Method):
    name = "plasticity"
    summary = ("neuron growth and removal: every every_epochs epochs duplicate the top-alpha channels of each layer by "
               "class-reweighted gradient and remove the bottom alpha (widths unchanged)")
    Options = PlasticityOptions

    def __init__(self, options: PlasticityOptions):
        super().__init__(options)
        self.history: list[dict] = []
        self.window: list[torch.Tensor] | None = None
        self.window_steps = 0
        self.recent: list[torch.Tensor] = []
        self.last_surgery: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def check_options(cls, o: PlasticityOptions, cfg) -> None:
        last = last_event(o, cfg)
        if o.every_epochs > last:
            raise ConfigError(f"method.every_epochs ({o.every_epochs}) leaves no growth event before epoch {last} "
                              f"(train.epochs {cfg.train.epochs}); lower method.every_epochs")

    # ---------------------------------------------------------------------------------------------- set-up
    def setup(self, ctx) -> None:
        o = self.options
        self.example = ctx.data.train.example(1).float().to(ctx.device)
        self.groups = channel_groups(ctx.model, self.example, o.scope)
        if not self.groups:
            raise TrainingError(f"method plasticity: the model has no {o.scope} channel groups to modify; "
                                "try method.scope=all")
        self.last_event = last_event(o, ctx.cfg)
        self.weights = class_weights(ctx.data.class_counts, o.reweight_power if o.reweight else 0.0)
        self.generator = torch.Generator().manual_seed(ctx.cfg.run.seed + 11)
        self.recent = [torch.zeros(0, dtype=torch.long) for _ in self.groups]
        # incoming slices: the producers' output rows (weight, bias) -> the score of each channel
        self.incoming = [[s for s in g.slices if s.module_name in g.producers and s.dim == 0] for g in self.groups]
        params = {}
        for slices in self.incoming:
            for s in slices:
                t = getattr(ctx.model.get_submodule(s.module_name), s.tensor_name)
                params[id(t)] = (s.module_name, s.tensor_name)
        self.score_tensors = list(params.values())

    # ------------------------------------------------------------------------------------------- schedule
    def event_after(self, epoch: int) -> bool:
        """An event runs at the end of 0-based ``epoch``."""
        e = epoch + 1
        return e % self.options.every_epochs == 0 and e <= self.last_event

    def event_epochs(self) -> list[int]:
        return [e for e in range(self.options.every_epochs, self.last_event + 1, self.options.every_epochs)]

    def scoring_step(self, ctx) -> bool:
        if self.options.ranking != "gradient" or not self.event_after(ctx.epoch):
            return False
        if self.options.accumulate == "epoch":
            return True
        loader = ctx.trainer.train_loader
        return loader.position == len(loader)  # the loader sets position = b + 1 before yielding batch b

    # ----------------------------------------------------------------------------------------------- hooks
    def training_loss(self, ctx, x, y):
        if not (self.options.reweight and self.scoring_step(ctx)):
            return None
        return self.reweighted_scores(ctx, x, y)  # (loss, logits): the trainer still counts train_acc

    def reweighted_scores(self, ctx, x, y):
        """The training loss of batch ``(x, y)`` (graph kept for the trainer's backward), accumulating the
        per-channel gradient magnitude of ``L_w = 1/N sum_i w_{y_i} l_i`` on the incoming weights."""
        logits = ctx.model(x)
        loss = ctx.loss_fn(logits.float(), y)
        scaler = getattr(ctx.trainer, "scaler", None)
        scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
        (dz,) = torch.autograd.grad(loss * (scale * ctx.batch_share), logits, retain_graph=True)
        dz = dz * self.weights.to(dz.device, dz.dtype)[y].unsqueeze(1)
        tensors = [getattr(ctx.model.get_submodule(m), t) for m, t in self.score_tensors]
        grads = torch.autograd.grad(logits, tensors, grad_outputs=dz, retain_graph=True, allow_unused=True)
        grads = ctx.dist.average_all_(list(grads))  # the global batch's gradient, as the trainer's (engine.dist)
        by_id = {id(t): (g / scale if g is not None and scale != 1.0 else g) for t, g in zip(tensors, grads)}
        self._accumulate(ctx, lambda t: by_id.get(id(t)))
        return loss, logits

    def after_backward(self, ctx) -> None:
        if self.options.reweight or not self.scoring_step(ctx):
            return
        scaler = getattr(ctx.trainer, "scaler", None)
        scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
        self._accumulate(ctx, lambda t: None if t.grad is None else t.grad / scale)

    def _accumulate(self, ctx, grad_of) -> None:
        def magnitude(t):
            g = grad_of(t)
            return None if g is None else g.abs()

        terms = self._per_channel(ctx.model, magnitude)
        if self.window is None:
            self.window = terms
        else:
            self.window = [a + b.to(a.device) for a, b in zip(self.window, terms)]
        self.window_steps += 1

    def _per_channel(self, model, values) -> list[torch.Tensor]:
        """Per group: sum over its incoming slices of ``values(tensor)`` reduced over all but dim 0."""
        out, cache = [], {}
        for g, slices in zip(self.groups, self.incoming):
            total = None
            for s in slices:
                tensor = getattr(model.get_submodule(s.module_name), s.tensor_name)
                if id(tensor) not in cache:
                    v = values(tensor)
                    if v is not None:
                        v = v.detach().double()
                        v = v.flatten(1).sum(1) if v.dim() > 1 else v
                    cache[id(tensor)] = v
                red = cache[id(tensor)]
                if red is None:
                    continue
                part = red[s.index.to(red.device)]
                total = part if total is None else total + part
            if total is None:
                total = torch.zeros(g.size, dtype=torch.float64, device=self.example.device)
            out.append(total)
        return out

    def on_epoch_end(self, ctx, epoch: int, val: dict | None) -> dict:
        if not self.event_after(epoch):
            return {}
        if self.options.ranking == "l1":
            scores = self._per_channel(ctx.model, lambda t: t.abs())
        else:
            scores = self.window or [torch.zeros(g.size, dtype=torch.float64) for g in self.groups]
        scores = ctx.dist.average_all_(scores)  # identical ranking on every process
        event = self.apply_event(ctx, [s.cpu() for s in scores], epoch)
        self.window, self.window_steps = None, 0
        return {"plasticity": event}

    # ---------------------------------------------------------------------------------------------- surgery
    def select(self, gi: int, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots, sources): the removed channels (ascending) and the channels duplicated into them."""
        n = self.groups[gi].size
        k = int(self.options.alpha * n)
        exempt = torch.zeros(n, dtype=torch.bool)
        if self.options.exempt != "none":
            exempt[self.recent[gi]] = True
        order = torch.argsort(scores.double(), stable=True)
        removable = order[~exempt[order]]
        removed = removable[:k]
        rest = torch.ones(n, dtype=torch.bool)
        rest[removed] = False
        descending = torch.argsort(-scores.double(), stable=True)
        sources = descending[rest[descending]][:len(removed)]
        removed = removed[:len(sources)]
        return torch.sort(removed).values, sources

    @torch.no_grad()
    def apply_event(self, ctx, scores: list[torch.Tensor], epoch: int | None = None) -> dict:
        """Remove / duplicate in every group by ``scores`` (higher = more important); the metrics record."""
        layers, self.last_surgery = {}, {}
        for gi, (g, s) in enumerate(zip(self.groups, scores)):
            slots, sources = self.select(gi, s)
            scale = self.surgery(ctx, gi, slots, sources) if len(slots) else {}
            self.last_surgery[gi] = (slots, sources)
            new = slots if self.options.exempt != "pairs" else torch.cat([slots, sources])
            self.recent[gi] = new.clone()
            layers[g.name] = {"duplicated": len(sources), "removed": len(slots), "width": g.size,
                              "score": _summary(s),
                              "removed_max": float(s[slots].max()) if len(slots) else None,
                              "duplicated_min": float(s[sources].min()) if len(sources) else None,
                              "scale": scale}
        event = {"epoch": epoch, "steps": self.window_steps if self.options.ranking == "gradient" else 0,
                 "duplicated": sum(v["duplicated"] for v in layers.values()),
                 "removed": sum(v["removed"] for v in layers.values()), "layers": layers}
        self.history.append(event)
        return event

    @torch.no_grad()
    def surgery(self, ctx, gi: int, slots: torch.Tensor, sources: torch.Tensor) -> dict:
        """Overwrite channels ``slots`` of group ``gi`` with copies of ``sources``; returns the weight-scaling
        factor of each consumer tensor."""
        g, model, o = self.groups[gi], ctx.model, self.options
        state = ctx.optimizer.state
        removed_mask = torch.zeros(g.size, dtype=torch.bool)
        removed_mask[slots] = True

        def edit(tensor: torch.Tensor, fn) -> None:
            fn(tensor.data)
            for value in state.get(tensor, {}).values():
                if torch.is_tensor(value) and value.shape == tensor.shape:
                    fn(value)

        scales = {}
        for s in g.slices:
            module = model.get_submodule(s.module_name)
            tensor = getattr(module, s.tensor_name)
            index = s.index.to(tensor.device)
            dst, src = index[slots.to(tensor.device)], index[sources.to(tensor.device)]
            d = s.dim
            incoming = (s.module_name in g.producers and d == 0) or s.module_name in g.norms
            if incoming:
                edit(tensor, lambda t: t.index_copy_(d, dst, t.index_select(d, src)))
                if s.module_name in g.norms and s.tensor_name == "weight":  # running statistics follow
                    for buf in ("running_mean", "running_var"):
                        b = getattr(module, buf, None)
                        if b is not None:
                            b.index_copy_(0, dst, b.index_select(0, src))
                if s.module_name in g.norms and o.bn_noise > 0:
                    noise = torch.randn(len(dst), generator=self.generator, dtype=torch.float64) * o.bn_noise
                    tensor.data.index_add_(0, dst, noise.to(tensor.device, tensor.dtype))
                continue
            # consumer: split the sources' outgoing weights between source and copy, then scale
            factor = 1.0
            if o.weight_scaling:
                energy = tensor.data.index_select(d, index).double().pow(2)
                dims = [i for i in range(energy.dim()) if i != d]
                per_channel = energy.sum(dim=dims) if dims else energy
                kept = per_channel[~removed_mask.to(per_channel.device)].sum()
                total = per_channel.sum()
                factor = float((total / kept).sqrt()) if kept > 0 else 1.0

            def split(t, d=d, dst=dst, src=src, index=index, factor=factor):
                half = t.index_select(d, src) * 0.5
                t.index_copy_(d, src, half)
                t.index_copy_(d, dst, half)
                if factor != 1.0:
                    t.index_copy_(d, index, t.index_select(d, index) * factor)

            edit(tensor, split)
            scales[f"{s.module_name}.{s.tensor_name}"] = factor
        return scales

    # ---------------------------------------------------------------------------------------------- results
    def describe(self) -> dict:
        return {**super().describe(), "event_epochs": self.event_epochs(),
                "class_weights": [round(float(w), 6) for w in self.weights],
                "groups": [{"name": g.name, "kind": g.kind, "width": g.size} for g in self.groups],
                "scoring": ("extra partial backward of the reweighted loss to the incoming weights on scoring steps"
                            if self.options.ranking == "gradient" and self.options.reweight else
                            "trainer's gradient" if self.options.ranking == "gradient" else "weight l1 at the event"),
                "history": self.history}

    def state_dict(self) -> dict:
        return {"window": None if self.window is None else [w.cpu() for w in self.window],
                "window_steps": self.window_steps, "recent": [r.clone() for r in self.recent],
                "history": list(self.history), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        device = self.example.device
        self.window = None if state["window"] is None else [w.to(device) for w in state["window"]]
        self.window_steps = state["window_steps"]
        self.recent = [r.cpu().long() for r in state["recent"]]
        self.history = list(state["history"])
        self.generator.set_state(state["generator"].cpu())
