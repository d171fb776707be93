"""Source readers (image folders as directories and archives, CIFAR pickles, list files), their errors, and the
decode-once cache. All data is tiny and written into tmp_path by the tests."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import data_config, pil_decode_chw, save_image
from tailwise.data import sources
from tailwise.data.cache import cached_split
from tailwise.data.dataset import build_data
from tailwise.errors import DataError

QUIET = dict(log=lambda msg: None)


def rand_hwc(rng, h=8, w=8):
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------------------- image folders
CLASSES_CREATED = ["zebra", "ant", "Moose"]  # sorted: Moose, ant, zebra
NAMES_CREATED = ["b.png", "a.png", "10.png", "2.png"]  # sorted: 10.png, 2.png, a.png, b.png


@pytest.fixture
def folder_tree(tmp_path):
    """root/{train,test}/<class>/<file> with PNGs (lossless) and one JPEG; returns (root, written pixels)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "tree"
    written = {}
    for split, names in (("train", NAMES_CREATED), ("test", ["y.png", "x.png"])):
        for cls in CLASSES_CREATED:
            for name in names:
                arr = rand_hwc(rng)
                save_image(root / split / cls / name, arr)
                written[f"{split}/{cls}/{name}"] = arr.transpose(2, 0, 1)
    jpg = save_image(root / "train" / "ant" / "c.jpg", rand_hwc(rng), quality=90)
    written["train/ant/c.jpg"] = pil_decode_chw(jpg.read_bytes())
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    return root, written


def make_tar(src_root: Path, out: Path, prefix: str = "") -> Path:
    """Archive ``src_root``'s contents under ``prefix`` (e.g. './' or 'mydata/'), in reverse-sorted order."""
    entries = sorted((p for p in src_root.rglob("*")), reverse=True)
    with tarfile.open(out, "w:gz") as tar:
        for p in entries:
            tar.add(p, arcname=prefix + p.relative_to(src_root).as_posix(), recursive=False)
    return out


def expected_order(split, classes, names):
    return [f"{split}/{c}/{n}" for c in sorted(classes) for n in sorted(names)]


def test_image_folder_directory_order_labels_pixels(folder_tree):
    root, written = folder_tree
    raw = sources.read_image_folder(root, "train")
    assert raw.classes == ["Moose", "ant", "zebra"]
    names_ant = sorted(NAMES_CREATED + ["c.jpg"])
    order = ([f"train/Moose/{n}" for n in sorted(NAMES_CREATED)] + [f"train/ant/{n}" for n in names_ant]
             + [f"train/zebra/{n}" for n in sorted(NAMES_CREATED)])
    assert raw.files == order
    assert raw.labels.tolist() == [0] * 4 + [1] * 5 + [2] * 4
    assert raw.labels.dtype == np.int64 and raw.images.dtype == np.uint8
    assert raw.images.shape == (13, 3, 8, 8)
    for i, f in enumerate(order):
        assert np.array_equal(raw.images[i], written[f]), f
    test = sources.read_image_folder(root, "test", classes=raw.classes)
    assert test.files == expected_order("test", CLASSES_CREATED, ["x.png", "y.png"])
    assert test.labels.tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("prefix", ["", "./", "mydata/"])
def test_image_folder_archive_equals_directory(folder_tree, tmp_path, prefix):
    root, _ = folder_tree
    tar = make_tar(root, tmp_path / "tree.tar.gz", prefix)
    from_dir = sources.read_image_folder(root, "train")
    from_tar = sources.read_image_folder(tar, "train")
    assert from_tar.classes == from_dir.classes
    assert from_tar.labels.tolist() == from_dir.labels.tolist()
    assert np.array_equal(from_tar.images, from_dir.images)
    assert [f.split("/", f.count("/") - 2)[-1] for f in from_tar.files] == from_dir.files


def test_image_folder_with_top_level_folder_directory(folder_tree, tmp_path):
    root, _ = folder_tree
    outer = tmp_path / "outer"
    outer.mkdir()
    os.rename(root, outer / "cifarish")
    raw = sources.read_image_folder(outer, "train")
    assert raw.files[0] == "cifarish/train/Moose/10.png"
    assert raw.classes == ["Moose", "ant", "zebra"]


def test_imagefolder_build_data(folder_tree, tmp_path):
    root, _ = folder_tree
    tar = make_tar(root, tmp_path / "tree.tar.gz", "./")
    cfg = data_config(name="imagefolder", root=str(tar), imbalance_ratio=None, val="test",
                      cache_dir=str(tmp_path / "cache"))
    data = build_data(cfg, **QUIET)
    assert data.classes == ["Moose", "ant", "zebra"]
    assert data.class_counts == [4, 5, 4]
    assert data.test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert data.info["image_shape"] == [3, 8, 8]


def test_imagefolder_own_val_split(folder_tree):
    root, written = folder_tree
    save_image(root / "val" / "ant" / "v.png", written["test/ant/x.png"].transpose(1, 2, 0))
    data = build_data(data_config(name="imagefolder", root=str(root), imbalance_ratio=None, cache=False), **QUIET)
    assert data.info["val"]["source"] == "dataset val split"
    assert data.val.labels.tolist() == [1]
    assert np.array_equal(data.val.images[0].numpy(), written["test/ant/x.png"])


def test_missing_root_and_non_archive_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        sources.read_image_folder(tmp_path / "nope", "train")
    bogus = tmp_path / "data.tar.gz"
    bogus.write_bytes(b"this is not a tar")
    with pytest.raises(DataError, match="not a .tar"):
        sources.read_image_folder(bogus, "train")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        sources.read_image_folder(tmp_path / "empty", "train")


def test_test_split_with_unknown_class_folder(folder_tree):
    root, _ = folder_tree
    save_image(root / "test" / "cat" / "1.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="cat"):
        sources.read_image_folder(root, "test", classes=["Moose", "ant", "zebra"])


# ------------------------------------------------------------------------------------------------ decoding errors
def _two_class_tree(tmp_path, rng=None):
    rng = rng or np.random.default_rng(1)
    root = tmp_path / "t"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            save_image(root / split / cls / "0.png", rand_hwc(rng))
    return root


def test_corrupt_image_names_the_file(tmp_path):
    root = _two_class_tree(tmp_path)
    (root / "train" / "b" / "broken.jpg").write_bytes(np.random.default_rng(2).bytes(700))
    with pytest.raises(DataError, match=r"train/b/broken\.jpg"):
        sources.read_image_folder(root, "train")
    with pytest.raises(DataError, match=r"broken\.jpg"):
        build_data(data_config(name="imagefolder", root=str(root), imbalance_ratio=None, cache=False), **QUIET)


def test_truncated_jpeg_names_the_file(tmp_path):
    root = _two_class_tree(tmp_path)
    good = save_image(tmp_path / "full.jpg", np.random.default_rng(3).integers(0, 256, (64, 64, 3)), quality=95)
    data = good.read_bytes()
    (root / "train" / "a" / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.jpg"):
        sources.read_image_folder(root, "train")
    # the same in an archive
    tar = make_tar(root, tmp_path / "t.tar.gz")
    with pytest.raises(DataError, match=r"cut\.jpg"):
        sources.read_image_folder(tar, "train")


def test_different_sizes_need_image_size(tmp_path):
    root = tmp_path / "t"
    square = np.full((8, 8, 3), 7, np.uint8)
    wide = np.zeros((8, 16, 3), np.uint8)
    wide[:, :, 0] = np.arange(16, dtype=np.uint8)[None, :] * 10  # column-coded red channel
    wide[:, :, 1] = np.arange(8, dtype=np.uint8)[:, None] * 20  # row-coded green channel
    save_image(root / "train" / "a" / "0.png", square)
    save_image(root / "train" / "b" / "wide.png", wide)
    with pytest.raises(DataError, match=r"wide\.png.*image_size|image_size.*wide\.png"):
        sources.read_image_folder(root, "train")
    raw = sources.read_image_folder(root, "train", size=8)
    assert raw.images.shape == (2, 3, 8, 8)
    assert np.array_equal(raw.images[0], square.transpose(2, 0, 1))
    # shorter side is already 8: no resampling, centre crop of columns 4..11
    assert np.array_equal(raw.images[1], wide[:, 4:12].transpose(2, 0, 1))
    # a larger image is resized (shorter side -> size) then centre-cropped
    save_image(root / "train" / "b" / "big.png", np.full((20, 40, 3), 200, np.uint8))
    raw = sources.read_image_folder(root, "train", size=8)
    assert raw.images.shape == (3, 3, 8, 8) and (raw.images[1] == 200).all()


def test_grayscale_and_rgba_become_rgb(tmp_path):
    from PIL import Image

    root = tmp_path / "t"
    (root / "train" / "a").mkdir(parents=True)
    (root / "train" / "b").mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 9, np.uint8), "L").save(root / "train" / "a" / "g.png")
    Image.fromarray(np.full((8, 8, 4), 50, np.uint8), "RGBA").save(root / "train" / "b" / "r.png")
    raw = sources.read_image_folder(root, "train")
    assert raw.images.shape == (2, 3, 8, 8)
    assert (raw.images[0] == 9).all() and (raw.images[1] == 50).all()


@pytest.mark.parametrize("as_archive", [False, True])
def test_empty_class_folder_is_an_error(tmp_path, as_archive):
    root = _two_class_tree(tmp_path)
    (root / "train" / "c").mkdir()  # a class folder without images
    (root / "train" / "c" / "readme.txt").write_text("todo")
    path = make_tar(root, tmp_path / "t.tar.gz") if as_archive else root
    with pytest.raises(DataError, match=r"'c'.*no training images"):
        build_data(data_config(name="imagefolder", root=str(path), imbalance_ratio=None, cache=False), **QUIET)


# --------------------------------------------------------------------------------------------------- CIFAR pickles
def _write_pickle(path: Path, obj):
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


@pytest.fixture
def fake_cifar10(tmp_path):
    """CIFAR-10 python layout: 5 train batches of 10 images (labels interleaved), a test batch, batches.meta."""
    rng = np.random.default_rng(4)
    root = tmp_path / "c10" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    all_rows, all_labels = [], []
    for b in range(1, 6):
        rows = rng.integers(0, 256, (10, 3072), dtype=np.uint8)
        labels = [(b * 3 + i) % 10 for i in range(10)]
        _write_pickle(root / f"data_batch_{b}", {b"batch_label": b"x", b"data": rows, b"labels": labels,
                                                 b"filenames": [b"f"] * 10})
        all_rows.append(rows), all_labels.extend(labels)
    test_rows = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    _write_pickle(root / "test_batch", {b"data": test_rows, b"labels": [3, 1, 2, 0]})
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _write_pickle(root / "batches.meta", {b"label_names": names, b"num_cases_per_batch": 10})
    return tmp_path / "c10", np.concatenate(all_rows), all_labels, test_rows


def chw_from_row(row):
    """CIFAR row layout: 1024 red, then green, then blue values, each row-major 32 x 32."""
    out = np.zeros((3, 32, 32), np.uint8)
    for c in range(3):
        for y in range(32):
            out[c, y] = row[c * 1024 + y * 32: c * 1024 + y * 32 + 32]
    return out


def test_cifar10_pickles(fake_cifar10):
    parent, rows, labels, test_rows = fake_cifar10
    for root in (parent, parent / "cifar-10-batches-py"):
        assert sources.is_cifar_pickle_dir(root, 10)
        raw = sources.read_cifar_pickles(root, 10, "train")
        assert raw.labels.tolist() == labels  # file order: batch 1..5, rows in order
        assert raw.images.shape == (50, 3, 32, 32) and raw.images.dtype == np.uint8
        for i in (0, 13, 49):
            assert np.array_equal(raw.images[i], chw_from_row(rows[i]))
        assert raw.classes[0] == "airplane" and raw.classes[9] == "truck"
        test = sources.read_cifar_pickles(root, 10, "test")
        assert test.labels.tolist() == [3, 1, 2, 0]
        assert np.array_equal(test.images[2], chw_from_row(test_rows[2]))


def test_cifar10_pickles_build_data_subset_in_file_order(fake_cifar10):
    from test_data_longtail import ref_cao_selection, ref_counts, ref_hash

    parent, _, labels, _ = fake_cifar10
    data = build_data(data_config(name="cifar10-lt", root=str(parent), imbalance_ratio=5, val="test"), **QUIET)
    counts = ref_counts(5, 10, 5)
    assert counts == [5, 4, 3, 2, 2, 2, 1, 1, 1, 1]
    assert data.class_counts == counts
    assert data.info["index_sha256"] == ref_hash(ref_cao_selection(labels, counts))
    assert data.classes[1] == "automobile"


def test_cifar100_pickles(tmp_path):
    rng = np.random.default_rng(5)
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    rows = rng.integers(0, 256, (200, 3072), dtype=np.uint8)
    fine = [(7 * i) % 100 for i in range(200)]
    _write_pickle(root / "train", {b"data": rows, b"fine_labels": fine, b"coarse_labels": [0] * 200})
    _write_pickle(root / "test", {b"data": rows[:3], b"fine_labels": [5, 6, 7], b"coarse_labels": [0] * 3})
    _write_pickle(root / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                                  b"coarse_label_names": [b"x"] * 20})
    raw = sources.read_cifar_pickles(tmp_path, 100, "train")
    assert raw.labels.tolist() == fine
    assert np.array_equal(raw.images[77], chw_from_row(rows[77]))
    assert raw.classes[42] == "c42"
    data = build_data(data_config(name="cifar100-lt", root=str(tmp_path), imbalance_ratio=None, val="test"), **QUIET)
    assert data.num_classes == 100 and data.class_counts == [2] * 100
    assert data.test.labels.tolist() == [5, 6, 7]


def test_cifar_pickle_errors(fake_cifar10):
    parent, *_ = fake_cifar10
    root = parent / "cifar-10-batches-py"
    (root / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="data_batch_3"):
        sources.read_cifar_pickles(parent, 10, "train")
    (root / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        sources.read_cifar_pickles(parent, 10, "train")


def test_cifar_pickle_label_out_of_range(fake_cifar10):
    parent, rows, labels, _ = fake_cifar10
    root = parent / "cifar-10-batches-py"
    _write_pickle(root / "data_batch_2", {b"data": rows[10:20], b"labels": [12] + labels[11:20]})
    with pytest.raises(DataError, match="12"):
        build_data(data_config(name="cifar10-lt", root=str(parent), imbalance_ratio=None, val="test"), **QUIET)


# ------------------------------------------------------------------------------------------------------ list files
@pytest.fixture
def list_dataset(tmp_path):
    rng = np.random.default_rng(6)
    img_root = tmp_path / "images"
    entries = [("n02/z.jpg", 2), ("n00/b.png", 0), ("n01/a.png", 1), ("n00/a.png", 0), ("n02/y.png", 2),
               ("n01/sub dir/c.png", 1)]
    pixels = {}
    for rel, _ in entries:
        arr = rand_hwc(rng)
        path = save_image(img_root / rel, arr, quality=95)
        pixels[rel] = pil_decode_chw(path.read_bytes())
    train = tmp_path / "train.txt"
    train.write_text("".join(f"{rel} {label}\n" for rel, label in entries) + "\n")
    test = tmp_path / "test.txt"
    test.write_text("n01/a.png 1\nn00/a.png 0\nn02/y.png 2\n")
    return img_root, train, test, entries, pixels


def test_list_file_line_order(list_dataset):
    img_root, train, _, entries, pixels = list_dataset
    raw = sources.read_list_file(train, img_root, None, num_classes=3)
    assert raw.files == [rel for rel, _ in entries]
    assert raw.labels.tolist() == [label for _, label in entries]
    for i, (rel, _) in enumerate(entries):
        assert np.array_equal(raw.images[i], pixels[rel]), rel
    assert raw.classes == ["0", "1", "2"]


def test_list_file_build_data(list_dataset, tmp_path):
    img_root, train, test, _, _ = list_dataset
    cfg = data_config(name="listfile", root=str(img_root), train_list=str(train), test_list=str(test),
                      num_classes=3, imbalance_ratio=None, val="test", cache_dir=str(tmp_path / "cache"))
    data = build_data(cfg, **QUIET)
    assert data.class_counts == [2, 2, 2]
    assert data.test.labels.tolist() == [1, 0, 2]
    cfg_val = data_config(name="listfile", root=str(img_root), train_list=str(train), test_list=str(test),
                          val_list=str(test), imbalance_ratio=None, cache=False, stream=False)
    with_val = build_data(cfg_val, **QUIET)
    assert with_val.info["val"]["source"] == "dataset val split"
    assert torch.equal(with_val.val.images, with_val.test.images)


def test_list_file_label_out_of_range(list_dataset):
    img_root, train, *_ = list_dataset
    train.write_text("n00/a.png 0\nn01/a.png 1\nn02/y.png 3\n")
    with pytest.raises(DataError, match=r"train\.txt:3.*label 3"):
        sources.read_list_file(train, img_root, None, num_classes=3)
    train.write_text("n00/a.png 0\nn01/a.png -1\n")
    with pytest.raises(DataError, match=r"train\.txt:2"):
        sources.read_list_file(train, img_root, None)


def test_list_file_test_label_beyond_train_classes(list_dataset):
    img_root, train, test, *_ = list_dataset
    test.write_text("n00/a.png 0\nn02/y.png 5\n")
    cfg = data_config(name="listfile", root=str(img_root), train_list=str(train), test_list=str(test),
                      imbalance_ratio=None, val="test", cache=False)
    with pytest.raises(DataError, match=r"label 5.*n02/y\.png.*out of range"):
        build_data(cfg, **QUIET)


def test_list_file_missing_image(list_dataset):
    img_root, train, *_ = list_dataset
    train.write_text("n00/a.png 0\nn01/missing.png 1\n")
    with pytest.raises(DataError, match=r"missing\.png"):
        sources.read_list_file(train, img_root, None)


def test_list_file_malformed_and_missing(list_dataset, tmp_path):
    img_root, train, *_ = list_dataset
    train.write_text("n00/a.png zero\n")
    with pytest.raises(DataError, match=r"train\.txt:1"):
        sources.read_list_file(train, img_root, None)
    with pytest.raises(DataError, match="nope.txt"):
        sources.read_list_file(tmp_path / "nope.txt", img_root, None)
    train.write_text("\n\n")
    with pytest.raises(DataError, match="no entries"):
        sources.read_list_file(train, img_root, None)


def test_list_file_empty_class(list_dataset):
    img_root, train, test, *_ = list_dataset
    train.write_text("n00/a.png 0\nn00/b.png 0\nn02/y.png 2\n")
    cfg = data_config(name="listfile", root=str(img_root), train_list=str(train), test_list=str(test),
                      num_classes=3, imbalance_ratio=None, val="test", cache=False)
    with pytest.raises(DataError, match=r"'1'.*no training images"):
        build_data(cfg, **QUIET)


def test_list_file_needs_lists(list_dataset):
    img_root, train, *_ = list_dataset
    with pytest.raises(DataError, match="test_list"):
        build_data(data_config(name="listfile", root=str(img_root), train_list=str(train), cache=False), **QUIET)


# ----------------------------------------------------------------------------------------------------------- cache
def _raw(seed=0, n=6):
    rng = np.random.default_rng(seed)
    return sources.RawSplit(rng.integers(0, 256, (n, 3, 4, 4), dtype=np.uint8),
                            np.arange(n, dtype=np.int64) % 3, [f"f{i}" for i in range(n)], ["x", "y", "z"])


class CountingBuilder:
    def __init__(self, seed=0):
        self.calls, self.seed = 0, seed

    def __call__(self):
        self.calls += 1
        return _raw(self.seed)


@pytest.fixture
def source_file(tmp_path):
    path = tmp_path / "source.bin"
    path.write_bytes(b"pretend this is an archive")
    return path


def _entry(cache_dir: Path) -> Path:
    entries = [p for p in cache_dir.iterdir() if p.is_dir()]
    assert len(entries) == 1, entries
    return entries[0]


def test_cache_hit_skips_builder(source_file, tmp_path):
    cache_dir = tmp_path / "cache"
    build = CountingBuilder()
    first = cached_split(str(source_file), {"split": "train", "size": None}, build, cache_dir, **QUIET)
    second = cached_split(str(source_file), {"split": "train", "size": None}, build, cache_dir, **QUIET)
    assert build.calls == 1
    expected = _raw()
    for split in (first, second):
        assert np.array_equal(split.images, expected.images) and split.images.dtype == np.uint8
        assert np.array_equal(split.labels, expected.labels) and split.labels.dtype == np.int64
        assert split.files == expected.files and split.classes == expected.classes
    manifest = json.loads((_entry(cache_dir) / "manifest.json").read_text())
    assert manifest["source"] == str(source_file.resolve())
    assert manifest["fingerprint"] == "sha256:" + hashlib.sha256(source_file.read_bytes()).hexdigest()
    assert manifest["shape"] == [6, 3, 4, 4]
    assert manifest["images_sha256"] == hashlib.sha256(expected.images.tobytes()).hexdigest()
    assert manifest["labels_sha256"] == hashlib.sha256(expected.labels.astype("<i8").tobytes()).hexdigest()
    assert manifest["split"] == "train"
    # another option or changed source content -> another entry, built again
    cached_split(str(source_file), {"split": "test", "size": None}, build, cache_dir, **QUIET)
    assert build.calls == 2
    source_file.write_bytes(b"new content")
    cached_split(str(source_file), {"split": "train", "size": None}, build, cache_dir, **QUIET)
    assert build.calls == 3


def _flip_tail_bytes(path: Path, count=16):
    data = bytearray(path.read_bytes())
    for i in range(1, count + 1):
        data[-i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip_images", "flip_labels", "truncate_images", "empty_images",
                                    "bad_manifest_json", "manifest_missing_key", "missing_labels"])
def test_corrupt_cache_entry_is_rebuilt(source_file, tmp_path, damage):
    cache_dir = tmp_path / "cache"
    build = CountingBuilder()
    cached_split(str(source_file), {"o": 1}, build, cache_dir, **QUIET)
    entry = _entry(cache_dir)
    if damage == "flip_images":
        _flip_tail_bytes(entry / "images.npy")
    elif damage == "flip_labels":
        _flip_tail_bytes(entry / "labels.npy", 3)
    elif damage == "truncate_images":
        data = (entry / "images.npy").read_bytes()
        (entry / "images.npy").write_bytes(data[: len(data) - 20])
    elif damage == "empty_images":
        (entry / "images.npy").write_bytes(b"")
    elif damage == "bad_manifest_json":
        (entry / "manifest.json").write_text("{not json")
    elif damage == "manifest_missing_key":
        manifest = json.loads((entry / "manifest.json").read_text())
        del manifest["files"]
        (entry / "manifest.json").write_text(json.dumps(manifest))
    else:
        (entry / "labels.npy").unlink()
    messages = []
    again = cached_split(str(source_file), {"o": 1}, build, cache_dir, log=messages.append)
    assert build.calls == 2
    assert any("rebuilding" in m for m in messages)
    assert np.array_equal(again.images, _raw().images) and again.files == _raw().files
    cached_split(str(source_file), {"o": 1}, build, cache_dir, **QUIET)  # the entry was repaired
    assert build.calls == 2


def test_cache_disabled(source_file, tmp_path):
    cache_dir = tmp_path / "cache"
    build = CountingBuilder()
    for _ in range(2):
        cached_split(str(source_file), {"o": 1}, build, False, **QUIET)
    assert build.calls == 2
    assert not cache_dir.exists()


def test_cache_directory_source_fingerprint(tmp_path):
    src = tmp_path / "dir"
    src.mkdir()
    (src / "a.txt").write_text("1")
    cache_dir = tmp_path / "cache"
    build = CountingBuilder()
    cached_split(str(src), {}, build, cache_dir, **QUIET)
    cached_split(str(src), {}, build, cache_dir, **QUIET)
    assert build.calls == 1
    (src / "b.txt").write_text("22")
    cached_split(str(src), {}, build, cache_dir, **QUIET)
    assert build.calls == 2
    assert _entry_count(cache_dir) == 2


def _entry_count(cache_dir):
    return sum(1 for p in cache_dir.iterdir() if p.is_dir())


def test_build_data_cache_switch(folder_tree, tmp_path):
    root, _ = folder_tree
    cache_dir = tmp_path / "cache"
    values = dict(name="imagefolder", root=str(root), imbalance_ratio=None, val="test", cache_dir=str(cache_dir))
    build_data(data_config(cache=False, **values), **QUIET)
    assert not cache_dir.exists() or _entry_count(cache_dir) == 0
    first = build_data(data_config(**values), **QUIET)
    assert _entry_count(cache_dir) == 2  # train and test splits
    # a cached build is identical, and does not decode: make decoding impossible and build again
    original = sources.decode_image
    try:
        sources.decode_image = lambda *a, **k: pytest.fail("decoded although cached")
        second = build_data(data_config(**values), **QUIET)
    finally:
        sources.decode_image = original
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.test.labels, second.test.labels)
    assert first.info["index_sha256"] == second.info["index_sha256"]


def test_a_cache_entry_stored_meanwhile_by_another_process_is_kept(tmp_path, source_file, monkeypatch):
    """Two processes of a torchrun job decoding the same split: the one that stores second finds the entry in
    place (its rename fails) and keeps it instead of failing."""
    import tailwise.data.cache as cache

    cached_split(str(source_file), {"split": "train"}, CountingBuilder(), tmp_path / "c", **QUIET)  # the first process
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).exists():  # the race: the other process's entry landed between our rmtree and rename
            raise OSError(39, "Directory not empty")
        return real_replace(src, dst)

    monkeypatch.setattr(cache.shutil, "rmtree", lambda path, ignore_errors=False: None)  # entry not removed in time
    monkeypatch.setattr(cache.os, "replace", replace)
    entry = _entry(tmp_path / "c")
    cache._store(entry, _raw(0), {"source": "s"})  # no error: a valid entry is there
    assert cache._load(entry) is not None
    junk = entry.with_name("junk")
    junk.mkdir()
    (junk / "manifest.json").write_text("{")  # in the way, and not a valid entry: the failure is still an error
    with pytest.raises(OSError):
        cache._store(junk, _raw(0), {"source": "s"})
