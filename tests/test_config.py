"""Config: YAML + overrides, rejection of unknown keys, wrong types and impossible values; the CLI's exit codes."""
from __future__ import annotations

import pytest
import yaml

from tailwise.config import apply_overrides, config_from_dict, dotted_keys, dump_config, load_config
from tailwise.errors import ConfigError
from tailwise.recipes import list_recipes

SYNTH = {"data": {"name": "synthetic"}}


def test_defaults_are_the_ldam_drw_cifar_recipe():
    cfg = config_from_dict(SYNTH)
    t = cfg.train
    assert (t.epochs, t.batch_size, t.lr, t.momentum, t.weight_decay, t.warmup_epochs) == (200, 128, 0.1, 0.9, 2e-4, 5)
    assert (t.schedule, t.milestones, t.lr_decay) == ("step", [160, 180], 0.01)
    assert cfg.method == {"name": "none"}


def test_overrides_parse_yaml_values():
    raw = apply_overrides({}, ["data.name=synthetic", "train.epochs=7", "train.milestones=[3, 5]", "data.imbalance_ratio=0.02",
                               "run.out=null", "train.amp=true"])
    cfg = config_from_dict(raw)
    assert cfg.train.epochs == 7 and cfg.train.milestones == [3, 5] and cfg.train.precision == "auto" and cfg.train.amp is None
    assert cfg.data.imbalance_ratio == 0.02 and cfg.run.out is None


def test_dump_and_reload_roundtrip():
    cfg = config_from_dict(apply_overrides({}, ["data.name=synthetic", "loss.name=ldam_drw", "loss.drw_epoch=3"]))
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize("override, message", [
    ("train.foo=1", "unknown key train.foo"),
    ("bogus.x=1", "unknown section 'bogus'"),
    ("train.lr=abc", "train.lr: expected float"),
    ("train.epochs=1.5", "train.epochs: expected int"),
    ("train.epochs=0", "train.epochs: 0 is out of range"),
    ("train.lr=0", "train.lr: 0.0 is out of range"),
    ("train.momentum=1.5", "train.momentum: 1.5 is out of range"),
    ("data.val=bogus", "allowed: holdout, test, train"),
    ("loss.name=hinge", "loss.name: 'hinge' is not allowed"),
    ("model.name=vgg", "model.name: 'vgg' is not allowed"),
    ("method.name=magic", "method.name: 'magic' is not allowed"),
    ("loss.tau=2", "loss: loss 'ce': unknown keyword"),
    ("train.milestones=[180, 160]", "must be increasing"),
    ("data.few_threshold=200", "must not exceed"),
    ("train.flip", "must look like section.key=value"),
])
def test_bad_values_are_rejected_with_the_key_path(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        config_from_dict(apply_overrides({"data": {"name": "synthetic"}}, [override]))


def test_root_required_for_real_datasets():
    with pytest.raises(ConfigError, match="data.root is required"):
        config_from_dict({"data": {"name": "cifar10-lt"}})


@pytest.mark.parametrize("name", list_recipes())
def test_bundled_recipes_validate(name):
    from tailwise.demo import demo_overrides

    cfg = load_config(name, demo_overrides() if name == "demo" else [])
    assert cfg.model.name in {"resnet20", "resnet32", "resnet50"}


def test_dotted_keys_flattens_nested_mappings():
    tree = {"train": {"lr": 0.1, "milestones": [160, 180]}, "method": {"name": "none"}, "top": 1}
    assert dotted_keys(tree) == {"train.lr": 0.1, "train.milestones": [160, 180], "method.name": "none", "top": 1}
    assert dotted_keys({"val": {"group_sizes": {"few": 3}}}, sep="/") == {"val/group_sizes/few": 3}
