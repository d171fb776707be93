"""In-memory batched loading: samplers, batched tensor augmentation, and a resumable loader.

The training images live in memory as one uint8 ``N x 3 x H x W`` tensor. Each batch is gathered, augmented
with whole-batch tensor ops (random crop with zero padding, horizontal flip, optional Cutout), optionally
RandAugment/AutoAugment per sample, converted to float and normalised. All randomness comes from generators
seeded by ``(seed, epoch)``; the loader's state (epoch, batches consumed, augmentation generator) is part of the
checkpoint, so a resumed run sees exactly the batches an uninterrupted run would. :class:`BaseLoader` holds what
this loader shares with the streaming one (:mod:`tailwise.data.stream`): device normalisation and the batch count.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

SAMPLERS = ("instance", "class_balanced", "sqrt", "inverse", "group_preferred")
POLICIES = ("none", "randaugment", "autoaugment")


def rank_slice(n: int, rank: int = 0, world: int = 1) -> slice:
    """The contiguous part of ``n`` items that process ``rank`` of ``world`` takes: sizes differ by at most one
    (the first ranks take the extra items), and concatenated in rank order the parts are the whole, in order."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def _generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch * 7919 + stream * 104_729) % (2**63 - 1))
    return g


# ------------------------------------------------------------------------------------------------------ samplers
class Sampler:
    """Index sequences for each epoch.

    - ``instance``: a random permutation of the training set (each image once per epoch).
    - ``class_balanced``: class drawn uniformly, then an image of it uniformly (with replacement); N draws.
    - ``sqrt``: class drawn with probability proportional to sqrt(n_c), then an image uniformly; N draws.
    - ``inverse``: class drawn with probability proportional to 1/n_c, then an image uniformly; N draws (DO's
      per-class reading of p_3 = 1/N_y).
    - ``group_preferred``: every batch has ``round(rho * B)`` images drawn uniformly from the classes in
      ``group_classes`` and the rest uniformly from the other classes (DO's Eq. 1); N draws.
    """

    def __init__(self, labels: torch.Tensor, kind: str = "instance", seed: int = 0, batch_size: int = 128,
                 rho: float = 0.5, group_classes: Sequence[int] = ()):
        if kind not in SAMPLERS:
            raise ValueError(f"unknown sampler {kind!r}; allowed: {', '.join(SAMPLERS)}")
        self.labels, self.kind, self.seed, self.batch_size = labels.long(), kind, seed, batch_size
        self.num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        counts = torch.bincount(self.labels, minlength=self.num_classes).double()
        self.class_prob = {"class_balanced": (counts > 0).double(), "sqrt": counts.sqrt(),
                           "inverse": torch.where(counts > 0, 1 / counts, 0.0)}.get(kind)
        # images sorted by class, with offsets, so "uniform image of class c" is one gather
        self.order = torch.argsort(self.labels, stable=True)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.long().cumsum(0)])
        if kind == "group_preferred":
            if not 0.0 <= rho <= 1.0:
                raise ValueError(f"group_preferred rho must be in [0, 1], got {rho}")
            in_group = torch.zeros(self.num_classes, dtype=torch.bool)
            in_group[list(group_classes)] = True
            member = in_group[self.labels]
            self.pools = (torch.where(member)[0], torch.where(~member)[0])
            if len(self.pools[0]) == 0:
                raise ValueError("group_preferred sampler: the preferred group has no training images")
            self.rho, self.in_group = rho, in_group
        self.counts = counts

    def __len__(self) -> int:
        return len(self.labels)

    def label_distribution(self) -> torch.Tensor:
        """The probability of each class label in one draw (float64, sums to 1): the training prior a network
        sees under this sampler. ``group_preferred`` by its design share ``rho`` (the per-batch rounding of
        ``rho * B`` is ignored), each part proportional to the class counts within it."""
        n = self.counts
        if self.kind == "instance":
            return n / n.sum()
        if self.kind == "group_preferred":
            pref, rest = n * self.in_group, n * ~self.in_group
            if rest.sum() == 0:
                return pref / pref.sum()
            return self.rho * pref / pref.sum() + (1 - self.rho) * rest / rest.sum()
        return self.class_prob / self.class_prob.sum()

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        g = _generator(self.seed, epoch, 0)
        n = len(self.labels)
        if self.kind == "instance":
            return torch.randperm(n, generator=g)
        if self.kind == "group_preferred":
            return self._group_preferred(n, g)
        classes = torch.multinomial(self.class_prob, n, replacement=True, generator=g)
        size = (self.offsets[classes + 1] - self.offsets[classes]).double()
        within = (torch.rand(n, generator=g, dtype=torch.float64) * size).long()
        return self.order[self.offsets[classes] + within]

    def _group_preferred(self, n: int, g: torch.Generator) -> torch.Tensor:
        pref, rest = self.pools
        batches = []
        for start in range(0, n, self.batch_size):
            b = min(self.batch_size, n - start)
            k = b if len(rest) == 0 else round(self.rho * b)
            pick = torch.cat([pref[torch.randint(len(pref), (k,), generator=g)],
                              rest[torch.randint(max(len(rest), 1), (b - k,), generator=g)] if b > k else
                              torch.zeros(0, dtype=torch.long)])
            batches.append(pick[torch.randperm(b, generator=g)])
        return torch.cat(batches)


# -------------------------------------------------------------------------------------------------- augmentation
def random_crop(x: torch.Tensor, padding: int, g: torch.Generator) -> torch.Tensor:
    """Per-sample random crop of the zero-padded batch back to its size (one gather, no Python loop)."""
    if padding <= 0:
        return x
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=g).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=g).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def random_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(x.shape[0], generator=g) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def cutout(x: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """DeVries & Taylor 2017: zero one ``size x size`` square per image, centred uniformly (may be clipped)."""
    if size <= 0:
        return x
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b,), generator=g).to(x.device)
    cx = torch.randint(0, w, (b,), generator=g).to(x.device)
    y0 = (cy - size // 2)[:, None, None]
    x0 = (cx - size // 2)[:, None, None]
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = (ys >= y0) & (ys < y0 + size) & (xs >= x0) & (xs < x0 + size)
    return x.masked_fill(inside[:, None], 0)


class Augment:
    """Batched training augmentation on uint8 images: policy (per sample, ``apply_policy``) -> crop -> flip ->
    cutout (``__call__``)."""

    def __init__(self, crop_padding: int = 4, flip: bool = True, cutout: int = 0, policy: str = "none"):
        if policy not in POLICIES:
            raise ValueError(f"unknown augmentation policy {policy!r}; allowed: {', '.join(POLICIES)}")
        self.crop_padding, self.flip, self.cutout_size, self.policy = crop_padding, flip, cutout, policy
        self._policy = None
        if policy != "none":
            from torchvision.transforms import v2
            self._policy = v2.RandAugment() if policy == "randaugment" else v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)

    def apply_policy(self, x: torch.Tensor, g: torch.Generator, part: slice = slice(None)) -> torch.Tensor:
        """RandAugment / AutoAugment, one image at a time (torchvision), on a CPU uint8 batch. Every image gets
        its own seed drawn from ``g`` for the whole batch, so a process that transforms only its ``part`` of
        the batch (the others are returned unchanged) gets the same images as one process transforming all."""
        seeds = torch.randint(0, 2**62, (len(x),), generator=g).tolist()
        out = x.clone()
        # torchvision draws from the global RNG: fork it and seed it per image, to stay reproducible
        with torch.random.fork_rng(devices=[]):
            for i in range(len(x))[part]:
                torch.manual_seed(seeds[i])
                out[i] = self._policy(x[i])
        return out

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Crop, flip and Cutout of a uint8 batch on any device (the policy is applied before, on the CPU)."""
        x = random_crop(x, self.crop_padding, g)
        if self.flip:
            x = random_flip(x, g)
        return cutout(x, self.cutout_size, g)


# -------------------------------------------------------------------------------------------------------- loader
class BaseLoader:
    """What the in-memory :class:`BatchLoader` and the streaming :class:`tailwise.data.stream.StreamLoader` share:
    normalisation on the device, and the batch count. A subclass sets ``sampler`` (None for evaluation),
    ``labels`` (this process's, for evaluation), ``batch_size`` (global), ``drop_last``, ``world``, ``device``
    and ``channels_last``."""

    def set_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Per-channel mean / std in [0, 1]: batches are ``(x / 255 - mean) / std``."""
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1) * 255

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images -> normalised float on the loader's device (and memory format)."""
        x = (x.to(self.device, non_blocking=True).float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.labels)
        short = self.sampler is not None and 0 < n % self.batch_size < self.world
        return n // self.batch_size if self.drop_last or short else -(-n // self.batch_size)


class BatchLoader(BaseLoader):
    """Iterates ``(images float N x 3 x H x W normalised, labels)`` batches on ``device``.

    ``sampler=None`` gives sequential, unaugmented batches (evaluation). For training, one ``iter()`` is one
    epoch: it resumes at ``position`` if the loader was restored mid-epoch.

    Under data parallelism (``world`` processes, this one ``rank``) ``batch_size`` is the global batch: every
    process draws the same index sequence and augmentation randomness and keeps its :func:`rank_slice` of each
    batch, so the processes together see exactly the batches of one process. A final batch smaller than
    ``world`` is dropped (a process would get no image). Evaluation batches cover the process's
    :func:`rank_slice` of the split.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, mean: Sequence[float],
                 std: Sequence[float], sampler: Sampler | None = None, augment: Augment | None = None,
                 device: str | torch.device = "cpu", drop_last: bool = False, channels_last: bool = False,
                 rank: int = 0, world: int = 1):
        if sampler is None and world > 1:
            part = rank_slice(len(labels), rank, world)
            images, labels = images[part], labels[part]
        self.images, self.labels = images, labels
        self.batch_size, self.sampler, self.augment = batch_size, sampler, augment
        self.device, self.drop_last, self.channels_last = torch.device(device), drop_last, channels_last
        self.rank, self.world = rank, world
        self.set_normalization(mean, std)
        self.epoch, self.position = 0, 0
        self._aug_state: torch.Tensor | None = None

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position, self._aug_state = epoch, 0, None

    def augmented_batch(self, idx: torch.Tensor, g: torch.Generator, part: slice = slice(None)) -> torch.Tensor:
        """The training images ``idx`` (uint8, on the device) under the training augmentation, its random draws
        taken from ``g``; the per-image policy is applied to ``part`` only (see :meth:`Augment.apply_policy`)."""
        x = self.images[idx]
        if self.augment is not None and self.augment.policy != "none":
            x = self.augment.apply_policy(x, g, part)  # per-image torchvision policy: on the CPU uint8 batch
        x = x.to(self.device, non_blocking=True)
        if self.augment is not None:
            x = self.augment(x, g)  # the whole batch, so the random draws do not depend on the rank
        return x

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.sampler is None:
            for start in range(0, len(self.labels), self.batch_size):
                yield (self.normalize(self.images[start:start + self.batch_size]),
                       self.labels[start:start + self.batch_size].to(self.device))
            return
        indices = self.sampler.epoch_indices(self.epoch)
        g = _generator(self.sampler.seed, self.epoch, 1)
        if self._aug_state is not None:
            g.set_state(self._aug_state)
        for b in range(self.position, len(self)):
            idx = indices[b * self.batch_size:(b + 1) * self.batch_size]
            part = rank_slice(len(idx), self.rank, self.world)
            x = self.augmented_batch(idx, g, part)
            self.position, self._aug_state = b + 1, g.get_state()
            yield self.normalize(x[part]), self.labels[idx[part]].to(self.device)
        self.epoch, self.position, self._aug_state = self.epoch + 1, 0, None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "aug_state": self._aug_state}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._aug_state = state["epoch"], state["position"], state["aug_state"]
