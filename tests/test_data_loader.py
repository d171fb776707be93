"""Samplers, batched augmentation, normalisation and the resumable loader, checked against per-sample Python
references and counting arguments."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tailwise.data.loader import Augment, BatchLoader, Sampler, cutout, random_crop, random_flip

MEAN = (0.5, 0.4, 0.3)
STD = (0.25, 0.2, 0.1)


def gen(seed=0):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def skewed_labels(counts, seed=0):
    labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)])
    return labels[torch.randperm(len(labels), generator=gen(seed))]


def random_images(n, h=8, w=8, seed=0, low=0):
    return torch.randint(low, 256, (n, 3, h, w), generator=gen(seed), dtype=torch.uint8)


def chi_square(observed, expected):
    return sum((o - e) ** 2 / e for o, e in zip(observed, expected))


# chi-square quantile at p = 0.999 for 3 degrees of freedom
CHI2_3_999 = 16.27

COUNTS = [15000, 4000, 800, 200]  # 20,000 images -> 20,000 draws per epoch


# ------------------------------------------------------------------------------------------------------ samplers
def test_instance_sampler_is_a_permutation():
    labels = skewed_labels([30, 20, 7])
    s = Sampler(labels, "instance", seed=3)
    idx = s.epoch_indices(0)
    assert len(s) == 57 and sorted(idx.tolist()) == list(range(57))
    assert not torch.equal(idx, torch.arange(57))


@pytest.mark.parametrize("kind", ["instance", "class_balanced", "sqrt", "group_preferred"])
def test_sampler_determinism(kind):
    labels = skewed_labels([300, 100, 20, 5])
    make = lambda seed: Sampler(labels, kind, seed=seed, batch_size=32, rho=0.5, group_classes=[2, 3])
    a, b = make(7), make(7)
    assert torch.equal(a.epoch_indices(0), b.epoch_indices(0))
    assert torch.equal(a.epoch_indices(5), b.epoch_indices(5))
    assert not torch.equal(a.epoch_indices(0), a.epoch_indices(1))
    assert not torch.equal(a.epoch_indices(0), make(8).epoch_indices(0))
    idx = a.epoch_indices(2)
    assert len(idx) == len(labels) and idx.dtype == torch.long
    assert int(idx.min()) >= 0 and int(idx.max()) < len(labels)


def test_class_balanced_is_uniform_over_classes():
    labels = skewed_labels(COUNTS)
    idx = Sampler(labels, "class_balanced", seed=0).epoch_indices(0)
    drawn = torch.bincount(labels[idx], minlength=4).tolist()
    n = len(idx)
    assert n == 20000
    assert chi_square(drawn, [n / 4] * 4) < CHI2_3_999
    # images within the rarest class are drawn uniformly too: all 200 appear, none far too often (~25 each)
    rare = idx[labels[idx] == 3]
    per_image = torch.bincount(rare, minlength=len(labels))[labels == 3]
    assert int((per_image > 0).sum()) >= 195 and int(per_image.max()) < 60


def test_sqrt_sampler_proportional_to_sqrt_counts():
    labels = skewed_labels(COUNTS)
    idx = Sampler(labels, "sqrt", seed=1).epoch_indices(0)
    drawn = torch.bincount(labels[idx], minlength=4).tolist()
    weights = [math.sqrt(n) for n in COUNTS]
    expected = [len(idx) * w / sum(weights) for w in weights]
    assert chi_square(drawn, expected) < CHI2_3_999


def test_instance_sampler_keeps_natural_frequencies():
    labels = skewed_labels(COUNTS)
    idx = Sampler(labels, "instance", seed=1).epoch_indices(0)
    assert torch.bincount(labels[idx], minlength=4).tolist() == COUNTS


@pytest.mark.parametrize("rho,batch", [(0.3, 50), (0.25, 64), (0.5, 33), (1.0, 16), (0.0, 16)])
def test_group_preferred_exact_share_per_batch(rho, batch):
    labels = skewed_labels(COUNTS)
    group = {2, 3}
    s = Sampler(labels, "group_preferred", seed=2, batch_size=batch, rho=rho, group_classes=sorted(group))
    idx = s.epoch_indices(0)
    assert len(idx) == len(labels)
    in_group = torch.tensor([int(labels[i]) in group for i in idx.tolist()])
    full = len(labels) // batch
    want = round(rho * batch)
    for b in range(full):
        assert int(in_group[b * batch:(b + 1) * batch].sum()) == want, b
    tail = len(labels) - full * batch
    if tail:
        assert int(in_group[full * batch:].sum()) == round(rho * tail)
    if 0 < rho < 1:
        # preferred and other samples are interleaved within a batch, not in two blocks
        first = in_group[:batch].tolist()
        assert first != sorted(first, reverse=True)


@pytest.mark.parametrize("kind", ["instance", "class_balanced", "sqrt", "inverse", "group_preferred"])
def test_label_distribution_is_what_the_sampler_draws(kind):
    """The declared training prior against the labels actually drawn over one epoch of 20,000 draws (batch 100,
    so rho * B is exact and the group-preferred share is rho itself)."""
    labels = skewed_labels(COUNTS)
    s = Sampler(labels, kind, seed=4, batch_size=100, rho=0.3, group_classes=[2, 3])
    prior = s.label_distribution()
    assert prior.dtype == torch.float64 and float(prior.sum()) == pytest.approx(1.0)
    drawn = torch.bincount(labels[s.epoch_indices(0)], minlength=4).tolist()
    assert chi_square(drawn, (len(labels) * prior).tolist()) < CHI2_3_999
    if kind == "group_preferred":  # by hand: 30% from classes 2-3 by their counts, 70% from 0-1 by theirs
        assert prior.tolist() == pytest.approx([0.7 * 15 / 19, 0.7 * 4 / 19, 0.3 * 0.8, 0.3 * 0.2])


def test_group_preferred_errors():
    labels = skewed_labels([10, 10])
    with pytest.raises(ValueError):
        Sampler(labels, "group_preferred", rho=1.5, group_classes=[1])
    with pytest.raises(ValueError):
        Sampler(labels, "group_preferred", rho=0.5, group_classes=[])
    with pytest.raises(ValueError):
        Sampler(labels, "bogus")


# -------------------------------------------------------------------------------------------------- augmentation
def zero_pad_np(img: np.ndarray, p: int) -> np.ndarray:
    c, h, w = img.shape
    out = np.zeros((c, h + 2 * p, w + 2 * p), dtype=img.dtype)
    out[:, p:p + h, p:p + w] = img
    return out


def test_random_crop_padding_zero_is_identity():
    x = random_images(5)
    assert torch.equal(random_crop(x, 0, gen()), x)


@pytest.mark.parametrize("padding", [1, 4])
def test_random_crop_matches_a_window_of_the_zero_padded_image(padding):
    x = random_images(64, 8, 10, low=1)  # no zeros in the images: the padding is identifiable
    out = random_crop(x, padding, gen(5))
    assert out.shape == x.shape and out.dtype == torch.uint8
    offsets = []
    for i in range(len(x)):
        padded = zero_pad_np(x[i].numpy(), padding)
        matches = [(dy, dx) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)
                   if np.array_equal(padded[:, dy:dy + 8, dx:dx + 10], out[i].numpy())]
        assert len(matches) == 1, (i, matches)
        offsets.append(matches[0])
    # per-sample offsets, covering the range
    assert len(set(offsets)) > 1
    assert {dy for dy, _ in offsets} == set(range(2 * padding + 1))
    assert {dx for _, dx in offsets} == set(range(2 * padding + 1))


def test_random_flip_per_sample():
    x = random_images(64)
    out = random_flip(x, gen(1))
    flipped = kept = 0
    for i in range(64):
        if torch.equal(out[i], x[i]):
            kept += 1
        else:
            assert torch.equal(out[i], torch.flip(x[i], dims=[2]))  # horizontal: the width axis
            flipped += 1
    assert flipped > 10 and kept > 10


@pytest.mark.parametrize("size", [4, 5])
def test_cutout_zeroes_one_square(size):
    h = w = 16
    x = random_images(200, h, w, low=1)
    out = cutout(x, size, gen(2))
    inside_seen = clipped_seen = 0
    for i in range(len(x)):
        zero = (out[i] == 0).numpy()
        assert (zero == zero[0]).all()  # same square in every channel
        mask = zero[0]
        kept = ~mask
        assert np.array_equal(out[i].numpy()[:, kept], x[i].numpy()[:, kept])  # nothing else changed
        rows, cols = np.where(mask.any(1))[0], np.where(mask.any(0))[0]
        if len(rows) == 0:
            continue
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        assert mask[y0:y1, x0:x1].all() and mask.sum() == (y1 - y0) * (x1 - x0)  # a filled rectangle
        assert y1 - y0 <= size and x1 - x0 <= size
        if y0 > 0 and y1 < h and x0 > 0 and x1 < w:  # not touching the border: the whole square is inside
            assert mask.sum() == size * size
            inside_seen += 1
        else:
            # clipped only by the border
            assert (y1 - y0 == size or y0 == 0 or y1 == h) and (x1 - x0 == size or x0 == 0 or x1 == w)
            clipped_seen += 1
    assert inside_seen > 50 and clipped_seen > 5
    assert torch.equal(cutout(x, 0, gen(2)), x)


def test_augment_keeps_uint8_and_shape():
    x = random_images(16, 12, 12)
    for aug in (Augment(4, True, 6), Augment(0, False, 0), Augment(2, True, 0, policy="randaugment")):
        out = aug(x, gen(3))
        assert out.dtype == torch.uint8 and out.shape == x.shape
    with pytest.raises(ValueError):
        Augment(policy="mixup")


def test_augment_is_reproducible_from_its_generator():
    x = random_images(16, 12, 12)
    for policy in ("none", "autoaugment"):
        aug = Augment(4, True, 4, policy=policy)
        a, b = aug(x, gen(9)), aug(x, gen(9))
        assert torch.equal(a, b)
        assert not torch.equal(a, aug(x, gen(10)))
    # the global RNG is left alone by the policies
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    Augment(0, False, 0, policy="randaugment")(x, gen(1))
    assert torch.equal(torch.rand(1), expected)


# -------------------------------------------------------------------------------------------------------- loader
def normalise_reference(x_uint8: torch.Tensor) -> np.ndarray:
    x = x_uint8.numpy().astype(np.float64) / 255.0
    return (x - np.array(MEAN)[None, :, None, None]) / np.array(STD)[None, :, None, None]


def test_eval_mode_in_order_unaugmented_normalised():
    images, labels = random_images(23), torch.arange(23) % 4
    loader = BatchLoader(images, labels, 5, MEAN, STD, sampler=None, augment=Augment(4, True, 4))
    assert len(loader) == 5
    for _ in range(2):  # repeatable
        batches = list(loader)
        assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
        xs = torch.cat([x for x, _ in batches])
        assert xs.dtype == torch.float32
        assert torch.equal(torch.cat([y for _, y in batches]), labels)
        np.testing.assert_allclose(xs.numpy(), normalise_reference(images), rtol=0, atol=1e-5)


def test_drop_last_and_lengths():
    images, labels = random_images(23), torch.arange(23) % 4
    s = Sampler(labels, "instance", seed=0)
    assert len(BatchLoader(images, labels, 5, MEAN, STD, sampler=s, drop_last=True)) == 4
    assert len(BatchLoader(images, labels, 5, MEAN, STD, sampler=s)) == 5
    loader = BatchLoader(images, labels, 5, MEAN, STD, sampler=s, drop_last=True)
    assert [len(y) for _, y in loader] == [5, 5, 5, 5]


def test_training_batches_follow_the_sampler_without_augmentation():
    images, labels = random_images(30), torch.arange(30) % 3
    s = Sampler(labels, "instance", seed=4)
    loader = BatchLoader(images, labels, 8, MEAN, STD, sampler=s, augment=None)
    batches = list(loader)
    idx = s.epoch_indices(0)
    assert torch.equal(torch.cat([y for _, y in batches]), labels[idx])
    np.testing.assert_allclose(torch.cat([x for x, _ in batches]).numpy(), normalise_reference(images[idx]),
                               atol=1e-5)
    assert loader.epoch == 1 and loader.position == 0
    second = list(loader)  # the next epoch has another order
    assert not torch.equal(torch.cat([y for _, y in second]), torch.cat([y for _, y in batches]))


def _make_loader(images, labels, kind="class_balanced"):
    sampler = Sampler(labels, kind, seed=11, batch_size=6, rho=0.5, group_classes=[2])
    return BatchLoader(images, labels, 6, MEAN, STD, sampler=sampler, augment=Augment(2, True, 3))


@pytest.mark.parametrize("kind,k", [("class_balanced", 3), ("instance", 1), ("group_preferred", 4)])
def test_resume_mid_epoch_reproduces_the_uninterrupted_batches(kind, k):
    images, labels = random_images(40, 8, 8, seed=3), torch.arange(40) % 3
    reference = _make_loader(images, labels, kind)
    epoch0 = [(x.clone(), y.clone()) for x, y in reference]
    epoch1 = [(x.clone(), y.clone()) for x, y in reference]
    assert len(epoch0) == 7

    first = _make_loader(images, labels, kind)
    got = []
    for b, (x, y) in enumerate(first):
        got.append((x.clone(), y.clone()))
        if b + 1 == k:
            break
    state = first.state_dict()
    assert state["epoch"] == 0 and state["position"] == k
    del first

    resumed = _make_loader(images, labels, kind)
    resumed.load_state_dict(state)
    got.extend((x.clone(), y.clone()) for x, y in resumed)
    assert len(got) == len(epoch0)
    for (xa, ya), (xb, yb) in zip(got, epoch0):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    # and the following epoch continues identically as well
    nxt = [(x, y) for x, y in resumed]
    for (xa, ya), (xb, yb) in zip(nxt, epoch1):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_resume_state_survives_torch_save(tmp_path):
    images, labels = random_images(40, 8, 8, seed=3), torch.arange(40) % 3
    reference = [(x, y) for x, y in _make_loader(images, labels)]
    loader = _make_loader(images, labels)
    it = iter(loader)
    head = [next(it) for _ in range(2)]
    torch.save(loader.state_dict(), tmp_path / "state.pt")
    resumed = _make_loader(images, labels)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt"))
    rest = list(resumed)
    assert len(head) + len(rest) == len(reference)
    for (xa, ya), (xb, yb) in zip(head + rest, reference):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_set_epoch_restarts_and_is_deterministic():
    images, labels = random_images(40), torch.arange(40) % 3
    a, b = _make_loader(images, labels), _make_loader(images, labels)
    a.set_epoch(3)
    b.set_epoch(3)
    xa = torch.cat([x for x, _ in a])
    xb = torch.cat([x for x, _ in b])
    assert torch.equal(xa, xb)
    c = _make_loader(images, labels)
    c.set_epoch(4)
    assert not torch.equal(torch.cat([x for x, _ in c]), xa)


@pytest.mark.parametrize("policy", ["randaugment", "autoaugment"])
def test_policy_augmentation_is_seeded_and_changes_images(policy):
    from tailwise.data.loader import Augment, BatchLoader, Sampler

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8, generator=g)
    labels = torch.arange(24) % 3

    def batches():
        loader = BatchLoader(images, labels, 8, [0.5] * 3, [0.25] * 3, sampler=Sampler(labels, "instance", seed=5),
                             augment=Augment(crop_padding=0, flip=False, policy=policy))
        return [x for x, _ in loader]

    first, second = batches(), batches()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    plain = BatchLoader(images, labels, 8, [0.5] * 3, [0.25] * 3, sampler=Sampler(labels, "instance", seed=5),
                        augment=Augment(crop_padding=0, flip=False))
    assert any(not torch.equal(a, b) for a, (b, _) in zip(first, plain))


def test_channel_stats_match_a_float_computation():
    from tailwise.data.stats import channel_stats

    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8, generator=g)
    mean, std = channel_stats(images, chunk=7)
    x = images.double() / 255
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), x.mean(dim=(0, 2, 3)), atol=1e-12)
    assert torch.allclose(torch.tensor(std, dtype=torch.float64), x.std(dim=(0, 2, 3), unbiased=False), atol=1e-9)
