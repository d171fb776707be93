"""The standalone neuron-growth object, :class:`Plasticity`: scores channels during training and, at an event,
duplicates the most important ones into the slots of the least important (Sakai & Hotta 2025, arXiv 2507.09940).
It works in any PyTorch training loop; the trainer's ``method: plasticity`` is a thin adapter over it
(:mod:`.method`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ...compress.groups import channel_groups
from ...options import build_dataclass
from .options import PlasticityOptions
from .surgery import column_energy, duplicate, is_incoming
from .twins import twin_report


def class_weights(counts, power: float) -> torch.Tensor:
    """``w_c ∝ n_c^-power`` normalised to mean 1 over the classes (float64): the paper's per-class gradient
    reweighting (``power`` 1: inverse frequency)."""
    n = torch.as_tensor(list(counts), dtype=torch.float64)
    w = n.pow(-power)
    return w / w.mean()


def _summary(s: torch.Tensor) -> dict:
    s = s.double()
    q = torch.quantile(s, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)).tolist()
    return {"min": q[0], "q25": q[1], "median": q[2], "q75": q[3], "max": q[4], "mean": float(s.mean())}


class Plasticity:
    """Neuron growth and removal for ``model`` (edited in place; every layer keeps its width).

    1. **Ranking** (:meth:`observe`). Channel ``c`` scores ``s_c = sum_t sum_{k in in(c)} |dL_w/dW_k|_t``: the L1
       magnitude of the gradient of its *incoming* weights (the producers' output rows), summed over the steps
       ``t`` observed since the last event, under the class-reweighted loss ``L_w = 1/N sum_i w_{y_i} l_i``,
       ``w_c ∝ n_c^-p`` normalised to mean 1 (:func:`class_weights`, ``reweight_power`` p). ``ranking: l1`` scores
       ``sum_{k in in(c)} |W_k|`` at the event instead (the paper's Table 4 alternative); ``reweight: false``
       ranks with the training loss's own gradient.
    2. **Selection** (:meth:`event`). Per layer of ``n`` channels, ``k = floor(alpha · n)``: the ``k``
       lowest-scoring channels are removed, never an exempt one (``exempt: pairs``, default: both members of the
       previous event's pairs, so the next event cannot overwrite a source before its copy has diverged;
       ``copies``: the copies only; ``none``), and the ``k`` highest-scoring remaining channels are duplicated
       into the freed slots. ``pair_scores: lineage`` (default) first multiplies each channel's score by its
       split factor ``f_c``: the 50/50 split halves a source's and its copy's outgoing weights, and with them the
       gradient reaching their incoming weights (``dL/da_c = W_out[:, c]^T dL/dz``), so raw scores rank a split
       channel at half a single channel's importance, and a channel split again at a quarter. ``f_c`` starts at 1;
       at each duplication the source's doubles and its copy inherits it (a fixed factor per split, not the
       members' current outgoing shares, which would blow up the score of a member whose outgoing weights have
       shrunk). ``rescale`` doubles only the previous event's pair members (which ``exempt: pairs`` already keeps
       from removal, so older splits stay deflated); ``raw`` ranks the raw scores. Each event records per layer
       ``pair_score_ratio`` (the previous event's members' median raw score over the layer's median),
       ``split_score_ratio`` (the same for the channels split at an earlier event) and ``split_outgoing_ratio``
       (the split channels' median ``f_c · ||W_out[:, c]||`` over the never-split channels' median outgoing norm:
       near 1 when the factor still matches what the split took, above 1 when their outgoing weights regrew),
       which measure the bias and the correction.
    3. **Surgery**: :func:`.surgery.duplicate` (copy, fresh BN γ/β, split and weight scaling, momentum).
    4. **Twins** (:meth:`twins`): :func:`.twins.twin_report` before every event's surgery (``twins_before``:
       ``E_mod`` epochs after the previous event, whether its copies diverged), after it, and on request.

    Scope: ``internal`` (default; a BasicBlock's conv1 outputs / conv2 inputs, no residual coupling; in a plain
    conv stack every conv's outputs), ``residual`` (channels tied by residual additions, duplicated / removed in
    every member at once) or ``all``. With a ``NormedLinear`` (LDAM) head, residual-scope surgery of the last
    stage is not exactly function-preserving (the head normalises its input features and weight columns).

    A plain loop (``reweight: true``, the default)::

        growth = Plasticity(model, class_counts, example_inputs=x[:1])
        for epoch in range(epochs):
            for x, y in loader:
                logits = model(x)
                loss = criterion(logits, y)
                if (epoch + 1) % 30 == 0:                  # the epoch that ends in an event
                    growth.observe(loss, logits, y)        # before backward: keeps the graph
                optimizer.zero_grad(); loss.backward(); optimizer.step()
            if (epoch + 1) % 30 == 0:
                print(growth.event(optimizer))             # in place; momentum edited like the weights

    With ``reweight=False`` call ``growth.observe()`` after ``loss.backward()`` instead (it reads ``.grad``).
    Options are :class:`PlasticityOptions` keys (``alpha=0.3``, ``scope="internal"``, …) or ``options=``; the
    schedule keys (``every_epochs``, ``accumulate``, ``last_event_epoch``) are the caller's business here.
    """

    def __init__(self, model: nn.Module, class_counts: Sequence[int], example_inputs: torch.Tensor,
                 options: PlasticityOptions | None = None, *, seed: int = 0, **keys):
        self.options = o = options if options is not None else build_dataclass(PlasticityOptions, keys, "Plasticity")
        self.model = model
        self.groups = channel_groups(model, example_inputs, o.scope)
        if not self.groups:
            raise ValueError(f"Plasticity: the model has no {o.scope} channel groups to modify; try scope='all'")
        self.device = example_inputs.device
        self.weights = class_weights(class_counts, o.reweight_power if o.reweight else 0.0)
        self.generator = torch.Generator().manual_seed(int(seed) % 2**64)
        self.window: list[torch.Tensor] | None = None
        self.window_steps = 0
        self.pairs = [(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)) for _ in self.groups]
        self.split = [torch.ones(g.size, dtype=torch.float64) for g in self.groups]  # f_c: 2^(splits in lineage)
        incoming = {(s.module_name, s.tensor_name) for g in self.groups for s in g.slices
                    if s.module_name in g.producers and s.dim == 0}
        self.score_tensors = sorted(incoming)

    # ---------------------------------------------------------------------------------------------- scoring
    def _tensor(self, module: str, name: str) -> torch.Tensor:
        return getattr(self.model.get_submodule(module), name)

    def observe(self, loss: torch.Tensor | None = None, logits: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, *, scale: float = 1.0,
                reduce: Callable[[list], list] | None = None) -> None:
        """Add one step's per-channel gradient magnitudes to the scores.

        ``observe(loss, logits, targets)`` (before ``loss.backward()``; the graph is kept): the gradient of the
        class-reweighted loss — ``dloss/dlogits`` with row ``i`` multiplied by ``w_{y_i}``, exact for a loss that
        is a mean of per-sample terms — back to the incoming weights only (one partial backward; no other weight
        gradient is formed). ``observe()`` (after ``loss.backward()``, ``reweight=False``): the ``.grad`` already
        there. ``scale``: a loss-scaling factor (the gradient is divided by it; the loss is multiplied by it
        before differentiating); ``reduce``: applied to the list of gradients before accumulating (e.g. an
        all-reduce average over data-parallel processes)."""
        tensors = [self._tensor(m, t) for m, t in self.score_tensors]
        if loss is None:
            if self.options.reweight and self.options.reweight_power != 0:
                raise ValueError("Plasticity.observe(): with reweight=True pass (loss, logits, targets) before "
                                 "backward; observe() without arguments reads the unweighted .grad")
            grads = [None if t.grad is None else t.grad.detach() for t in tensors]
        else:
            (dz,) = torch.autograd.grad(loss * scale, logits, retain_graph=True)
            dz = dz * self.weights.to(dz.device, dz.dtype)[targets].unsqueeze(1)
            grads = list(torch.autograd.grad(logits, tensors, grad_outputs=dz, retain_graph=True, allow_unused=True))
            if reduce is not None:
                grads = reduce(grads)
        magnitude = {id(t): None if g is None else (g / scale if scale != 1.0 else g).abs()
                     for t, g in zip(tensors, grads)}
        terms = self._per_channel(lambda t: magnitude.get(id(t)))
        self.window = terms if self.window is None else [a + b.to(a.device) for a, b in zip(self.window, terms)]
        self.window_steps += 1

    def _per_channel(self, values) -> list[torch.Tensor]:
        """Per group: the sum over its incoming slices of ``values(tensor)`` reduced over all but dim 0."""
        out, cache = [], {}
        for g in self.groups:
            total = torch.zeros(g.size, dtype=torch.float64, device=self.device)
            for s in g.slices:
                if not (s.module_name in g.producers and s.dim == 0):
                    continue
                tensor = self._tensor(s.module_name, s.tensor_name)
                if id(tensor) not in cache:
                    v = values(tensor)
                    if v is not None:
                        v = v.detach().double()
                        v = v.flatten(1).sum(1) if v.dim() > 1 else v
                    cache[id(tensor)] = v
                red = cache[id(tensor)]
                if red is not None:
                    total = total + red[s.index.to(red.device)].to(total.device)
            out.append(total)
        return out

    def scores(self) -> list[torch.Tensor]:
        """Per group, each channel's score for the next event (higher = more important): the observed gradient
        magnitudes (``ranking: gradient``; zeros before any observation) or the incoming weights' L1 norm
        (``l1``)."""
        if self.options.ranking == "l1":
            return self._per_channel(lambda t: t.abs())
        return self.window or [torch.zeros(g.size, dtype=torch.float64, device=self.device) for g in self.groups]

    # ---------------------------------------------------------------------------------------------- events
    def exempt(self, gi: int) -> torch.Tensor:
        """The channels of group ``gi`` that may not be removed at the next event (``exempt``)."""
        slots, sources = self.pairs[gi]
        return {"pairs": torch.cat([slots, sources]), "copies": slots, "none": slots[:0]}[self.options.exempt]

    def select(self, gi: int, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots, sources): the removed channels (ascending) and the channels duplicated into them."""
        n = self.groups[gi].size
        k = int(self.options.alpha * n)
        exempt = torch.zeros(n, dtype=torch.bool)
        exempt[self.exempt(gi)] = True
        order = torch.argsort(scores.double(), stable=True)
        removed = order[~exempt[order]][:k]
        rest = torch.ones(n, dtype=torch.bool)
        rest[removed] = False
        descending = torch.argsort(-scores.double(), stable=True)
        sources = descending[rest[descending]][:len(removed)]
        return torch.sort(removed[:len(sources)]).values, sources

    def _ratio(self, raw: torch.Tensor, members: torch.Tensor) -> float | None:
        """Median raw score of ``members`` over the layer's median (None without members or a zero median)."""
        median = float(raw.median())
        return float(raw[members].median()) / median if len(members) and median > 0 else None

    def _outgoing_norms(self, gi: int) -> torch.Tensor:
        """Per channel of group ``gi``: the L2 norm of its outgoing weights over every consumer slice."""
        g = self.groups[gi]
        total = torch.zeros(g.size, dtype=torch.float64)
        for s in g.slices:
            if is_incoming(g, s):
                continue
            total += column_energy(self._tensor(s.module_name, s.tensor_name).detach(), s.dim, s.index).cpu()
        return total.sqrt()

    def _rescaled(self, gi: int, raw: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The scores used for selection (``pair_scores``) and the bias measurements of the module docstring."""
        last = torch.cat(self.pairs[gi])
        factor = self.split[gi]
        older = factor > 1
        older[last] = False
        split = factor > 1
        out = self._outgoing_norms(gi)
        single = float(out[~split].median()) if bool((~split).any()) else 0.0
        stats = {"pair_score_ratio": self._ratio(raw, last),
                 "split_score_ratio": self._ratio(raw, older.nonzero().flatten()),
                 "split_channels": int(split.sum()),
                 "split_outgoing_ratio": (float((factor[split] * out[split]).median()) / single
                                          if bool(split.any()) and single > 0 else None)}
        if self.options.pair_scores == "lineage":
            return raw * factor, stats
        if self.options.pair_scores == "raw" or not len(last):
            return raw, stats
        scores = raw.clone()
        scores[last] *= 2.0
        return scores, stats

    @torch.no_grad()
    def event(self, optimizer: torch.optim.Optimizer | None = None,
              scores: list[torch.Tensor] | None = None) -> dict:
        """Remove and duplicate in every layer, in place; returns the event's record. ``optimizer``: its state
        (SGD momentum) is edited like the parameters it belongs to (the same parameter objects stay, no rebuild
        is needed); None when there is none. ``scores``: per group, instead of :meth:`scores`."""
        raw = [s.detach().double().cpu() for s in (scores if scores is not None else self.scores())]
        before = self.twins()  # E_mod epochs after the previous event: have its copies diverged?
        state = optimizer.state if optimizer is not None else {}
        layers, pairs = {}, []
        for gi, (g, s) in enumerate(zip(self.groups, raw)):
            ranked, bias = self._rescaled(gi, s)
            slots, sources = self.select(gi, ranked)
            scale = duplicate(self.model, g, slots, sources, state, self.options, self.generator) if len(slots) else {}
            pairs.append((slots.clone(), sources.clone()))
            factor = self.split[gi]
            factor[sources] *= 2.0
            factor[slots] = factor[sources]
            layers[g.name] = {"duplicated": len(sources), "removed": len(slots), "width": g.size,
                              "score": _summary(s), **bias,
                              "removed_max": float(ranked[slots].max()) if len(slots) else None,
                              "duplicated_min": float(ranked[sources].min()) if len(sources) else None,
                              "scale": scale}
        self.pairs = pairs
        record = {"steps": self.window_steps if self.options.ranking == "gradient" else 0,
                  "duplicated": sum(v["duplicated"] for v in layers.values()),
                  "removed": sum(v["removed"] for v in layers.values()), "layers": layers,
                  "twins_before": before, "twins": self.twins()}
        self.window, self.window_steps = None, 0
        return record

    def twins(self) -> dict:
        """:func:`.twins.twin_report` of the model now: per layer the channels with a twin (incoming-weight
        cosine > ``twin_cosine``) and the effective width, and their totals."""
        return twin_report(self.model, self.groups, self.options.twin_cosine)

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"window": None if self.window is None else [w.cpu() for w in self.window],
                "window_steps": self.window_steps, "pairs": [(a.clone(), b.clone()) for a, b in self.pairs],
                "split": [f.clone() for f in self.split],
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.window = None if state["window"] is None else [w.to(self.device) for w in state["window"]]
        self.window_steps = state["window_steps"]
        self.pairs = [(a.cpu().long(), b.cpu().long()) for a, b in state["pairs"]]
        self.split = [f.cpu().double() for f in state["split"]]
        self.generator.set_state(state["generator"].cpu())
