"""Shared fixtures for the data-package tests.

The real CIFAR-10 JPEG archive is decoded at most once per session (``cifar10_lt``), into a temporary cache
directory; every other build of it in the session reads that cache.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

CIFAR10_TAR = Path("/work/shared/data/cifar10-jpg.tar.gz")


# ------------------------------------------------------------------------------------------------------- helpers
def data_config(**values):
    """A validated DataConfig built the way the CLI builds it."""
    from tailwise.config import DataConfig, build_dataclass

    return build_dataclass(DataConfig, values, "data")


def save_image(path: Path, hwc: np.ndarray, fmt: str | None = None, **kwargs) -> Path:
    """Write an H x W x 3 uint8 array as an image file (format from the extension unless ``fmt``)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(hwc, dtype=np.uint8), "RGB").save(path, format=fmt, **kwargs)
    return path


def pil_decode_chw(data: bytes) -> np.ndarray:
    """Reference decode: PIL -> RGB -> 3 x H x W uint8."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1).copy()


@pytest.fixture
def cfg():
    return data_config


@pytest.fixture
def write_image():
    return save_image


# -------------------------------------------------------------------------------------------- isolation of caches
@pytest.fixture(scope="session", autouse=True)
def _private_default_cache(tmp_path_factory):
    """Never let a test write into the user's ~/.cache/tailwise."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TAILWISE_CACHE", str(tmp_path_factory.mktemp("default-cache")))
        yield


# ------------------------------------------------------------------------------------------- real CIFAR-10 data
@pytest.fixture(scope="session")
def cifar10_tar() -> Path:
    if not CIFAR10_TAR.is_file():
        pytest.skip(f"{CIFAR10_TAR} not available")
    return CIFAR10_TAR


@pytest.fixture(scope="session")
def cifar10_train_listing(cifar10_tar):
    """Independent listing of the train split from the archive (no decoding, no library code).

    Returns (classes, files, labels) in the contract's sample order: class folder sorted, then file name sorted.
    """
    by_class: dict[str, list[str]] = {}
    with tarfile.open(cifar10_tar) as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            parts = member.name.split("/")
            if parts[0] == ".":
                parts = parts[1:]
            if len(parts) == 4 and parts[0] == "cifar10" and parts[1] == "train" and parts[3].endswith(".jpg"):
                by_class.setdefault(parts[2], []).append("/".join(parts))
    classes = sorted(by_class)
    files, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted(by_class[name]):
            files.append(f)
            labels.append(label)
    return classes, files, labels


@pytest.fixture(scope="session")
def cifar10_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cifar10-cache")


@pytest.fixture(scope="session")
def cifar10_lt(cifar10_tar, cifar10_cache_dir):
    """build_data(cifar10-lt, IR 100, val=test) on the real archive: the one decode of the session."""
    from tailwise.data.dataset import build_data

    cfg = data_config(name="cifar10-lt", root=str(cifar10_tar), imbalance_ratio=100, val="test",
                      cache_dir=str(cifar10_cache_dir))
    return build_data(cfg, log=lambda msg: None)


@pytest.fixture(scope="session")
def cifar10_lt_build(cifar10_lt, cifar10_tar, cifar10_cache_dir):
    """Build other variants of the CIFAR-10 archive from the session's cache (no second decode)."""
    from tailwise.data.dataset import build_data

    def build(**values):
        values = {"name": "cifar10-lt", "root": str(cifar10_tar), "cache_dir": str(cifar10_cache_dir), **values}
        return build_data(data_config(**values), log=lambda msg: None)

    return build
