"""tailwise: long-tailed image recognition with parameter-space rebalancing."""
__version__ = "0.1.0"


def load_model(path, device="cpu"):
    """Load the deployable model of a run directory (see :func:`tailwise.deploy.load_model`)."""
    from .deploy import load_model as _load

    return _load(path, device)


__all__ = ["__version__", "load_model"]
