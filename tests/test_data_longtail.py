"""Long-tailed subsets (Cao et al. 2019), shot groups, index hashes and the validation holdout.

Expected values are literal numbers from the papers / the brief, or come from the reference implementation of
Cao's procedure below (plain Python lists, legacy global NumPy RNG, struct-packed hash), written without the
library's code.
"""
from __future__ import annotations

import hashlib
import struct
import tarfile

import numpy as np
import pytest
import torch

from conftest import data_config, pil_decode_chw
from tailwise.data import dataset as ds
from tailwise.data import sources
from tailwise.data.dataset import build_data
from tailwise.data.longtail import (ShotGroups, class_counts, imbalance_ratio, index_sha256, longtail_indices,
                                    profile_counts, shot_groups)

CIFAR10_IR100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


# ------------------------------------------------------------------------------------------ reference (independent)
def ref_counts(n_max, num_classes, ir):
    """Cao's exponential profile with the factor 1/IR, classes in label order."""
    factor = 1.0 / ir
    return [int(n_max * factor ** (i / (num_classes - 1.0))) for i in range(num_classes)]


def ref_cao_selection(labels, counts):
    """Cao's subsampling: seed 0, per class (label order) shuffle that class's indices, keep the first n_c.

    Plain Python lists shuffled in place by the legacy global generator, which draws exactly as it does for
    the int64 arrays of the original code.
    """
    saved = np.random.get_state()
    try:
        np.random.seed(0)
        selected = []
        for c, n in enumerate(counts):
            idx = [i for i, label in enumerate(labels) if label == c]
            np.random.shuffle(idx)
            selected.extend(idx[:n])
    finally:
        np.random.set_state(saved)
    return selected


def ref_hash(indices):
    ordered = sorted(int(i) for i in indices)
    return hashlib.sha256(struct.pack(f"<{len(ordered)}q", *ordered)).hexdigest()


def interleaved_labels(num_classes, per_class):
    """Labels in a non-sorted sample order (class c at positions i with i % C == c)."""
    return [i % num_classes for i in range(num_classes * per_class)]


def test_reference_reproduces_cao_on_arrays():
    # sanity check of the reference itself: shuffling a list draws exactly like shuffling np.where's int64 array
    labels = np.array(interleaved_labels(7, 30))
    np.random.seed(0)
    cao = []
    for c, n in enumerate([30, 20, 10, 5, 4, 3, 1]):
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        cao.extend(idx[:n].tolist())
    assert ref_cao_selection(labels.tolist(), [30, 20, 10, 5, 4, 3, 1]) == cao


# ---------------------------------------------------------------------------------------- acceptance: CIFAR-10-LT
def test_cifar10_ir100_counts_formula():
    assert ref_counts(5000, 10, 100) == CIFAR10_IR100
    assert profile_counts(5000, 10, 100) == CIFAR10_IR100
    assert profile_counts(5000, 10, 0.01) == CIFAR10_IR100
    assert sum(CIFAR10_IR100) == 12406


def test_cifar10_lt_acceptance(cifar10_lt, cifar10_train_listing):
    classes, files, labels = cifar10_train_listing
    assert len(files) == 50000 and classes == sorted(classes) and len(classes) == 10
    assert [labels.count(c) for c in range(10)] == [5000] * 10

    info = cifar10_lt.info
    assert info["subset_size"] == 12406
    assert info["class_counts"] == CIFAR10_IR100  # val=test: the training set is the Cao subset itself
    assert info["train_size"] == 12406 and len(cifar10_lt.train) == 12406
    assert info["imbalance_ratio"] == 100
    assert info["num_classes"] == 10 and info["classes"] == classes
    assert info["test_size"] == 10000 and len(cifar10_lt.test) == 10000
    assert cifar10_lt.val is None and info["val"]["source"] == "test"
    assert list(cifar10_lt.train.images.shape) == [12406, 3, 32, 32]
    assert cifar10_lt.train.images.dtype == torch.uint8

    selected = ref_cao_selection(labels, CIFAR10_IR100)
    assert [sum(1 for i in selected if labels[i] == c) for c in range(10)] == CIFAR10_IR100
    assert info["index_sha256"] == ref_hash(selected)

    # the training set is in Cao's order (class blocks, each in shuffled order): check labels, and the pixels of
    # the first and last image of every class block against a direct PIL decode of the selected files
    assert cifar10_lt.train.labels.tolist() == [labels[i] for i in selected]
    starts = np.cumsum([0] + CIFAR10_IR100)
    probe = {}
    for c in range(10):
        for pos in (int(starts[c]), int(starts[c + 1]) - 1):
            probe[files[selected[pos]]] = pos
    found = {}
    with tarfile.open(cifar10_lt.info["source"]) as tar:
        for member in tar:
            name = member.name[2:] if member.name.startswith("./") else member.name
            if name in probe:
                found[name] = pil_decode_chw(tar.extractfile(member).read())
    assert len(found) == len(probe)
    for name, pos in probe.items():
        assert np.array_equal(cifar10_lt.train.images[pos].numpy(), found[name]), name


def test_cifar10_lt_factor_gives_same_subset(cifar10_lt, cifar10_lt_build):
    data = cifar10_lt_build(imbalance_ratio=0.01, val="test")
    assert data.info["imbalance_ratio"] == 100
    assert data.info["index_sha256"] == cifar10_lt.info["index_sha256"]
    assert data.info["class_counts"] == CIFAR10_IR100
    assert torch.equal(data.train.labels, cifar10_lt.train.labels)
    assert torch.equal(data.train.images, cifar10_lt.train.images)


def test_cifar10_lt_holdout(cifar10_lt, cifar10_lt_build):
    data = cifar10_lt_build(imbalance_ratio=100, val="holdout", val_per_class=50)
    # the subset hash is that of the Cao selection, before the holdout is carved
    assert data.info["index_sha256"] == cifar10_lt.info["index_sha256"]
    assert data.info["subset_size"] == 12406
    # class 0 has no unused images: it lends 50 of its own; every other class has >= 50 unused ones
    assert data.info["class_counts"] == [5000 - 50] + CIFAR10_IR100[1:]
    assert data.info["train_size"] == 12406 - 50
    assert data.info["val"]["source"] == "holdout"
    assert data.info["val"]["per_class"] == [50] * 10
    assert len(data.val) == 500 and data.val.labels.tolist() == [c for c in range(10) for _ in range(50)]
    assert data.info["val"]["index_sha256"] != data.info["index_sha256"]
    # shot groups on 10 classes: thresholds leave "few" empty -> frequency terciles, recorded
    assert data.groups.rule == "terciles"
    assert data.groups.sizes() == {"many": 4, "medium": 3, "few": 3}
    assert data.groups.membership == ("many",) * 4 + ("medium",) * 3 + ("few",) * 3


# ------------------------------------------------------------------------------------------------------ profiles
def test_synthetic_100_class_profiles_and_groups():
    labels = interleaved_labels(100, 500)
    for ir, total, sizes in ((100, 10847, (35, 35, 30)), (50, 12608, (41, 41, 18))):
        counts = profile_counts(500, 100, ir)
        assert counts == ref_counts(500, 100, ir)
        assert sum(counts) == total
        assert counts[0] == 500 and counts[-1] == 500 // ir
        groups = shot_groups(counts)
        assert groups.rule == "thresholds"
        assert (groups.sizes()["many"], groups.sizes()["medium"], groups.sizes()["few"]) == sizes
        # hand rule: many > 100, few < 20
        assert groups.indices("many") == [c for c in range(100) if counts[c] > 100]
        assert groups.indices("few") == [c for c in range(100) if counts[c] < 20]
        sel = longtail_indices(labels, counts, seed=0)
        assert len(sel) == total
        assert sel.tolist() == ref_cao_selection(labels, counts)
        assert index_sha256(sel) == ref_hash(sel.tolist())


def test_synthetic_100_class_build_data():
    cfg = data_config(name="synthetic", num_classes=100, synthetic_per_class=500, synthetic_test_per_class=2,
                      image_size=8, imbalance_ratio=100, val="test")
    data = build_data(cfg, log=lambda m: None)
    assert data.info["subset_size"] == 10847
    assert data.groups.sizes() == {"many": 35, "medium": 35, "few": 30}
    assert data.groups.rule == "thresholds"
    assert data.info["index_sha256"] == ref_hash(ref_cao_selection([c for c in range(100) for _ in range(500)],
                                                                   ref_counts(500, 100, 100)))


def test_step_profile_hand_checked():
    assert profile_counts(500, 10, 100, "step") == [500] * 5 + [5] * 5
    assert profile_counts(5000, 10, 10, "step") == [5000] * 5 + [500] * 5
    assert profile_counts(5000, 10, 0.1, "step") == [5000] * 5 + [500] * 5
    assert profile_counts(100, 7, 4, "step") == [100, 100, 100, 25, 25, 25, 25]


def test_profile_edge_cases():
    assert profile_counts(37, 1, 100) == [37]
    assert profile_counts(500, 10, 1) == [500] * 10
    with pytest.raises(ValueError):
        profile_counts(500, 10, 100, "linear")
    with pytest.raises(ValueError):
        imbalance_ratio(0)
    with pytest.raises(ValueError):
        imbalance_ratio(float("nan"))
    assert imbalance_ratio(100) == 100 and imbalance_ratio(0.01) == 100 and imbalance_ratio(0.5) == 2


def test_longtail_indices_keeps_global_rng_and_checks_size():
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    longtail_indices(interleaved_labels(3, 10), [10, 5, 2])
    assert np.random.rand() == expected_next
    with pytest.raises(ValueError):
        longtail_indices(interleaved_labels(3, 10), [11, 5, 2])


def test_index_sha256_is_order_free_int64_le():
    assert index_sha256([3, 1, 2]) == index_sha256(np.array([1, 2, 3], dtype=np.int32))
    assert index_sha256([1, 2, 3]) == hashlib.sha256(b"".join(i.to_bytes(8, "little") for i in (1, 2, 3))).hexdigest()
    assert class_counts([0, 2, 2, 5], 4) == [1, 0, 2, 0]


# -------------------------------------------------------------------------------------------------- shot groups
def test_tercile_fallback_on_cifar10_counts():
    groups = shot_groups(CIFAR10_IR100)
    assert groups.rule == "terciles"
    assert groups.sizes() == {"many": 4, "medium": 3, "few": 3}
    assert groups.to_json() == {"many": 4, "medium": 3, "few": 3, "thresholds": [100, 20], "rule": "terciles"}
    # ranking by count, not by label: a permuted count vector gives the permuted membership
    perm = [3, 9, 0, 5, 1, 8, 2, 7, 4, 6]
    shuffled = shot_groups([CIFAR10_IR100[p] for p in perm])
    assert shuffled.membership == tuple(groups.membership[p] for p in perm)
    # fallback disabled: the (empty) threshold groups are kept
    plain = shot_groups(CIFAR10_IR100, fallback="none")
    assert plain.rule == "thresholds" and plain.sizes() == {"many": 8, "medium": 2, "few": 0}


def test_thresholds_configurable():
    counts = [150, 100, 60, 20, 19, 5]
    default = shot_groups(counts)  # many > 100, few < 20: 100 and 20 are medium
    assert default.membership == ("many", "medium", "medium", "medium", "few", "few")
    # OLTR-style inclusive boundaries (many >= 100, few <= 20) are many > 99, few < 21
    oltr = shot_groups(counts, many=99, few=21)
    assert oltr.membership == ("many", "many", "medium", "few", "few", "few")
    assert oltr.thresholds == (99, 21) and oltr.rule == "thresholds"
    with pytest.raises(ValueError):
        shot_groups(counts, many=10, few=20)


def test_thresholds_from_config():
    cfg = data_config(name="synthetic", num_classes=10, synthetic_per_class=500, synthetic_test_per_class=1,
                      image_size=8, imbalance_ratio=100, val="test", many_threshold=99, few_threshold=24,
                      group_fallback="none")
    data = build_data(cfg, log=lambda m: None)
    counts = [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]
    assert data.class_counts == counts
    assert data.groups.membership == ("many",) * 4 + ("medium",) * 2 + ("few",) * 4
    assert data.groups.thresholds == (99, 24)


def test_shot_groups_small_class_count_no_fallback():
    assert shot_groups([500, 5]).membership == ("many", "few")  # < 3 classes: terciles impossible
    assert isinstance(shot_groups([1, 2, 3]), ShotGroups)


# ----------------------------------------------------------------------------------------------- holdout / val
def _synthetic(**values):
    base = dict(name="synthetic", num_classes=10, synthetic_per_class=500, synthetic_test_per_class=3, image_size=8,
                imbalance_ratio=100)
    base.update(values)
    return build_data(data_config(**base), log=lambda m: None)


def _source_index(images: torch.Tensor, raw: sources.RawSplit) -> list[int]:
    """Map images back to their index in the (noise-unique) synthetic source."""
    lookup = {raw.images[i].tobytes(): i for i in range(len(raw.labels))}
    assert len(lookup) == len(raw.labels)
    return [lookup[img.numpy().tobytes()] for img in images]


def test_holdout_synthetic_head_class_lends():
    data = _synthetic(val="holdout", val_per_class=50)
    raw = sources.synthetic_split(10, 500, 8, seed=0)
    counts = ref_counts(500, 10, 100)
    assert counts == [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]
    cao = ref_cao_selection(raw.labels.tolist(), counts)
    assert data.info["index_sha256"] == ref_hash(cao)
    assert data.info["subset_size"] == sum(counts)

    train_idx = _source_index(data.train.images, raw)
    val_idx = _source_index(data.val.images, raw)
    assert set(train_idx).isdisjoint(val_idx)
    assert len(set(val_idx)) == len(val_idx) == 500
    assert data.val.labels.tolist() == raw.labels[val_idx].tolist()
    assert data.info["val"]["per_class"] == [50] * 10
    assert data.info["val"]["index_sha256"] == ref_hash(val_idx)
    # class 0 (head, no unused images) lends 50 of its own; the others' val images are all unused by the subset
    assert data.class_counts == [450] + counts[1:]
    assert set(train_idx) <= set(cao)
    lent = set(cao) - set(train_idx)
    assert len(lent) == 50 and all(raw.labels[i] == 0 for i in lent)
    assert set(val_idx) - lent == {i for i in val_idx if raw.labels[i] != 0}
    assert not (set(val_idx) - lent) & set(cao)
    # the training set keeps Cao's order (minus the lent images)
    assert train_idx == [i for i in cao if i not in lent]
    assert data.train.labels.tolist() == raw.labels[train_idx].tolist()
    # the holdout does not move the Cao subset's hash
    assert data.info["index_sha256"] == _synthetic(val="test").info["index_sha256"]


def test_holdout_synthetic_short_classes_keep_fewer():
    per_class, vpc = 100, 30
    data = _synthetic(synthetic_per_class=per_class, imbalance_ratio=10, val="holdout", val_per_class=vpc)
    counts = ref_counts(per_class, 10, 10)
    assert counts == [100, 77, 59, 46, 35, 27, 21, 16, 12, 10]
    expected_val, expected_train = [], []
    for n in counts:
        unused = per_class - n
        if unused >= vpc:
            expected_val.append(vpc), expected_train.append(n)
        elif n >= 4 * vpc:  # a head class would lend (none here: 100 < 120)
            expected_val.append(vpc), expected_train.append(n - (vpc - unused))
        else:
            expected_val.append(unused), expected_train.append(n)
    assert expected_val[:3] == [0, 23, 30]
    assert data.info["val"]["per_class"] == expected_val
    assert data.class_counts == expected_train
    raw = sources.synthetic_split(10, per_class, 8, seed=0)
    assert set(_source_index(data.train.images, raw)).isdisjoint(_source_index(data.val.images, raw))


def test_holdout_indices_direct():
    labels = np.array(interleaved_labels(4, 100))
    counts = [100, 60, 30, 10]
    selected = longtail_indices(labels, counts, seed=0)
    train, val = ds._holdout(labels, selected, 4, 20, seed=0)
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert np.bincount(labels[val], minlength=4).tolist() == [20, 20, 20, 20]
    assert np.bincount(labels[train], minlength=4).tolist() == [80, 60, 30, 10]
    assert set(train.tolist()) | set(val.tolist()) >= set(selected.tolist())
    # same split_seed -> same holdout, another seed -> another one
    assert np.array_equal(ds._holdout(labels, selected, 4, 20, seed=0)[1], val)
    assert not np.array_equal(ds._holdout(labels, selected, 4, 20, seed=1)[1], val)


def test_val_test_and_train_modes():
    on_test = _synthetic(val="test")
    assert on_test.val is None
    assert on_test.info["val"] == {"source": "test", "size": len(on_test.test)}
    assert on_test.class_counts == [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]
    on_train = _synthetic(val="train")
    assert torch.equal(on_train.val.images, on_train.train.images)
    assert torch.equal(on_train.val.labels, on_train.train.labels)
    assert on_train.info["val"]["source"] == "train"
    assert on_train.info["index_sha256"] == on_test.info["index_sha256"]
    assert torch.equal(on_train.train.images, on_test.train.images)


def test_no_imbalance_keeps_everything():
    data = _synthetic(imbalance_ratio=None, val="test", synthetic_per_class=20)
    assert data.info["subset_size"] == 200 and data.class_counts == [20] * 10
    assert data.info["index_sha256"] == ref_hash(range(200))


def test_stored_ratio_is_the_configured_one():
    data = _synthetic(imbalance_ratio=3, val="test")
    assert data.info["imbalance_ratio"] == 3
    assert data.class_counts == ref_counts(500, 10, 3)
    step = _synthetic(imbalance_ratio=0.1, profile="step", val="test")
    assert step.info["imbalance_ratio"] == 10
    assert step.class_counts == [500] * 5 + [50] * 5


def test_ratio_too_large_for_the_data_is_a_data_error():
    from tailwise.errors import DataError

    # 20 images per class at IR 100 leaves the tail classes int(20 * 0.01) = 0 images
    with pytest.raises(DataError, match="imbalance"):
        _synthetic(synthetic_per_class=20, imbalance_ratio=100, val="test")
    with pytest.raises(DataError, match="imbalance"):
        _synthetic(synthetic_per_class=20, imbalance_ratio=100, profile="step", val="test")


def test_unknown_dataset_name_and_missing_root():
    from tailwise.errors import DataError

    cfg = data_config(name="synthetic")
    cfg.name = "mnist-lt"
    with pytest.raises(DataError, match="mnist-lt"):
        build_data(cfg, log=lambda m: None)
    with pytest.raises(DataError, match="root"):
        build_data(data_config(name="cifar10-lt"), log=lambda m: None)
