"""Evaluate a model (or a method's ``predict``) on a split, and re-evaluate a finished run."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..data.dataset import Split
from ..data.factory import make_eval_loader
from ..data.longtail import ShotGroups
from .metrics import summarize


def evaluate_split(predict: Callable[[torch.Tensor], torch.Tensor], split: Split, groups: ShotGroups,
                   mean, std, batch_size: int = 512, device="cpu", adjust: Callable | None = None,
                   precision: torch.dtype | None = None, channels_last: bool = False, dist=None, workers: int = 0) -> dict:
    """Accuracy summary of ``argmax(adjust(predict(x)))`` over ``split`` (in order, unaugmented). In a
    data-parallel run (``dist``, :class:`tailwise.engine.dist.Dist`) every process predicts its
    ``rank_slice`` of the split and the predictions are gathered in order, so every process gets the summary
    of the whole split, each image counted once. ``workers`` decoding processes serve a streamed split;
    ``precision`` is the autocast dtype of the forward passes (None: full precision)."""
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    loader = make_eval_loader(split, batch_size, mean, std, device, channels_last, workers, rank=rank, world=world)
    device = torch.device(device)
    preds = []
    with torch.no_grad(), torch.autocast(device.type, dtype=precision, enabled=precision is not None):
        for x, _ in loader:
            logits = predict(x).float()
            preds.append((adjust(logits) if adjust is not None else logits).argmax(1))
    preds = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=device)
    if dist is not None:
        preds = dist.gather(preds)
    return summarize(preds.cpu(), split.labels, groups)


def evaluate_run(run_dir: Path, device: str = "cpu") -> dict:
    """Rebuild a finished run's test split from its ``config.yaml`` and evaluate its deployed ``model/`` as the run
    evaluated it (its ``train.precision`` on ``device``, its memory format); returns the ``accuracy`` block of
    ``result.json``."""
    from ..config import config_from_dict, load_recipe
    from ..data.dataset import build_data
    from ..deploy import load_model
    from ..engine.precision import DTYPES, resolve_precision
    from ..errors import TailwiseError
    from ..losses import build_loss

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise TailwiseError(f"{run_dir} has no config.yaml: not a tailwise run directory")
    cfg = config_from_dict(load_recipe(run_dir / "config.yaml"))
    model = load_model(run_dir, device)
    data = build_data(cfg.data, log=lambda msg: None)
    loss = build_loss(cfg.loss.name, data.class_counts, **cfg.loss.kwargs()).to(device)
    pre = model.preprocess
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    precision = DTYPES[resolve_precision(cfg.train.precision, torch.device(device))]
    acc = evaluate_split(model, data.test, data.groups, pre["mean"], pre["std"], cfg.train.eval_batch_size, device,
                         loss.adjust_logits, precision=precision, channels_last=cfg.train.channels_last,
                         workers=cfg.run.workers)
    return {k: v for k, v in acc.items() if k != "group_sizes"}
