"""Issue #26, the adversarial pass: no code runs from any file a user is handed, one process per run directory,
guarded loads, and one clear message with exit code 2 (never a traceback, nothing half-written) for every user
error. Each test reproduces one defect of the pass on a tiny synthetic run and asserts the fix.

The CLI runs in this process (``tailwise.cli.main``), so a traceback would surface as an uncaught exception; the
one test that needs a second process (the run-directory lock) starts one.
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import save_image
from tailwise.cli import main
from tailwise.config import load_config
from tailwise.data import sources
from tailwise.data.cache import cached_split
from tailwise.data.verify import verify_lists
from tailwise.deploy import load_model
from tailwise.engine.rundir import LOCK_NAME, RunLock
from tailwise.errors import ConfigError, DataError, TailwiseError

TINY = {
    "data": {"name": "synthetic", "num_classes": 3, "synthetic_per_class": 20, "synthetic_test_per_class": 4,
             "imbalance_ratio": 2, "image_size": 8, "val_per_class": 2, "cache": False},
    "model": {"name": "resnet20"},
    "train": {"epochs": 1, "batch_size": 16, "eval_batch_size": 64, "warmup_epochs": 0, "milestones": []},
    "run": {"progress": "none", "threads": 1},
}


def write_recipe(path: Path, raw: dict = TINY) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def cli(capsys, *args) -> tuple[int, str]:
    """Run ``tailwise ARGS`` in this process; (exit code, stderr). An uncaught exception fails the test."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def refused(capsys, *args) -> str:
    """``tailwise ARGS`` must exit with code 2 and one ``error:`` message; returns that message."""
    code, err = cli(capsys, *args)
    assert code == 2, err
    assert "error: " in err
    return err[err.index("error: "):]


class Marker:
    """Pickles to a call that creates the file ``path`` when unpickled: what a booby-trapped file does."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 1-epoch run (config.yaml, metrics.jsonl, checkpoints, model/, result.json)."""
    root = tmp_path_factory.mktemp("finished")
    assert main(["run", str(write_recipe(root / "tiny.yaml")), "--out", str(root / "run")]) == 0
    return root / "run"


@pytest.fixture
def run_dir(finished, tmp_path) -> Path:
    """A private copy of the finished run, to damage."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


def metrics_epochs(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------- 1. no code from data
@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_pickle_that_carries_code_is_refused_and_runs_nothing(capsys, tmp_path, protocol):
    root = tmp_path / "E" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    marker = tmp_path / "MARKER"
    for name in ["test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]:
        (root / name).write_bytes(pickle.dumps(Marker(marker), protocol=protocol))
    message = refused(capsys, "data", "inspect", "cifar10_lt_ir100_resnet32_bs", f"data.root={tmp_path / 'E'}")
    assert "refers to posix.mkdir" in message and "data_batch_1" in message
    assert not marker.exists()


def test_cifar_pickles_of_plain_data_still_load_at_every_protocol(tmp_path):
    rows = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for protocol, name in zip((2, 3, 4, 5, 2, 4), names):
        batch = {b"data": rows, b"labels": [1, np.int64(0)], b"filenames": [b"a", b"b"], b"batch_label": b"x"}
        (root / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}, 2))
    raw = sources.read_cifar_pickles(tmp_path, 10, "train")
    assert raw.images.shape == (10, 3, 32, 32) and raw.labels.tolist() == [1, 0] * 5
    assert np.array_equal(raw.images[0].reshape(-1), rows[0]) and raw.classes[3] == "c3"


# ----------------------------------------------------------------------------- 2. one process per run directory
def test_a_second_process_is_refused_with_the_pid_holding_the_run(capsys, run_dir):
    before = (run_dir / "metrics.jsonl").read_text()
    lock = RunLock.acquire(run_dir)  # this process runs in run_dir
    try:
        proc = subprocess.run([sys.executable, "-m", "tailwise", "run", "--resume", str(run_dir)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert f"in use by another tailwise process (PID {os.getpid()})" in proc.stderr
        # in-process too: flock locks conflict between two opens of the file
        assert f"PID {os.getpid()}" in refused(capsys, "run", "--resume", run_dir)
    finally:
        lock.release()
    assert (run_dir / "metrics.jsonl").read_text() == before
    code, _ = cli(capsys, "run", "--resume", run_dir)  # released: the run continues, each epoch once
    assert code == 0 and metrics_epochs(run_dir) == [0] and not (run_dir / LOCK_NAME).exists()


def _image_tree(root: Path, corrupt: bool) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for cls in ("a", "b"):
            for i in range(n):
                save_image(root / split / cls / f"{i}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    if corrupt:
        (root / "train" / "b" / "3.png").write_bytes(b"\x89PNG but not really")
    return root


def test_a_new_run_that_fails_before_training_leaves_nothing_and_can_be_started_again(capsys, tmp_path):
    data = _image_tree(tmp_path / "tree", corrupt=True)
    recipe = write_recipe(tmp_path / "r.yaml", {**TINY, "data": {
        "name": "imagefolder", "root": str(data), "imbalance_ratio": None, "val": "test", "cache": False}})
    out = tmp_path / "out"
    message = refused(capsys, "run", recipe, "--out", out)
    # the decode error names the file, not PIL's <_io.BytesIO object ...>
    assert "cannot decode image train/b/3.png" in message and "BytesIO" not in message
    assert not out.exists()
    _image_tree(tmp_path / "tree", corrupt=False)
    code, _ = cli(capsys, "run", recipe, "--out", out)
    assert code == 0 and (out / "result.json").is_file()


def test_resume_of_a_run_that_never_finished_an_epoch_starts_it_from_epoch_0(capsys, run_dir):
    # what a kill during the first epoch (or an older version's failed start) leaves: config.yaml, maybe a cut record
    shutil.rmtree(run_dir / "checkpoints")
    shutil.rmtree(run_dir / "model")
    (run_dir / "result.json").unlink()
    (run_dir / "metrics.jsonl").write_text('{"epoch": 0, "lr"')
    code, err = cli(capsys, "run", "--resume", run_dir)
    assert code == 0 and "no checkpoint yet" in err
    assert metrics_epochs(run_dir) == [0] and (run_dir / "result.json").is_file()


def test_orphaned_temporary_files_of_an_interrupted_write_are_deleted_at_start(capsys, run_dir):
    orphans = [run_dir / "checkpoints" / "last.pt.k3x_9q2a.tmp", run_dir / "result.json.abcd1234.tmp"]
    for path in orphans:
        path.write_bytes(b"half a checkpoint")
    kept = run_dir / "checkpoints" / "notes.tmp"  # not a name an atomic write uses
    kept.write_text("mine")
    code, err = cli(capsys, "run", "--resume", run_dir)
    assert code == 0 and "removed 2 temporary file(s)" in err
    assert not any(p.exists() for p in orphans) and kept.exists()


# ------------------------------------------------------------------------------------ 3. silent wrong results
def _edit_weights(run: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    path = run / "model" / "weights.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def _edit_arch(run: Path, edit) -> None:
    path = run / "model" / "arch.json"
    arch = json.loads(path.read_text())
    edit(arch)
    path.write_text(json.dumps(arch))


def _narrow_fc(state):
    state["fc.weight"] = state["fc.weight"][:, : state["fc.weight"].shape[1] // 2].contiguous()


def _five_classes(arch):
    arch["model"]["num_classes"] = 5


def _wrong_conv(state):
    state["conv1.weight"] = torch.zeros(16, 3, 5, 5)


def _other_architecture(arch):
    arch["model"]["name"] = "resnet32"


@pytest.mark.parametrize("damage, expected", [
    (("weights", _narrow_fc), "layer fc has [32, 3] (in, out) channels in the weights, arch.json records [64, 3]"),
    (("arch", _five_classes), "arch.json says num_classes 5"),
    (("weights", _wrong_conv), "tensor conv1.weight has shape (16, 3, 5, 5), the architecture needs (16, 3, 3, 3)"),
    (("weights", lambda state: state.pop("layer2.0.bn1.running_var")), "missing tensor layer2.0.bn1.running_var"),
    (("arch", _other_architecture), "missing tensor layer1.3.conv1.weight"),
    (("arch", lambda arch: arch["model"].update(name="resnet33")), "describes a model tailwise cannot build"),
    (("arch_text", "{not json"), "arch.json is not valid JSON"),
    (("weights_file", pickle.dumps({"fc.weight": [1.0]})), "is not a readable safetensors file"),
])
def test_load_model_refuses_what_does_not_fit_and_says_what(capsys, run_dir, damage, expected):
    kind, edit = damage
    if kind == "weights":
        _edit_weights(run_dir, edit)
    elif kind == "arch":
        _edit_arch(run_dir, edit)
    elif kind == "arch_text":
        (run_dir / "model" / "arch.json").write_text(edit)
    else:
        (run_dir / "model" / "weights.safetensors").write_bytes(edit)
    with pytest.raises(TailwiseError) as exc:
        load_model(run_dir)
    assert expected in str(exc.value)
    assert expected in refused(capsys, "eval", run_dir)


def test_load_model_of_an_untouched_run_still_loads(finished):
    model = load_model(finished)
    assert model(torch.zeros(2, 3, 8, 8)).shape == (2, 3) and len(model.classes) == 3


def _edit_config(run: Path, section: str, key: str, value) -> None:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg[section][key] = value
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


@pytest.mark.parametrize("section, key, value", [("train", "batch_size", 8), ("model", "name", "resnet32")])
def test_resume_refuses_a_config_edited_since_the_checkpoint(capsys, run_dir, section, key, value):
    before = (run_dir / "metrics.jsonl").read_text()
    original = yaml.safe_load((run_dir / "config.yaml").read_text())[section][key]
    _edit_config(run_dir, section, key, value)
    message = refused(capsys, "run", "--resume", run_dir)
    assert f"{section}.{key}: {original!r} when it was trained, {value!r} now" in message
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_resume_accepts_the_documented_harmless_overrides_edited_in_config_yaml(capsys, run_dir):
    _edit_config(run_dir, "run", "threads", 2)
    _edit_config(run_dir, "run", "tensorboard", False)
    code, _ = cli(capsys, "run", "--resume", run_dir, "run.progress=log")
    assert code == 0


def test_resume_of_a_checkpoint_without_config_record_that_does_not_fit(capsys, run_dir):
    # a checkpoint of an older version (no config record) under an edited model.name: the load error, as a message
    path = run_dir / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    del state["config"], state["config_sha256"]
    torch.save(state, path)
    _edit_config(run_dir, "model", "name", "resnet32")
    message = refused(capsys, "run", "--resume", run_dir)
    assert f"checkpoint {path} does not fit this run" in message and "Delete it" in message


def _tar_with(tmp_path: Path, extra: str) -> Path:
    tree = _image_tree(tmp_path / "tree", corrupt=False)
    out = tmp_path / "data.tar"
    with tarfile.open(out, "w") as tar:
        for p in sorted(tree.rglob("*.png")):
            tar.add(p, arcname="cifar10/" + p.relative_to(tree).as_posix())
        data = (tree / "train" / "a" / "0.png").read_bytes()
        info = tarfile.TarInfo(extra)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return out


@pytest.mark.parametrize("name", ["../cifar10/train/a/x.png", "/cifar10/train/a/y.png", "cifar10/train/../../z.png"])
def test_tar_members_that_escape_the_archive_are_refused(tmp_path, name):
    archive = _tar_with(tmp_path, name)
    with pytest.raises(DataError, match="points outside the archive") as exc:
        sources.read_image_folder(archive, "train")
    assert repr(name) in str(exc.value)


def test_tar_members_with_a_dot_slash_prefix_still_read(tmp_path):
    archive = _tar_with(tmp_path, "./cifar10/train/a/extra.png")
    assert len(sources.read_image_folder(archive, "train").labels) == 13


@pytest.fixture
def list_root(tmp_path):
    """An image root with two images, and one image beside (outside) it."""
    rng = np.random.default_rng(1)
    root = tmp_path / "images"
    for rel in ("a/0.png", "b/0.png"):
        save_image(root / rel, rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    save_image(tmp_path / "x.jpg", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    return root


@pytest.mark.parametrize("line", ["/etc/passwd 1", "../x.jpg 1"])
def test_list_file_paths_outside_the_root_are_refused(list_root, tmp_path, line):
    lst = tmp_path / "train.txt"
    lst.write_text(f"a/0.png 0\n{line}\nb/0.png 1\n")
    with pytest.raises(DataError, match=r"train.txt:2: image path .* points outside the image root"):
        sources.list_file_entries(lst, list_root)


def test_data_verify_reports_paths_outside_the_root_without_reading_them(capsys, list_root, tmp_path):
    lst = tmp_path / "train.txt"
    lst.write_text("a/0.png 0\n/etc/passwd 1\n../x.jpg 1\nb/0.png 1\n")
    report = verify_lists([lst], list_root)
    outside = report.by_kind()["outside root"]
    assert [(p.where, p.path) for p in outside] == [("train.txt:2", "/etc/passwd"), ("train.txt:3", "../x.jpg")]
    assert report.images == 2 and len(report.problems) == 2  # only the two images inside the root were opened
    capsys.readouterr()
    assert main(["data", "verify", "--list", str(lst), "--root", str(list_root)]) == 2
    assert "outside root: 2" in capsys.readouterr().out


def test_a_cache_manifest_edited_to_swap_class_names_is_rebuilt(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"an archive")
    classes = [f"class{i}" for i in range(6)]
    calls = []

    def build():
        calls.append(1)
        return sources.RawSplit(np.zeros((6, 3, 4, 4), np.uint8), np.arange(6), [f"f{i}" for i in range(6)], classes)

    cached_split(str(source), {"o": 1}, build, tmp_path / "cache", log=lambda m: None)
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["classes"][3], manifest["classes"][5] = manifest["classes"][5], manifest["classes"][3]
    (entry / "manifest.json").write_text(json.dumps(manifest))  # still valid JSON, arrays untouched
    messages = []
    again = cached_split(str(source), {"o": 1}, build, tmp_path / "cache", log=messages.append)
    assert len(calls) == 2 and any("rebuilding" in m for m in messages)
    assert again.classes == classes


# ------------------------------------------------------------------------ 4. a message and exit code 2, no traceback
@pytest.mark.parametrize("damage", ["cut_1000", "empty", "random"])
def test_resume_from_a_corrupt_checkpoint(capsys, run_dir, damage):
    path = run_dir / "checkpoints" / "last.pt"
    data = path.read_bytes()
    path.write_bytes({"cut_1000": data[:1000], "empty": b"", "random": np.random.default_rng(0).bytes(4000)}[damage])
    message = refused(capsys, "run", "--resume", run_dir)
    assert f"checkpoint {path} is corrupt" in message and "delete it to restart from scratch" in message


def test_resume_from_a_checkpoint_that_carries_code(capsys, run_dir, tmp_path):
    marker = tmp_path / "MARKER"
    path = run_dir / "checkpoints" / "last.pt"
    torch.save({"model": Marker(marker), "epoch": 1}, path)
    message = refused(capsys, "run", "--resume", run_dir)
    assert "refers to Python code (posix.mkdir)" in message and "nothing in it ran" in message
    assert "weights_only" not in message and "will likely succeed" not in message
    assert not marker.exists()


def test_resume_after_a_half_written_metrics_line(capsys, run_dir):
    # a kill while epoch 1's record was written: the resume (from the epoch-1 checkpoint) drops the cut line
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 1, "lr": 0.1, "tra')
    code, _ = cli(capsys, "run", "--resume", run_dir)
    assert code == 0 and metrics_epochs(run_dir) == [0]


def test_resume_with_a_damaged_metrics_line_that_is_not_the_last(capsys, run_dir):
    text = (run_dir / "metrics.jsonl").read_text()
    (run_dir / "metrics.jsonl").write_text("garbage\n" + text)
    assert "metrics.jsonl line 1 is not a JSON record" in refused(capsys, "run", "--resume", run_dir)


@pytest.mark.parametrize("where", ["file", "under_file", "proc"])
def test_out_that_cannot_be_a_run_directory(capsys, tmp_path, where):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = {"file": a_file, "under_file": a_file / "run", "proc": Path("/proc/tailwise-run")}[where]
    message = refused(capsys, "run", write_recipe(tmp_path / "r.yaml"), "--out", out)
    assert str(out) in message
    assert a_file.read_text() == "x" and (out == a_file or not out.exists())


@pytest.fixture
def non_utf8_lists(list_root, tmp_path):
    train = tmp_path / "train.txt"
    train.write_bytes(b"a/0.png 0\nb/0.png 1\nb/caf\xe9.png 1\n")
    test = tmp_path / "test.txt"
    test.write_text("a/0.png 0\nb/0.png 1\n")
    return [f"data.root={list_root}", f"data.train_list={train}", f"data.test_list={test}", "data.image_size=8",
            "data.cache=false", "data.imbalance_ratio=null", "data.val=test"]


def test_non_utf8_list_file_in_data_inspect_and_run(capsys, non_utf8_lists, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {**TINY, "data": {"name": "listfile"}})
    message = refused(capsys, "data", "inspect", recipe, *non_utf8_lists)
    assert "train.txt:3: not UTF-8 text (byte 0xe9)" in message
    assert "train.txt:3: not UTF-8" in refused(capsys, "run", recipe, *non_utf8_lists, "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("seed, expected", [
    ("1.0e+300", "run.seed: expected int, got 1e+300 (float)"),
    ("99999999999999999999", "run.seed: 99999999999999999999 is out of range; must be >= 0 and <= 2**64 - 1"),
    ("-1", "run.seed: -1 is out of range; must be >= 0 and <= 2**64 - 1")])
def test_seeds_outside_the_range_of_a_seed(capsys, tmp_path, seed, expected):
    out = tmp_path / "out"
    expected = expected.replace("2**64 - 1", str(2**64 - 1))
    assert expected in refused(capsys, "run", write_recipe(tmp_path / "r.yaml"), f"run.seed={seed}", "--out", out)
    assert not out.exists()


def test_the_largest_seed_runs(capsys, tmp_path):
    seeds = [f"run.seed={2**64 - 1}", f"data.split_seed={2**64 - 1}"]
    code, _ = cli(capsys, "run", write_recipe(tmp_path / "r.yaml"), *seeds, "--out", tmp_path / "out")
    assert code == 0 and json.loads((tmp_path / "out" / "result.json").read_text())["seed"] == 2**64 - 1


# --------------------------------------------------------------------------------------- 5. config validation
def test_exponent_floats_on_the_command_line_and_in_yaml(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {name: synthetic}\ntrain: {lr: 5e-4, weight_decay: 1e-4, epochs: 1e2}\n")
    cfg = load_config(recipe, ["train.min_lr=1e-6", "data.synthetic_per_class=1e3"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.epochs) == (5e-4, 1e-4, 100)
    assert cfg.train.min_lr == 1e-6 and cfg.data.synthetic_per_class == 1000


@pytest.mark.parametrize("overrides", [["train.lr=.nan"], ["train.lr=.inf"], ["train.weight_decay=-.inf"],
                                       ["data.mean=[0.5, .nan, 0.5]"], ["loss.name=focal", "loss.gamma=.inf"],
                                       ["method.name=more", "method.amplitude=.nan"]])
def test_nan_and_inf_are_refused_before_anything_runs(overrides):
    key = overrides[-1].split("=")[0].replace("data.mean", "data.mean[1]")
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: expected a finite number, got -?(nan|inf)"):
        load_config(None, ["data.name=synthetic", *overrides])


def test_duplicate_keys_in_a_recipe_are_refused(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {name: synthetic}\ntrain:\n  lr: 0.1\n  epochs: 2\n  lr: 0.5\n")
    message = refused(capsys, "run", recipe, "--out", tmp_path / "out")
    assert "found the key 'lr' twice" in message and "line 5" in message
    assert not (tmp_path / "out").exists()


def _nan_from_step(monkeypatch, first_bad_step: int) -> None:
    """The training loss becomes NaN from optimizer step ``first_bad_step`` on (3 steps per epoch here)."""
    from tailwise.engine import trainer

    build, calls = trainer.build_loss, []

    def build_nan(*args, **kwargs):
        loss = build(*args, **kwargs)
        forward = loss.forward

        def nan_forward(logits, y):
            calls.append(1)
            return forward(logits, y) * (math.nan if len(calls) > first_bad_step else 1.0)

        loss.forward = nan_forward
        return loss

    monkeypatch.setattr(trainer, "build_loss", build_nan)


@pytest.mark.parametrize("first_bad_step, kept", [(0, False), (3, True)])
def test_nan_stop_mentions_a_kept_checkpoint_only_when_one_exists(capsys, monkeypatch, tmp_path, first_bad_step, kept):
    _nan_from_step(monkeypatch, first_bad_step)
    out = tmp_path / "out"
    message = refused(capsys, "run", write_recipe(tmp_path / "r.yaml"), "train.epochs=2", "--out", out)
    assert "the training loss became nan" in message
    if kept:
        assert f"The last good checkpoint is kept in {out / 'checkpoints'}" in message
        assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    else:
        assert "No epoch had finished, so there is no checkpoint to keep" in message
        assert "kept" not in message and not out.exists()
