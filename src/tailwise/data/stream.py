"""File-backed splits and the streaming loader, for datasets too large to hold decoded in memory.

A :class:`FileSplit` holds image paths (relative to an image root), labels and the square size images are
decoded to; nothing is decoded until asked. :class:`StreamLoader` has the interface of the in-memory
:class:`~tailwise.data.loader.BatchLoader`: a ``torch.utils.data.DataLoader`` decodes and transforms the images
in ``workers`` processes (:mod:`.transforms`), the main process normalises the uint8 batches on the device.

Reproducibility: the index sequence comes from the same :class:`~tailwise.data.loader.Sampler`, and every
sample is transformed under a seed derived from (seed, epoch, position in the epoch), so batches do not depend
on the number of workers, and a run resumed mid-epoch skips the consumed batches without decoding them.
Data parallelism follows ``BatchLoader``: ``batch_size`` is the global batch and each process keeps its
:func:`~tailwise.data.loader.rank_slice` of every batch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import itertools

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from ..errors import DataError
from .loader import BaseLoader, Sampler, rank_slice
from .transforms import eval_transform, open_rgb, sample_seed, seeded


def _index_list(idx) -> list[int]:
    """Indices given as a tensor, array, range or list -> a list of ints."""
    return np.asarray(idx, dtype=np.int64).reshape(-1).tolist()


class FileSplit:
    """A split whose images stay on disk. ``batch`` / ``example`` decode with the evaluation transform
    (shorter side resized to ``int(S * 256 / 224)``, centre ``S x S`` crop) into uint8 ``N x 3 x S x S``."""

    def __init__(self, root: str | Path, files: Sequence[str] | np.ndarray, labels, image_size: int):
        self.root, self.image_size = Path(root), int(image_size)
        # paths as one bytes array, not a list of str: worker processes then share it without copy-on-write
        self.files = files if isinstance(files, np.ndarray) else np.array([f.encode() for f in files], dtype=np.bytes_)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if len(self.files) != len(self.labels):
            raise ValueError(f"{len(self.files)} files but {len(self.labels)} labels")
        self._eval = eval_transform(self.image_size)

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"FileSplit({len(self)} images under {self.root}, {self.image_size}x{self.image_size})"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def file(self, i: int) -> str:
        """The root-relative path of image ``i``."""
        return self.files[i].decode()

    def path(self, i: int) -> Path:
        return self.root / self.file(i)

    def decode(self, i: int, transform: Callable | None = None, seed: int | None = None) -> torch.Tensor:
        """Image ``i`` as uint8 ``3 x S x S`` under ``transform`` (default: the evaluation transform), run under
        ``seed`` (:func:`~tailwise.data.transforms.seeded`)."""
        return seeded(transform or self._eval, open_rgb(self.path(i)), seed)

    def batch(self, idx) -> torch.Tensor:
        """Images ``idx`` decoded with the evaluation transform, uint8 ``N x 3 x S x S``."""
        images = [self.decode(i) for i in _index_list(idx)]
        return torch.stack(images) if images else torch.zeros((0, *self.image_shape), dtype=torch.uint8)

    def example(self, n: int = 1) -> torch.Tensor:
        """The first ``n`` images (fewer if the split is smaller), as :meth:`batch`."""
        return self.batch(range(min(n, len(self))))

    def subset(self, idx) -> "FileSplit":
        """The split of images ``idx``, in that order."""
        idx = np.asarray(_index_list(idx), dtype=np.int64)
        return FileSplit(self.root, self.files[idx], self.labels.numpy()[idx], self.image_size)


# ------------------------------------------------------------------------------------------ DataLoader plumbing
class _FileDataset(Dataset):
    """``dataset[(i, seed)]`` -> (uint8 image, label) under ``transform``; a failure to read the image is
    returned as its message (a string), so the main process can raise it as a clean :class:`DataError`
    instead of a worker traceback."""

    def __init__(self, split: FileSplit, transform: Callable):
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item: tuple[int, int | None]):
        i, seed = item
        try:
            return self.split.decode(i, self.transform, seed), int(self.split.labels[i])
        except DataError as exc:
            return str(exc)


def _collate(samples: list) -> list[torch.Tensor] | str:
    """Stack a batch of (image, label) samples (torch's default collation: in a worker it stacks straight into
    shared memory, saving a copy); the first error message instead, if a sample failed."""
    for sample in samples:
        if isinstance(sample, str):
            return sample
    return default_collate(samples)


class _Plan:
    """The DataLoader's batch sampler: the index lists the owning loader planned for the current pass, set
    before each ``iter()`` (a persistent-worker DataLoader keeps its batch sampler; the plan changes)."""

    def __init__(self):
        self.batches: Iterable[list] = ()
        self.count = 0

    def set(self, batches: Iterable[list], count: int) -> None:
        self.batches, self.count = batches, count

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return self.count


def _train_batches(indices: list[int], batch_size: int, first: int, count: int, rank: int, world: int,
                   seed: int, epoch: int) -> Iterator[list[tuple[int, int]]]:
    """This process's ``(index, sample seed)`` lists of global batches ``first .. count - 1``."""
    for b in range(first, count):
        start = b * batch_size
        idx = indices[start:start + batch_size]
        mine = range(len(idx))[rank_slice(len(idx), rank, world)]
        yield [(idx[j], sample_seed(seed, epoch, start + j)) for j in mine]


# The DataLoaders (and so the worker processes) of live StreamLoaders, owned here rather than by the loader: a
# loader caught in a reference cycle (a trainer and its context, an exception's traceback) is freed by the garbage
# collector, which finalises torch's worker queues before any __del__ runs, so shutting the workers down from
# there waits out a 5 s join timeout per worker. StreamLoader.__del__ drops its entry instead, and the DataLoader,
# outside the garbage, shuts its workers down normally.
_DATA_LOADERS: dict[int, DataLoader] = {}
_KEYS = itertools.count()


def _eval_batches(n: int, batch_size: int) -> Iterator[list[tuple[int, None]]]:
    for start in range(0, n, batch_size):
        yield [(i, None) for i in range(start, min(n, start + batch_size))]


# ------------------------------------------------------------------------------------------------------- loader
class StreamLoader(BaseLoader):
    """Iterates ``(images float N x 3 x S x S normalised, labels)`` batches of a :class:`FileSplit` on
    ``device``, decoding in ``workers`` DataLoader processes (0: in this process).

    ``sampler=None`` gives the evaluation pass: this process's :func:`rank_slice` of the split, in order, under
    the evaluation transform. With a sampler, one ``iter()`` is one training epoch under ``transform`` (which
    draws from torch's global RNG, seeded per sample); it resumes at ``position`` after ``load_state_dict``.
    """

    def __init__(self, split: FileSplit, batch_size: int, mean: Sequence[float], std: Sequence[float],
                 sampler: Sampler | None = None, transform: Callable | None = None,
                 device: str | torch.device = "cpu", drop_last: bool = False, channels_last: bool = False,
                 rank: int = 0, world: int = 1, workers: int = 0, prefetch_factor: int = 2):
        if sampler is None and world > 1:
            split = split.subset(range(len(split))[rank_slice(len(split), rank, world)])
        self.split, self.labels = split, split.labels
        self.batch_size, self.sampler, self.transform = batch_size, sampler, transform
        self.device, self.drop_last, self.channels_last = torch.device(device), drop_last, channels_last
        self.rank, self.world, self.workers = rank, world, workers
        self.set_normalization(mean, std)
        self.epoch, self.position = 0, 0
        self._dataset = _FileDataset(split, transform if sampler is not None and transform is not None
                                     else eval_transform(split.image_size))
        self._plan, self._prefetch, self._key = _Plan(), prefetch_factor, next(_KEYS)
        self._new_data_loader()

    def __del__(self):
        _DATA_LOADERS.pop(getattr(self, "_key", None), None)

    def _new_data_loader(self) -> None:
        """(Re)create the DataLoader; the previous one, if any, shuts its workers down."""
        w = self.workers
        _DATA_LOADERS[self._key] = DataLoader(
            self._dataset, batch_sampler=self._plan, num_workers=w, collate_fn=_collate,
            pin_memory=self.device.type == "cuda", persistent_workers=w > 0,
            prefetch_factor=self._prefetch if w > 0 else None,
            generator=torch.Generator())  # private: creating an iterator must not draw from the global RNG

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        error = None
        for batch in _DATA_LOADERS[self._key]:
            if isinstance(batch, str):
                error = batch
                break
            x, y = batch
            yield self.normalize(x), y.to(self.device, non_blocking=True)
        if error is not None:
            # a fresh DataLoader: the old one's workers stop now, not whenever the error's traceback is collected
            self._new_data_loader()
            raise DataError(error)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.sampler is None:
            self._plan.set(_eval_batches(len(self.labels), self.batch_size), len(self))
            yield from self._batches()
            return
        count, first = len(self), self.position
        indices = self.sampler.epoch_indices(self.epoch).tolist()
        self._plan.set(_train_batches(indices, self.batch_size, first, count, self.rank, self.world,
                                      self.sampler.seed, self.epoch), count - first)
        for b, batch in enumerate(self._batches(), first):
            self.position = b + 1
            yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def augmented_batch(self, idx, g: torch.Generator, part: slice = slice(None)) -> torch.Tensor:
        """The training images ``idx`` (uint8, on the device) under the training transform, decoded in this
        process, each under a seed drawn from ``g`` (the in-memory loader's signature; ``part`` changes nothing
        here: every image's transform is its own, and the whole batch is decoded so that the draws do not depend
        on the rank)."""
        idx = _index_list(idx)
        seeds = torch.randint(0, 2**62, (len(idx),), generator=g).tolist()
        transform = self._dataset.transform
        return torch.stack([self.split.decode(i, transform, s) for i, s in zip(idx, seeds)]).to(self.device)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
