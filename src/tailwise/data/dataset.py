"""Build the train / validation / test splits of a run from its ``data`` config.

Flow: source reader (through the uint8 cache) -> long-tailed subset (Cao-exact) -> validation holdout ->
shot groups. The result holds uint8 tensors in memory (:class:`Split`; the loader augments them in batches), or,
for streamed list files (``data.stream``), image paths (:class:`~tailwise.data.stream.FileSplit`; the streaming
loader decodes them in worker processes). Code outside the loaders reads images only through ``split.batch``,
``split.example`` and ``split.image_shape``, which both kinds provide.

Validation (``data.val``): ``holdout`` (default) takes ``val_per_class`` images of every class from source
images the long-tailed subset did not use; a class without enough unused images gives the rest from its own
training images only if it is a head class (at least ``4 * val_per_class`` training images), otherwise it keeps
fewer validation images (reported in ``val.per_class``). Datasets with their own validation split (list files
with ``val_list``, image folders with a ``val/`` folder) use it. ``test`` evaluates on the test set (model
selection is then flagged as selected on test); ``train`` uses the training subset itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..errors import DataError
from . import sources
from .cache import cached_split
from .longtail import (ShotGroups, class_counts, imbalance_ratio, index_sha256, longtail_indices, profile_counts,
                       shot_groups)
from .stream import FileSplit
from .transforms import STREAM_IMAGE_SIZE, eval_resize

DATASETS = ("cifar10-lt", "cifar100-lt", "imagefolder", "listfile", "synthetic")


@dataclass
class Split:
    """A split decoded into memory."""

    images: torch.Tensor  # uint8 N x 3 x H x W
    labels: torch.Tensor  # int64 N

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def batch(self, idx) -> torch.Tensor:
        """Images ``idx``, uint8 ``N x 3 x H x W``."""
        return self.images[idx]

    def example(self, n: int = 1) -> torch.Tensor:
        """The first ``n`` images (fewer if the split is smaller)."""
        return self.images[:n]

    def subset(self, idx) -> "Split":
        """The split of images ``idx``, in that order."""
        return Split(self.images[idx], self.labels[idx])


@dataclass
class LongTailData:
    train: Split | FileSplit
    val: Split | FileSplit | None
    test: Split | FileSplit
    classes: list[str]
    groups: ShotGroups
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_counts(self) -> list[int]:
        return self.info["class_counts"]


def _to_split(raw: sources.RawSplit, idx: np.ndarray | None = None, root=None,
              size: int | None = None) -> Split | FileSplit:
    """The samples ``idx`` (all if None) of ``raw``: in memory, or file-backed (under ``root``, decoded to
    ``size``) when ``raw`` was read without decoding."""
    if raw.images is None:
        files = raw.files if idx is None else [raw.files[i] for i in idx]
        return FileSplit(root, files, raw.labels if idx is None else raw.labels[idx], size)
    images, labels = (raw.images, raw.labels) if idx is None else (raw.images[idx], raw.labels[idx])
    return Split(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(np.ascontiguousarray(labels)))


def _read_splits(cfg, log: Callable[[str], None]) -> tuple[sources.RawSplit, sources.RawSplit, sources.RawSplit | None]:
    """Read (train source, test, own val split or None) for the configured dataset."""
    name, root, size = cfg.name, cfg.root, cfg.image_size
    cache = False if (not cfg.cache or cfg.cache_dir is False) else cfg.cache_dir

    def progress(n):
        log(f"  decoded {n} images")

    if name == "synthetic":
        k, n, s = cfg.num_classes or 10, cfg.synthetic_per_class, size or 32
        return (sources.synthetic_split(k, n, s, seed=0), sources.synthetic_split(k, cfg.synthetic_test_per_class, s, seed=0, offset=1),
                None)
    if root is None:
        raise DataError(f"data.root is required for data.name={name}")
    if name in ("cifar10-lt", "cifar100-lt"):
        k = 10 if name == "cifar10-lt" else 100
        if sources.is_cifar_pickle_dir(root, k):
            return sources.read_cifar_pickles(root, k, "train"), sources.read_cifar_pickles(root, k, "test"), None
    if name == "listfile":
        def read_list(key):
            path = getattr(cfg, key)
            if cfg.streamed:
                return sources.list_file_entries(path, root, cfg.num_classes)
            return cached_split(path, {"reader": "listfile", "image_root": str(root), "size": size, "k": cfg.num_classes},
                                lambda: sources.read_list_file(path, root, size, cfg.num_classes, progress), cache, log)
        if not cfg.train_list or not cfg.test_list:
            raise DataError("data.name=listfile needs data.train_list and data.test_list (and optionally data.val_list)")
        train = read_list("train_list")
        return train, read_list("test_list"), read_list("val_list") if cfg.val_list else None

    def read_folder(split, classes=None):
        return cached_split(root, {"reader": "imagefolder", "split": split, "size": size, "classes": classes},
                            lambda: sources.read_image_folder(root, split, size, classes, progress), cache, log)

    train = read_folder(cfg.train_split)
    test = read_folder(cfg.test_split, train.classes)
    own_val = None
    if name == "imagefolder" and cfg.val != "test" and _has_split(root, "val"):
        own_val = read_folder("val", train.classes)
    if name in ("cifar10-lt", "cifar100-lt") and len(train.classes) != (10 if name == "cifar10-lt" else 100):
        raise DataError(f"{root} has {len(train.classes)} class folders, {name} needs {10 if name == 'cifar10-lt' else 100}")
    return train, test, own_val


def _has_split(root, split: str) -> bool:
    try:
        files = sources._Tree(root).files()
    except DataError:
        return False
    prefix = sources._split_prefix(files, split) + split + "/"
    return any(f.startswith(prefix) for f in files)


def _holdout(labels: np.ndarray, selected: np.ndarray, num_classes: int, per_class: int, seed: int):
    """Balanced per-class holdout. Returns (train indices, val indices) into the source arrays."""
    rng = np.random.default_rng(seed)
    chosen = np.zeros(len(labels), dtype=bool)
    chosen[selected] = True
    train_keep, val = [], []
    sel_by_class = [selected[labels[selected] == c] for c in range(num_classes)]
    for c in range(num_classes):
        unused = np.where((labels == c) & ~chosen)[0]
        take = rng.permutation(unused)[:per_class]
        own = sel_by_class[c]
        short = per_class - len(take)
        if short > 0 and len(own) >= 4 * per_class:  # a head class: lend its own (last-shuffled) images
            take = np.concatenate([take, own[-short:]])
            own = own[:-short]
        train_keep.append(own)
        val.append(np.sort(take))
    return np.concatenate(train_keep), np.concatenate(val)


def build_data(cfg, log: Callable[[str], None] = print) -> LongTailData:
    """Build the splits for ``cfg`` (a :class:`tailwise.config.DataConfig`)."""
    if cfg.name not in DATASETS:
        raise DataError(f"unknown data.name {cfg.name!r}; allowed: {', '.join(DATASETS)}")
    train_src, test_src, own_val = _read_splits(cfg, log)
    size = None
    if cfg.streamed:
        size = cfg.image_size or STREAM_IMAGE_SIZE
        log(f"streaming {cfg.name} images from {cfg.root} (data.stream={str(cfg.stream).lower()}): training "
            f"RandomResizedCrop({size}){' + flip' if cfg.flip else ''}, evaluation Resize({eval_resize(size)}) + "
            f"CenterCrop({size})" + ("" if cfg.image_size else f" (data.image_size unset: {size})"))

    def to_split(raw, idx=None):
        return _to_split(raw, idx, cfg.root, size)

    k = len(train_src.classes)
    if cfg.num_classes is not None and cfg.num_classes != k and cfg.name != "synthetic":
        raise DataError(f"data.num_classes={cfg.num_classes} but the data has {k} classes")
    for split_name, raw in (("train", train_src), ("test", test_src)):
        bad = (raw.labels < 0) | (raw.labels >= k)
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(f"{split_name} label {raw.labels[i]} of {raw.files[i]} is out of range [0, {k})")
    available = class_counts(train_src.labels, k)
    empty = [train_src.classes[c] for c, n in enumerate(available) if n == 0]
    if empty:
        raise DataError(f"class(es) {empty[:5]} have no training images; remove them or add images")

    if cfg.imbalance_ratio is None:
        selected = np.arange(len(train_src.labels))
        ratio = max(available) / min(available)
    else:
        counts = profile_counts(min(available), k, cfg.imbalance_ratio, cfg.profile)
        ratio = imbalance_ratio(cfg.imbalance_ratio)  # the configured ratio (a factor 0.01 is stored as 100)
        starved = [train_src.classes[c] for c, n in enumerate(counts) if n < 1]
        if starved:
            raise DataError(
                f"data.imbalance_ratio={cfg.imbalance_ratio} with {min(available)} images per class leaves "
                f"class(es) {starved[:5]} with no training images; lower the imbalance ratio or use more images")
        selected = longtail_indices(train_src.labels, counts, seed=0)
    subset_hash = index_sha256(selected)

    val_info: dict
    if cfg.val == "holdout" and own_val is None:
        train_idx, val_idx = _holdout(train_src.labels, selected, k, cfg.val_per_class, cfg.split_seed)
        val = to_split(train_src, val_idx)
        val_info = {"source": "holdout", "size": len(val_idx), "index_sha256": index_sha256(val_idx),
                    "per_class": class_counts(train_src.labels[val_idx], k)}
    else:
        train_idx = selected
        if cfg.val == "holdout":
            val = to_split(own_val)
            val_info = {"source": "dataset val split", "size": len(val)}
        elif cfg.val == "test":
            val, val_info = None, {"source": "test", "size": len(test_src.labels)}
        else:
            val, val_info = to_split(train_src, train_idx), {"source": "train", "size": len(train_idx)}
    train = to_split(train_src, train_idx)
    counts_final = class_counts(train_src.labels[train_idx], k)
    groups = shot_groups(counts_final, cfg.many_threshold, cfg.few_threshold, cfg.group_fallback)
    info = {
        "name": cfg.name, "source": str(cfg.root) if cfg.root else "synthetic", "profile": cfg.profile,
        "imbalance_ratio": round(float(ratio), 4), "num_classes": k, "train_size": len(train_idx),
        "class_counts": counts_final, "subset_size": int(len(selected)), "index_sha256": subset_hash,
        "val": val_info, "test_size": int(len(test_src.labels)), "classes": train_src.classes,
        "image_shape": list(train.image_shape), "streamed": cfg.streamed,
    }
    return LongTailData(train, val, to_split(test_src), list(train_src.classes), groups, info)
