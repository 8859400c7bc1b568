"""Typed, frozen run configs: defaults, then a YAML file, then command-line values; saved beside every output."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, TypeVar

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

    from finegrain.embed.store import atomic_write_text

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
