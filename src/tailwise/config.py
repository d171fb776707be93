"""Typed run configuration: six sections of dataclasses, loaded from a YAML recipe plus ``key=value`` overrides.

Unknown keys, wrong types and impossible values raise :class:`ConfigError` naming the key path and what is
allowed, before anything runs. ``method`` holds the method name plus that method's own keys, which the method's
options dataclass validates (see :mod:`tailwise.methods`).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError
from .losses import list_losses
from .methods import validate_method_config
from .options import bounded, build_dataclass, choice


@dataclass
class DataConfig:
    name: str = choice("cifar10-lt", "cifar100-lt", "imagefolder", "listfile", "synthetic", default="cifar10-lt")
    root: str | None = None
    imbalance_ratio: float | None = bounded(100.0, 0.0, low_open=True)  # ratio (100) or factor (0.01); null = as is
    profile: str = choice("exp", "step", default="exp")
    val: str = choice("holdout", "test", "train", default="holdout")
    val_per_class: int = bounded(50, 1)
    split_seed: int = bounded(0, 0, 2**64 - 1)
    image_size: int | None = bounded(None, 8)
    num_classes: int | None = bounded(None, 2)
    train_split: str = "train"
    test_split: str = "test"
    train_list: str | None = None
    val_list: str | None = None
    test_list: str | None = None
    cache: bool = True
    cache_dir: str | None = None
    many_threshold: int = bounded(100, 0)
    few_threshold: int = bounded(20, 0)
    group_fallback: str = choice("terciles", "none", default="terciles")
    synthetic_per_class: int = bounded(500, 1)
    synthetic_test_per_class: int = bounded(100, 1)
    mean: list[float] | None = None  # per-channel, in [0, 1]; null = computed from the training subset
    std: list[float] | None = None
    crop_padding: int = bounded(4, 0)
    flip: bool = True
    cutout: int = bounded(0, 0)
    policy: str = choice("none", "randaugment", "autoaugment", default="none")
    # streaming (list files): decode images from disk in run.workers processes instead of holding them in memory.
    # auto: stream list files whose image_size is unset or > 64; the streamed path normalises with data.mean/std or
    # the ImageNet constants, and trains with train_transform (crop_padding does not apply, cutout is unavailable)
    stream: bool | str = choice("auto", True, False, default="auto")
    train_transform: str = choice("imagenet", default="imagenet")  # RandomResizedCrop(image_size) + flip
    color_jitter: float = bounded(0.0, 0.0)  # streamed training: ColorJitter brightness = contrast = saturation

    @property
    def streamed(self) -> bool:
        """Whether the splits are file-backed (streamed from disk) rather than decoded into memory."""
        if self.stream == "auto":
            return self.name == "listfile" and (self.image_size is None or self.image_size > 64)
        return bool(self.stream)


@dataclass
class ModelConfig:
    name: str = "resnet32"
    normed_head: bool | None = None  # null = whatever the loss needs (LDAM: normalised linear head)


@dataclass
class LossConfig:
    name: str = choice(*list_losses(), default="ce")
    gamma: float | None = None
    beta: float | None = None
    base: str | None = None
    tau: float | None = None
    mode: str | None = None
    max_m: float | None = None
    s: float | None = None
    drw_epoch: int | None = None

    def kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "name" and getattr(self, f.name) is not None}


@dataclass
class TrainConfig:
    epochs: int = bounded(200, 1)
    batch_size: int = bounded(128, 1)
    eval_batch_size: int = bounded(512, 1)
    lr: float = bounded(0.1, 0.0, low_open=True)
    momentum: float = bounded(0.9, 0.0, 1.0)
    nesterov: bool = False
    weight_decay: float = bounded(2.0e-4, 0.0)
    warmup_epochs: int = bounded(5, 0)
    schedule: str = choice("step", "cosine", "constant", default="step")
    milestones: list[int] = field(default_factory=lambda: [160, 180])
    lr_decay: float = bounded(0.01, 0.0, 1.0, low_open=True)  # step factor per milestone (x0.01, x0.0001)
    min_lr: float = bounded(0.0, 0.0)
    sampler: str = choice("instance", "class_balanced", "sqrt", default="instance")
    precision: str = choice("fp32", "bf16", "fp16", "auto", default="fp32")  # see tailwise.engine.precision
    amp: bool | None = None  # the old name: true loads as precision auto, false as fp32
    channels_last: bool = True  # NHWC: ~1.5x faster ResNet training on CPU (oneDNN)
    eval_test_every_epoch: bool = False
    grad_clip: float | None = bounded(None, 0.0, low_open=True)

    def __post_init__(self):
        if self.amp is not None:  # an old config: translate, so the resolved config names one setting
            if self.precision != "fp32":
                raise ConfigError("train.amp is the old name of train.precision; set only train.precision")
            self.precision, self.amp = ("auto" if self.amp else "fp32"), None


@dataclass
class RunConfig:
    seed: int = bounded(0, 0, 2**64 - 1)  # the range torch.manual_seed takes
    device: str = "auto"
    out: str | None = None
    workers: int = bounded(0, 0)
    threads: int | None = bounded(None, 1)
    tensorboard: bool = False
    progress: str = choice("auto", "bar", "log", "none", default="auto")
    keep_best: bool = True
    keep_checkpoints: list[int] = field(default_factory=list)  # epochs whose checkpoint is kept as epoch_NNN.pt


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    method: dict = field(default_factory=lambda: {"name": "none"})
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig, "train": TrainConfig, "run": RunConfig}
# the keys `--resume` may change: how a run executes, not what it computes
RESUME_OVERRIDES = ("run.threads", "run.progress", "run.tensorboard", "run.keep_checkpoints")


def dotted_keys(tree: dict, prefix: str = "", sep: str = ".") -> dict:
    """A nested mapping flattened to joined keys: ``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}``; ``sep``
    joins the keys (``"/"`` for TensorBoard tags), ``prefix`` starts every key. Values other than mappings,
    lists included, are kept as they are."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(dotted_keys(value, f"{prefix}{key}{sep}", sep))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ------------------------------------------------------------------------------------------------- validation
def _check_streaming(data: DataConfig) -> None:
    """Keys of the streamed path must not be set where they cannot apply, and vice versa."""
    if data.stream is True and data.name != "listfile":
        raise ConfigError(f"data.stream=true needs data.name=listfile (got {data.name}); other datasets are decoded "
                          "into memory: use data.stream=auto or false")
    if data.streamed and data.cutout > 0:
        raise ConfigError("data.cutout is not available for streamed data (data.stream); set data.cutout=0 or "
                          "data.stream=false to decode the images into memory")
    if not data.streamed and data.color_jitter > 0:
        raise ConfigError("data.color_jitter applies to streamed data only; set data.stream=true (list files) or "
                          "data.color_jitter=0")


def _check_consistency(cfg: Config) -> None:
    if cfg.data.few_threshold > cfg.data.many_threshold:
        raise ConfigError(f"data.few_threshold ({cfg.data.few_threshold}) must not exceed data.many_threshold "
                          f"({cfg.data.many_threshold})")
    if cfg.data.name in ("listfile",) and cfg.data.root is None:
        raise ConfigError("data.root is required for data.name=listfile (the image root)")
    if cfg.data.name in ("cifar10-lt", "cifar100-lt", "imagefolder") and cfg.data.root is None:
        raise ConfigError(f"data.root is required for data.name={cfg.data.name} "
                          "(a CIFAR pickle folder, or an image-folder tree or .tar.gz of one)")
    _check_streaming(cfg.data)
    if sorted(cfg.train.milestones) != cfg.train.milestones:
        raise ConfigError(f"train.milestones must be increasing, got {cfg.train.milestones}")
    for key in ("mean", "std"):
        value = getattr(cfg.data, key)
        if value is not None and len(value) != 3:
            raise ConfigError(f"data.{key} must have 3 values (one per RGB channel), got {value}")
    if any(not 1 <= e <= cfg.train.epochs for e in cfg.run.keep_checkpoints):
        raise ConfigError(f"run.keep_checkpoints: {cfg.run.keep_checkpoints} must be epochs in 1..train.epochs "
                          f"({cfg.train.epochs})")
    if cfg.run.device not in ("auto", "cpu") and not cfg.run.device.startswith("cuda"):
        raise ConfigError(f"run.device: {cfg.run.device!r} is not allowed; allowed: auto, cpu, cuda, cuda:N")
    from .losses import build_loss
    from .models import list_models

    try:  # the loss validates its own keys and values; dummy counts suffice for that
        build_loss(cfg.loss.name, [10, 1], **cfg.loss.kwargs())
    except ValueError as exc:
        raise ConfigError(f"loss: {exc}") from None

    if cfg.model.name not in list_models():
        raise ConfigError(f"model.name: {cfg.model.name!r} is not allowed; allowed: {', '.join(list_models())}")


def config_from_dict(raw: dict) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"a recipe must be a mapping of the sections {', '.join(['data', 'model', 'loss', 'method', 'train', 'run'])}")
    unknown = sorted(set(raw) - set(SECTIONS) - {"method"})
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r}; allowed sections: data, model, loss, method, train, run")
    sections = {name: build_dataclass(cls, raw.get(name), name) for name, cls in SECTIONS.items()}
    cfg = Config(method=raw.get("method") or {"name": "none"}, **sections)
    _check_consistency(cfg)
    cfg.method = validate_method_config(cfg.method, cfg)  # once, against the rest of the config
    return cfg


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no object tags), plus: ``1e6`` and ``5e-4`` are floats, as in YAML 1.2 (YAML 1.1 reads
    an exponent without a dot and sign as a string), and a mapping that repeats a key is an error instead of the
    last value silently winning."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` entries may be overridden by explicit keys
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):  # unhashable: the base constructor reports it
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError("while reading a mapping", node.start_mark,
                                                        f"found the key {key!r} twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"))


def _parse_yaml(text: str):
    """Parse recipe or override text with :class:`_RecipeLoader`; raises ``yaml.YAMLError``."""
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 -- a SafeLoader subclass


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw recipe dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.epochs=20)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override {item!r}: the key must be section.key (e.g. train.lr=0.05)")
        try:
            value = _parse_yaml(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: cannot parse value: {exc}") from None
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return raw


def load_recipe(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        from .recipes import find_recipe

        found = find_recipe(str(path))
        if found is None:
            raise ConfigError(f"recipe {path} not found (a YAML file, or a bundled name from `tailwise recipes`)")
        path = found
    try:
        raw = _parse_yaml(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections, got {type(raw).__name__}")
    return raw


def load_config(recipe: str | Path | None, overrides: list[str] = ()) -> Config:
    raw = load_recipe(recipe) if recipe is not None else {}
    return config_from_dict(apply_overrides(raw, list(overrides)))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
