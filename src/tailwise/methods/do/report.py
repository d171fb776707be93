"""DO's deployable ensembles and the end-of-run report of the aggregations (``seeds/003_…``, Tables 8 and 9).

:func:`build_ensembles` gives the :class:`~tailwise.models.ensemble.SubModelEnsemble` of every sub-model under
each aggregation asked for (the same member modules; SADE's group weights learned on the unlabelled test images),
:func:`cost_report` the prediction cost per image and, for ``instance``, the mean weights per class group.
"""
from __future__ import annotations

import copy

import torch

from ...models.ensemble import SubModelEnsemble, aggregation_report
from .batches import split_batches


def aggregation_settings(ctx, steps: int, lr: float, floor: float) -> dict:
    """The test-time aggregation settings; the two views use the training crop padding and flip (not the
    policy)."""
    aug = ctx.train_loader.augment
    pad, flip = (aug.crop_padding, aug.flip) if aug is not None else (4, True)
    return {"steps": steps, "lr": lr, "floor": floor, "padding": pad, "flip": flip, "seed": int(ctx.cfg.run.seed)}


def build_ensembles(ctx, submodels: list[dict], modes, settings: dict) -> dict[str, SubModelEnsemble]:
    """One ensemble per aggregation in ``modes`` over the sub-model states ``submodels`` and the live network
    (copies in eval mode, shared by the ensembles)."""
    members = []
    for state in [*submodels, None]:
        member = copy.deepcopy(ctx.model).eval()
        if state is not None:
            member.load_state_dict(state)
        members.append(member)
    base = SubModelEnsemble(members, "average", **settings)
    out = {}
    for mode in modes:
        test = split_batches(ctx, "test") if mode == "group" else None
        extra = {"group_lambda": base.learn_group_weights(x for x, _ in test)} if test is not None else {}
        out[mode] = base.with_aggregation(mode, **extra)
    return out


def cost_report(ctx, ensemble: SubModelEnsemble) -> dict:
    """:func:`~tailwise.models.ensemble.aggregation_report` over the test split ({} without it)."""
    batches = split_batches(ctx, "test")
    if batches is None:
        return {}
    sync = (lambda: torch.cuda.synchronize(ctx.device)) if ctx.device.type == "cuda" else (lambda: None)
    return {**aggregation_report(ensemble, batches, ctx.data.groups.membership, sync), "split": "test"}
