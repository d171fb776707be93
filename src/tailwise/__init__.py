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
    The run directory is held by this process alone, and resume refuses a checkpoint written under another
    config (:mod:`tailwise.engine.rundir`).
    """
    import time
    from pathlib import Path

    from .config import apply_overrides, config_from_dict, load_config, load_recipe
    from .engine.dist import from_environment, launched
    from .engine.rundir import claim_run_dir
    from .engine.trainer import Trainer
    from .errors import TrainingError

    if resume:  # overrides may only change how the run executes (threads, progress), see the CLI
        cfg = config_from_dict(apply_overrides(load_recipe(Path(out) / "config.yaml"), list(overrides)))
    else:
        cfg = load_config(recipe, list(overrides))
    if out is None and cfg.run.out is None and launched()[1] > 1:  # before joining the job: fail at once
        raise TrainingError("under torchrun give the run directory with --out (every process must use the same)")
    dist, device = from_environment(cfg.run.device)  # under torchrun: join the job (rank 0 alone writes)
    out = Path(out or cfg.run.out or f"runs/{Path(str(recipe)).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    # one process per run directory; a new run that fails before its first checkpoint leaves nothing behind
    with claim_run_dir(cfg, out, resume, dist) as checkpoint:
        trainer = Trainer(cfg, out, dist=dist, device=device)
        if checkpoint is not None:
            trainer.resume(checkpoint)
        elif branch_from is not None:
            trainer.branch(branch_from)
        return trainer.fit()


# the standalone method objects, imported on first use (``import tailwise`` stays light)
_LAZY = {"LTAP": "tailwise.methods.ltap", "MagnitudePruner": "tailwise.methods.pruning",
         "TaylorPruner": "tailwise.methods.pruning", "RandomPruner": "tailwise.methods.pruning",
         "Plasticity": "tailwise.methods.plasticity", "reparametrize": "tailwise.methods.more",
         "general_logits": "tailwise.methods.more", "more_loss": "tailwise.methods.more",
         "merge": "tailwise.methods.more",
         "Decoupler": "tailwise.methods.do", "SubModelEnsemble": "tailwise.methods.do"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tailwise' has no attribute {name!r}")


__all__ = ["__version__", "load_model", "run", *_LAZY]
