"""tailwise: long-tailed image recognition with parameter-space rebalancing."""
__version__ = "0.1.0"


def load_model(path, device="cpu"):
    """Load the deployable model of a run directory (see :func:`tailwise.deploy.load_model`)."""
    from .deploy import load_model as _load

    return _load(path, device)


def run(recipe, overrides=(), out=None, resume=False, branch_from=None):
    """Train and evaluate one run (like ``tailwise run``); returns the ``result.json`` record.

    ``recipe`` is a YAML path or a bundled recipe name, ``overrides`` a list of ``section.key=value`` strings,
    ``out`` the run directory (default ``runs/<recipe>-<timestamp>``); ``resume=True`` continues ``out``;
    ``branch_from`` a plain run's end-of-epoch checkpoint to start from (:mod:`tailwise.engine.branch`).
    """
    import time
    from pathlib import Path

    from .config import apply_overrides, config_from_dict, load_config, load_recipe
    from .engine.dist import from_environment, launched
    from .engine.trainer import Trainer, prepare_run_dir
    from .errors import TrainingError

    if resume:  # overrides may only change how the run executes (threads, progress), see the CLI
        cfg = config_from_dict(apply_overrides(load_recipe(Path(out) / "config.yaml"), list(overrides)))
    else:
        cfg = load_config(recipe, list(overrides))
    if out is None and cfg.run.out is None and launched()[1] > 1:  # before joining the job: fail at once
        raise TrainingError("under torchrun give the run directory with --out (every process must use the same)")
    dist, device = from_environment(cfg.run.device)  # under torchrun: join the job (rank 0 alone writes)
    out = Path(out or cfg.run.out or f"runs/{Path(str(recipe)).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    if not resume:
        failed = None
        if dist.is_main:
            try:
                prepare_run_dir(cfg, out)
            except TrainingError as exc:
                failed = exc
        if dist.any(failed is not None):
            raise failed or TrainingError(f"rank 0 could not create the run directory {out}")
    trainer = Trainer(cfg, out, dist=dist, device=device)
    if resume:
        trainer.resume()
    elif branch_from is not None:
        try:
            trainer.branch(branch_from)
        except BaseException:  # nothing half-written: the new run directory goes again
            if dist.is_main:
                import shutil

                shutil.rmtree(out, ignore_errors=True)
            raise
    return trainer.fit()


__all__ = ["__version__", "load_model", "run"]
