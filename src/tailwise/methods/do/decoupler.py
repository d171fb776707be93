"""DO's Taylor-guided Parameter Decoupling (``seeds/003_…``, "Taylor-guided Parameter Decoupling") as a standalone
object: score the entries, prune the least important gradually while the user's loop retrains, freeze the rest,
hand back the stage's sub-model and re-initialise the pruned entries. Works in any PyTorch loop.

Example (one stage's decoupling; ``train_one_step`` is the user's own step, calling ``after_backward`` /
``after_step`` like every training step of the run)::

    decoupler = Decoupler(model, exempt="classifier")
    ... train stage 1, with decoupler.after_backward() after backward and decoupler.after_step(optimizer) after step
    scores = decoupler.importance(stage_batches, loss_fn)     # E_w = sum_b (w g_b)^2
    for ratio in pruning_ratios(0.5, steps=10):               # Eq. 4, Δt = 10 per 10% increment
        decoupler.prune(scores, ratio, optimizer)
        train_one_step()
    submodel_1 = decoupler.freeze(fresh=make_model(), optimizer=optimizer)  # state dict of sub-model 1
    recompute_batchnorm(...)                                   # its BatchNorm statistics (see .batchnorm)
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from .masks import FreezeMasks, decoupled_parameters, select_pruned


def taylor_importance(model: nn.Module, tensors: list[torch.Tensor], batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                      loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """``E_w = sum_b (w · g_b)^2`` per entry of each of ``tensors`` (float64; :meth:`Decoupler.importance`), the
    model in eval mode so its BatchNorm statistics are not touched."""
    scores = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in tensors]
    was = model.training
    model.eval()
    try:
        for x, y in batches:
            grads = torch.autograd.grad(loss_fn(model(x).float(), y), tensors, allow_unused=True)
            for sc, g, p in zip(scores, grads, tensors):
                if g is not None:
                    sc.add_((p.detach() * g).double().pow(2))
    finally:
        model.train(was)
    return scores


class Decoupler:
    """Freeze masks over ``model``'s decoupled tensors (:func:`~.masks.decoupled_parameters` less ``exempt``),
    ranked within each tensor (``rank_scope="layer"``) or over all (``"global"``)."""

    def __init__(self, model: nn.Module, rank_scope: str = "layer", exempt: str = "classifier"):
        self.model, self.rank_scope = model, rank_scope
        self.params = decoupled_parameters(model, exempt)
        self.masks = FreezeMasks(self.params)

    @property
    def decouplings(self) -> int:
        """Decouplings done so far (the highest stage that owns an entry)."""
        return max((int(o.max()) for o in self.masks.owner), default=0)

    def importance(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        """``E_w = sum_b (w · g_b)^2`` per entry (float64), ``g_b`` the gradient of ``loss_fn(model(x_b), y_b)``
        (the paper's first-order Taylor importance, summed over the batches), with the model in eval mode so its
        BatchNorm statistics are not touched."""
        return taylor_importance(self.model, [p for _, p in self.params], batches, loss_fn)

    def select(self, scores: list[torch.Tensor], ratio: float) -> list[torch.Tensor]:
        """Boolean masks (CPU) of the ``ratio`` fraction of the free entries with the lowest score."""
        return select_pruned([s.cpu() for s in scores], self.masks.free(), ratio, self.rank_scope)

    def prune(self, scores: list[torch.Tensor], ratio: float, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Hold the ``ratio`` lowest-scored free entries at zero from now on (their momentum too) until
        :meth:`freeze`; a larger ratio later extends the set (the selections are nested)."""
        self.masks.set_pruning(self.select(scores, ratio))
        self.masks.enforce(optimizer)

    def pruned_state(self, scores: list[torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
        """The model's state with the ``ratio`` lowest-scored free entries zeroed (one-shot; the model itself is
        not changed): the γ sweep evaluates it."""
        state = dict(self.model.state_dict())
        for (name, p), pruned in zip(self.params, self.select(scores, ratio)):
            state[name] = p.detach() * (~pruned).to(p.device, p.dtype)
        return state

    def submodel_state(self) -> dict[str, torch.Tensor]:
        """The current sub-model: a copy of the model's state with the frozen entries of the decoupled tensors and
        zeros elsewhere (every other tensor, BatchNorm and exempt ones included, as it is)."""
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        for (name, _), owner in zip(self.params, self.masks.owner):
            state[name].mul_((owner != 0).to(state[name].dtype))
        return state

    @torch.no_grad()
    def freeze(self, fresh: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None) -> dict:
        """End the decoupling: the free entries not being pruned are frozen as the next stage's; returns the
        sub-model's state (:meth:`submodel_state`); the pruned entries are re-initialised from the same-named
        parameters of ``fresh`` (a newly initialised model of the architecture; None: left at zero) with their
        momentum zeroed, and train again from the next stage on."""
        if self.masks.pruning is None:
            raise RuntimeError("Decoupler.freeze: call prune() first (ratio 0 keeps every free entry)")
        pruned = self.masks.pruning
        self.masks.freeze([f & ~pr for f, pr in zip(self.masks.free(), pruned)], self.decouplings + 1)
        state = self.submodel_state()
        new = dict(fresh.named_parameters()) if fresh is not None else {}
        for (name, p), pr in zip(self.params, pruned):
            pr = pr.to(p.device)
            if name in new:
                p.data[pr] = new[name].detach().to(p.device, p.dtype)[pr]
            for value in (optimizer.state.get(p, {}).values() if optimizer is not None else ()):
                if torch.is_tensor(value) and value.shape == p.shape:
                    value[pr] = 0
        return state

    def after_backward(self) -> None:
        """Zero the gradients of frozen and pruned entries."""
        self.masks.mask_gradients()

    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Restore frozen entries, zero pruned ones, and zero both's momentum in ``optimizer``."""
        self.masks.enforce(optimizer)

    def state_dict(self) -> dict:
        return self.masks.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.masks.load_state_dict(state)
