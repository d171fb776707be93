"""The streamed data path: file-backed splits, the streaming loader (workers, resume, data parallelism),
`tailwise data verify`, and a streamed `tailwise run` on a tiny generated list-file dataset."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import data_config, save_image
from tailwise.cli import main
from tailwise.data import stream
from tailwise.data.dataset import build_data
from tailwise.data.factory import make_eval_loader
from tailwise.data.loader import BatchLoader, Sampler
from tailwise.data.stream import FileSplit, StreamLoader
from tailwise.data.transforms import train_transform
from tailwise.data.verify import verify_lists
from tailwise.errors import DataError

SIZE = 32
RAW = [0.0] * 3, [1 / 255] * 3  # mean / std that leave the loaders' batches at the uint8 values (as floats)
COUNTS = [16, 12, 8, 4]  # a long-tailed 4-class training list: 40 images


@pytest.fixture(scope="module")
def listed(tmp_path_factory):
    """Images of two sizes (40x50 and 70x60, JPEG) under ``root``; ``train.txt`` (40 lines, long-tailed) and
    ``test.txt`` (8 other images) in '<relative path> <label>' form."""
    tmp = tmp_path_factory.mktemp("listfile")
    root, rng = tmp / "images", np.random.default_rng(0)

    def write(name, label, i):
        w, h = (40, 50) if i % 2 else (70, 60)
        save_image(root / f"n{label:02d}" / name, rng.integers(0, 256, (h, w, 3)), quality=90)
        return f"n{label:02d}/{name} {label}\n"

    train = [write(f"train_{i}.jpg", c, i) for c, n in enumerate(COUNTS) for i in range(n)]
    test = [write(f"test_{i}.jpg", c, i) for c in range(4) for i in range(2)]
    (tmp / "train.txt").write_text("".join(train))
    (tmp / "test.txt").write_text("".join(test))
    return tmp


@pytest.fixture(scope="module")
def split(listed):
    lines = [line.rsplit(maxsplit=1) for line in (listed / "train.txt").read_text().splitlines()]
    return FileSplit(listed / "images", [p for p, _ in lines], [int(y) for _, y in lines], SIZE)


def by_hand(path, size=SIZE) -> torch.Tensor:
    """Reference evaluation decode: shorter side to int(size * 256 / 224) (bilinear), centre size x size crop."""
    with Image.open(path) as img:
        img = img.convert("RGB")
    w, h = img.size
    short = int(size * 256 / 224)
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = int(round((nw - size) / 2)), int(round((nh - size) / 2))
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy())


def train_loader(split, workers=0, batch_size=8, rank=0, world=1, seed=3):
    sampler = Sampler(split.labels, "instance", seed=seed, batch_size=batch_size)
    return StreamLoader(split, batch_size, *RAW, sampler=sampler, workers=workers, rank=rank, world=world,
                        transform=train_transform(SIZE, color_jitter=0.4))


def epochs(loader, n=2):
    return [[(x.clone(), y.clone()) for x, y in loader] for _ in range(n)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


# ------------------------------------------------------------------------------------------------- FileSplit
def test_file_split_batch_equals_decoding_by_hand(split):
    idx = [0, 1, 17, 39]
    got = split.batch(torch.tensor(idx))
    assert got.dtype == torch.uint8 and got.shape == (4, 3, SIZE, SIZE) and split.image_shape == (3, SIZE, SIZE)
    for row, i in zip(got, idx):
        assert torch.equal(row, by_hand(split.path(i))), split.file(i)
    assert torch.equal(split.example(2), got[:2])
    sub = split.subset([39, 17])
    assert sub.labels.tolist() == [3, 1] and torch.equal(sub.batch([0, 1]), got[[3, 2]])
    # the evaluation loader yields the same images, in order
    streamed = torch.cat([x for x, _ in make_eval_loader(split, 16, *RAW)])
    assert torch.equal(streamed.to(torch.uint8), split.batch(range(40)))


def test_file_split_unreadable_image_is_a_data_error(split, tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    bad = FileSplit(tmp_path, ["bad.jpg", "gone.jpg"], [0, 0], SIZE)
    with pytest.raises(DataError, match=r"bad\.jpg.*tailwise data verify"):
        bad.batch([0])
    with pytest.raises(DataError, match=r"gone\.jpg: the file does not exist"):
        bad.subset([1]).example()


def test_a_decompression_bomb_is_a_data_error(split, tmp_path, monkeypatch):
    """PIL refuses images over twice MAX_IMAGE_PIXELS with DecompressionBombError (not an OSError): both decode
    paths turn it into a clean DataError naming the file."""
    from tailwise.data.sources import decode_image

    save_image(tmp_path / "big.png", np.zeros((20, 20, 3), dtype=np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 400 pixels > 2 x 10
    with pytest.raises(DataError, match=r"big\.png"):
        FileSplit(tmp_path, ["big.png"], [0], SIZE).batch([0])
    with pytest.raises(DataError, match=r"big\.png"):
        decode_image((tmp_path / "big.png").read_bytes(), "big.png", None)


# ---------------------------------------------------------------------------------------------- StreamLoader
def test_workers_do_not_change_the_batches(split):
    inline, pooled = epochs(train_loader(split, workers=0)), epochs(train_loader(split, workers=2))
    for a, b in zip(inline, pooled):
        assert same(a, b)
    assert not torch.equal(inline[0][0][0], inline[1][0][0])  # a new epoch: new order and augmentation
    assert [len(y) for _, y in inline[0]] == [8] * 5
    assert not same(inline[0], epochs(train_loader(split, seed=4), 1)[0])  # the seed drives it


def test_resume_mid_epoch_equals_uninterrupted_without_decoding_the_skipped_batches(split, monkeypatch):
    full = epochs(train_loader(split), 2)
    first = train_loader(split)
    head = [(x.clone(), y.clone()) for _, (x, y) in zip(range(2), first)]
    state = first.state_dict()
    assert state == {"epoch": 0, "position": 2}
    decoded = []
    real = stream.open_rgb
    monkeypatch.setattr(stream, "open_rgb", lambda path: decoded.append(path) or real(path))
    resumed = train_loader(split)
    resumed.load_state_dict(state)
    rest = [(x.clone(), y.clone()) for x, y in resumed]
    assert len(decoded) == 3 * 8  # only the three remaining batches were read
    assert same(head + rest, full[0])
    assert same([(x.clone(), y.clone()) for x, y in resumed], full[1])  # and the next epoch goes on as usual


@pytest.mark.parametrize("batch_size", [6, 13])  # final global batch of 4 (split 2 + 2) / of 1 (dropped)
def test_rank_slices_concatenate_to_the_single_process_batches(split, batch_size):
    whole = epochs(train_loader(split, batch_size=batch_size), 1)[0]
    parts = [epochs(train_loader(split, batch_size=batch_size, rank=r, world=2), 1)[0] for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == math.ceil(40 / batch_size) - (40 % batch_size == 1)
    joined = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(*parts)]
    assert same(joined, whole[:len(joined)])
    # the same batch count as the in-memory loader under the same sharding
    memory = BatchLoader(torch.zeros(40, 3, 2, 2, dtype=torch.uint8), split.labels, batch_size, *RAW,
                         sampler=Sampler(split.labels, "instance", batch_size=batch_size), world=2)
    assert len(memory) == len(parts[0])
    # evaluation: each process its contiguous part of the split, in order
    evals = [torch.cat([x for x, _ in make_eval_loader(split, 8, *RAW, rank=r, world=2)]) for r in range(2)]
    assert [len(e) for e in evals] == [20, 20]
    assert torch.equal(torch.cat(evals), torch.cat([x for x, _ in make_eval_loader(split, 8, *RAW)]))


def test_corrupt_image_during_training_is_a_clean_data_error(split, tmp_path):
    (tmp_path / "n00").mkdir()
    (tmp_path / "n00" / "cut.jpg").write_bytes((split.path(0)).read_bytes()[:200])
    bad = FileSplit(tmp_path, ["n00/cut.jpg"] * 4, [0] * 4, SIZE)
    for workers in (0, 2):
        with pytest.raises(DataError, match=r"cut\.jpg.*tailwise data verify") as info:
            list(train_loader(bad, workers=workers, batch_size=2))
        assert "Traceback" not in str(info.value)


# --------------------------------------------------------------------------------------------------- build_data
def test_build_data_streams_list_files(listed):
    values = dict(name="listfile", root=str(listed / "images"), train_list=str(listed / "train.txt"),
                  test_list=str(listed / "test.txt"), imbalance_ratio=None, val="holdout", val_per_class=2)
    streamed = build_data(data_config(**values), log=lambda msg: None)  # image_size unset: streamed at 224
    assert isinstance(streamed.train, FileSplit) and streamed.train.image_shape == (3, 224, 224)
    memory = build_data(data_config(**values, image_size=SIZE, cache=False), log=lambda msg: None)  # auto: <= 64
    assert not isinstance(memory.train, FileSplit)
    small = build_data(data_config(**values, image_size=SIZE, stream=True), log=lambda msg: None)
    # the same subset, holdout and groups whether streamed or not: they only need labels and indices
    for key in ("index_sha256", "class_counts", "val"):
        assert small.info[key] == memory.info[key], key
    assert torch.equal(small.train.labels, memory.train.labels) and torch.equal(small.val.labels, memory.val.labels)
    assert small.info["streamed"] and not memory.info["streamed"]


@pytest.mark.parametrize("overrides, message", [
    ({"name": "synthetic", "stream": True}, "data.stream=true needs data.name=listfile"),
    ({"name": "listfile", "root": "x", "cutout": 8}, "data.cutout is not available for streamed data"),
    ({"name": "synthetic", "color_jitter": 0.4}, "data.color_jitter applies to streamed data only"),
    ({"name": "synthetic", "stream": "maybe"}, "allowed: auto, true, false"),
])
def test_streaming_config_errors(overrides, message):
    from tailwise.config import config_from_dict
    from tailwise.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        config_from_dict({"data": overrides})


def test_stream_auto_rule():
    assert data_config(name="listfile", root="x").streamed  # image_size unset
    assert data_config(name="listfile", root="x", image_size=224).streamed
    assert not data_config(name="listfile", root="x", image_size=64).streamed
    assert not data_config(name="listfile", root="x", image_size=224, stream=False).streamed
    assert not data_config(name="imagefolder", root="x", image_size=224).streamed


# ------------------------------------------------------------------------------------------------- data verify
def test_data_verify_counts_every_problem_kind(listed, tmp_path, capsys):
    root = listed / "images"
    good = (listed / "train.txt").read_text().splitlines()
    (root / "n00" / "truncated.jpg").write_bytes((root / "n00" / "train_0.jpg").read_bytes()[:300])
    bad = tmp_path / "bad.txt"
    bad.write_text("\n".join(good[:10] + ["n00/missing.jpg 0", "n00/truncated.jpg 0", "just-one-field",
                                          "n01/train_0.jpg seven", "n02/train_1.jpg 9", "n03/train_0.jpg -1",
                                          "../train.txt 0"]) + "\n")
    report = verify_lists([listed / "train.txt", bad], root, workers=2)
    kinds = {k: len(v) for k, v in report.by_kind().items()}
    assert kinds == {"missing": 1, "corrupt": 1, "malformed": 2, "label out of range": 2, "outside root": 1}
    assert report.num_classes == 4 and report.entries == 40 + 15 and not report.ok
    assert main(["data", "verify", "--list", str(listed / "train.txt"), "--list", str(bad), "--root", str(root)]) == 2
    out = capsys.readouterr().out
    assert "n00/missing.jpg" in out and "bad.txt:12: n00/truncated.jpg" in out and "just-one-field" in out
    assert out.strip().splitlines()[-1].startswith("data verify: 7 problems (1 missing, 1 corrupt, 2 malformed, "
                                                    "2 label out of range, 1 outside root)")
    # a recipe's lists; clean -> exit 0
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"name": "listfile", "root": str(root), "num_classes": 4,
                                               "train_list": str(listed / "train.txt"),
                                               "test_list": str(listed / "test.txt")}}))
    assert main(["data", "verify", str(recipe), "run.workers=2"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == "data verify: OK, 48 entries in 2 list files, 48 distinct images, no problems"
    assert main(["data", "verify", str(recipe), "data.num_classes=3"]) == 2
    assert "6 label out of range" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ tailwise run
def streamed_recipe(listed, epochs=1, workers=2) -> dict:
    return {
        "data": {"name": "listfile", "root": str(listed / "images"), "train_list": str(listed / "train.txt"),
                 "test_list": str(listed / "test.txt"), "num_classes": 4, "imbalance_ratio": None,
                 "image_size": SIZE, "stream": True, "val": "test"},
        "model": {"name": "resnet20"}, "loss": {"name": "balanced_softmax"},
        "train": {"epochs": epochs, "batch_size": 16, "eval_batch_size": 16, "lr": 0.05, "warmup_epochs": 0,
                  "milestones": []},
        "run": {"seed": 0, "progress": "none", "threads": 1, "workers": workers}}


def test_streamed_trainer_resumes_mid_epoch_exactly(listed, tmp_path):
    from tailwise.config import config_from_dict
    from tailwise.engine.rundir import prepare_run_dir
    from tailwise.engine.trainer import Interrupted, Trainer

    def trainer(name, workers):
        cfg = config_from_dict(streamed_recipe(listed, epochs=2, workers=workers))
        prepare_run_dir(cfg, tmp_path / name)
        return Trainer(cfg, tmp_path / name, log=lambda msg: None)

    full = trainer("full", 0)
    full.fit()
    first = trainer("cut", 2)  # another worker count, too: the batches must not depend on it
    hook = first.method.after_step

    def after_step(ctx):  # SIGINT during the second step of epoch 1 (3 batches per epoch)
        hook(ctx)
        if ctx.step + 1 == 5:
            first._stop_signal = 2

    first.method.after_step = after_step
    with pytest.raises(Interrupted):
        first.fit()
    resumed = Trainer(first.cfg, first.out, log=lambda msg: None)
    resumed.resume()
    assert (resumed.start_epoch, resumed.train_loader.position) == (1, 2)
    resumed.fit()
    for key, value in full.ctx.model.state_dict().items():
        assert torch.equal(value, resumed.ctx.model.state_dict()[key]), key


def test_streamed_run_writes_result(listed, tmp_path, capsys):
    recipe = tmp_path / "stream.yaml"
    recipe.write_text(yaml.safe_dump(streamed_recipe(listed)))
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    capsys.readouterr()
    result = json.loads((out / "result.json").read_text())
    assert result["dataset"]["streamed"] and result["dataset"]["train_size"] == 40
    assert result["dataset"]["image_shape"] == [3, SIZE, SIZE] and len(result["accuracy"]["per_class"]) == 4
    arch = json.loads((out / "model" / "arch.json").read_text())
    assert arch["preprocess"]["mean"] == [0.485, 0.456, 0.406]  # streamed: the ImageNet constants
    assert main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == result["accuracy"]
    assert main(["data", "inspect", str(recipe), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["index_sha256"] == result["dataset"]["index_sha256"]


def test_streamed_run_draws_private_training_batches(listed, tmp_path):
    """DO's retraining steps and LTAP's trial statistics draw training batches from a streamed loader too: the
    sampler's order for the private key, the same batches on every call, the loader's own position untouched."""
    from tailwise.config import config_from_dict
    from tailwise.engine.rundir import prepare_run_dir
    from tailwise.engine.trainer import Trainer
    from tailwise.methods.batches import training_batches

    cfg = config_from_dict(streamed_recipe(listed, workers=0))
    prepare_run_dir(cfg, tmp_path / "run")
    ctx = Trainer(cfg, tmp_path / "run", log=lambda msg: None).ctx
    sampler, loader = ctx.train_loader.sampler, ctx.train_loader
    first = [b for _, b in zip(range(3), training_batches(ctx, sampler, 3_000_000))]
    again = [b for _, b in zip(range(3), training_batches(ctx, sampler, 3_000_000))]
    order = sampler.epoch_indices(3_000_000)
    assert [tuple(x.shape) for x, _ in first] == [(16, 3, SIZE, SIZE)] * 3  # 40 images: 2 per epoch key
    assert torch.equal(first[0][1], ctx.data.train.labels[order[:16]].to(first[0][1].device))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert (loader.epoch, loader.position) == (0, 0)
