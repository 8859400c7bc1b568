"""Typed, frozen run configs: defaults, then a YAML file, then command-line values; saved beside every output."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, TypeVar

from finegrain.atomic import atomic_write_text
from finegrain.errors import FinegrainError

C = TypeVar("C")


def build_config(cls: type[C], *, yaml_path: str | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Defaults of `cls` <- YAML file <- overrides (None values in overrides are ignored)."""
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    if yaml_path:
        import yaml

        try:
            with open(yaml_path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise FinegrainError(f"cannot read config {yaml_path}: {e}") from None
        if not isinstance(loaded, dict):
            raise FinegrainError(f"config {yaml_path} must be a mapping of option: value")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(set(values) - names)
    if unknown:
        raise FinegrainError(
            f"unknown option(s) {', '.join(unknown)} for {cls.__name__}; valid: {', '.join(sorted(names))}"
        )
    return cls(**values)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` strings -> dict, values parsed as YAML scalars (so 10 is an int, true a bool)."""
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise FinegrainError(f"override {item!r} must look like key=value")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = yaml.safe_load(v)
    return out


def config_dict(cfg: Any) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def save_config(cfg: Any, out_dir: str, name: str = "config.yaml", extra: dict | None = None) -> str:
    import yaml

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    body = {**config_dict(cfg), **(extra or {})}
    atomic_write_text(path, yaml.safe_dump(body, sort_keys=False))
    return path


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    data: str = ""
    out: str = ""
    backbone: str = "efficientnet_lite0"
    checkpoint: str | None = None
    pooling: tuple[str, ...] = ("gem", "gap")
    flip: bool = False
    image_size: int | None = None  # None: the weights' own resolution
    crop_pct: float | None = None  # None: the weights' own crop
    batch_size: int = 32
    workers: int | None = None
    precision: str = "auto"
    channels_last: bool = True
    device: str = "cpu"
    overwrite: bool = False


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    store: str = ""
    out: str | None = None
    classifier: str = "probe"  # probe | knn | ncm
    pooling: str | None = None  # None: the store's first pooling
    norm: str = "l2"
    k: int = 10
    metric: str = "cosine"
    weights: str = "temperature"
    temperature: float = 0.07
    train_split: str = "train"
    test_split: str | None = None
    test_size: float = 0.2
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    data: str = ""
    out: str = ""
    backbone: str = "efficientnet_lite0"
    checkpoint: str | None = None
    regime: str = "auto"  # auto | head | last:K | full | scratch (auto: from images a class and the time budget)
    pretrained: bool = True  # False: random init, for tests and ablations (scratch is always random)
    pooling: str = "gap"
    drop_rate: float = 0.2
    image_size: int | None = None  # None: the weights' own resolution
    crop_pct: float | None = None  # eval center-crop fraction (1.0: the whole short side); None: the weights' own
    feature_norm: bool = False  # L2-normalize the pooled features (scaled to sqrt(D)) before the head
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.01  # the head's learning rate; the backbone's is lr x backbone_lr_scale
    backbone_lr_scale: float = 0.1
    layer_decay: float | None = None
    optimizer: str = "sgd"  # sgd | adamw
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4  # never on norms and biases
    schedule: str = "cosine"  # cosine | step | constant
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    loss: str = "ce"  # ce | focal | cb | ldam | logit-adjusted | balanced-softmax (long tail: counts come from train)
    loss_options: dict | None = None  # e.g. {beta: 0.9999} for cb, {max_margin: 0.5, s: 30, drw_start: 0.8} for ldam
    sampler: str = "instance"  # instance | class-balanced | sqrt | progressive
    normed_head: bool = False  # cosine classifier (NormedLinear), as LDAM expects
    shot_thresholds: tuple[int, int] = (100, 20)  # many-shot: > first; few-shot: < second (Kang et al., 2020)
    augment: str = "crop-flip"  # none | crop-flip | autoaugment | randaugment | trivialaugment
    crop_scale: tuple[float, float] = (0.25, 1.0)  # RandomResizedCrop area range, as fractions of the image
    mixup: float = 0.0
    cutmix: float = 0.0
    ema_decay: float | None = None
    clip_grad: float | None = None
    freeze_bn: bool = False
    cache_views: int = 0  # >0: run the frozen trunk once over this many augmented views per image (head, last:K)
    head_init: str = "msra"  # msra | probe: fit the new head on frozen features first (LP-FT, Kumar et al. 2022)
    val_fraction: float = 0.1  # carved from train (stratified, seeded) when the data has no val split
    early_stop: int | None = None  # patience in epochs on validation top-1
    precision: str = "fp32"  # fp32 | bf16 (CPU autocast) | amp (CUDA autocast); bf16 does not speed CPU training
    channels_last: bool = True
    workers: int | None = None
    device: str = "cpu"
    seed: int = 0
    resume: bool = False
    max_steps: int | None = None  # stop after this many optimizer steps (tests, budgets); the schedule is unchanged
    time_budget_min: float | None = None  # stop at the end of the epoch that passes this many minutes
