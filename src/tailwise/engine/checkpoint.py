"""Atomic checkpoints and the RNG state needed for exact resume.

Files are written to a temporary name in the same folder and renamed, so a crash never leaves a half-written
checkpoint or result. Checkpoints hold only tensors and primitives and are read with ``weights_only=True``: a file
that refers to anything else is refused unread, and no code from it runs.
"""
from __future__ import annotations

import os
import pickle
import random
import re
import warnings

import numpy as np
import torch

from ..atomic import atomic_write_bytes
from ..errors import TrainingError


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    atomic_write_bytes(path, lambda fh: torch.save(state, fh))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """The checkpoint dict at ``path``, read with ``weights_only=True``. A missing, cut, overwritten or foreign file,
    or one that refers to Python code, raises :class:`TrainingError` naming the file and what to do; torch's own
    text (which suggests ``weights_only=False``) is never passed on."""
    advice = "delete it to restart from scratch, or restore it from a copy"
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the refusal below says what matters
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise TrainingError(f"checkpoint {path} does not exist") from None
    except pickle.UnpicklingError as exc:
        code = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if code:
            raise TrainingError(f"checkpoint {path} refers to Python code ({code.group(1)}), which a tailwise "
                                "checkpoint never does; it was refused unread and nothing in it ran. Do not use this "
                                f"file: {advice}") from None
        raise TrainingError(f"checkpoint {path} is corrupt (not a tailwise checkpoint); {advice}") from None
    except Exception:  # noqa: BLE001 -- a cut or overwritten file fails anywhere in torch's reader
        raise TrainingError(f"checkpoint {path} is corrupt (cut short or overwritten); {advice}") from None
    if not isinstance(state, dict):
        raise TrainingError(f"checkpoint {path} is not a tailwise checkpoint (it holds a {type(state).__name__}); "
                            f"{advice}")
    return state


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) generator states, as tensors and primitives."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
