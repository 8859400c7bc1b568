"""Typed, frozen run configs: defaults, then a YAML file, then command-line values; saved beside every output.

`build_config` checks every value against its field's type annotation and the simple rules in RULES (ranges), and
against the choices its caller gives (the CLI passes the registries' names), with one error format:
`epochs must be an integer >= 1, got 'abc'`.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from finegrain.atomic import atomic_write_text
from finegrain.errors import FinegrainError

C = TypeVar("C")

# name -> (low, low inclusive, high, high inclusive); None: unbounded. Shared by every config that has the field.
RULES: dict[str, tuple[float | None, bool, float | None, bool]] = {
    "epochs": (1, True, None, False),
    "batch_size": (1, True, None, False),
    "k": (1, True, None, False),
    "image_size": (8, True, None, False),
    "workers": (0, True, None, False),
    "seed": (0, True, None, False),
    "cache_views": (0, True, None, False),
    "max_steps": (1, True, None, False),
    "early_stop": (1, True, None, False),
    "bootstrap": (0, True, None, False),
    "many": (0, True, None, False),
    "gallery": (0, True, None, False),
    "n": (1, True, None, False),
    "head_epochs": (0, True, None, False),
    "max_images": (1, True, None, False),
    "size": (8, True, None, False),
    "head_lr": (0, False, None, False),
    "threshold": (0, False, 1, True),
    "few": (0, True, None, False),
    "lr": (0, False, None, False),
    "temperature": (0, False, None, False),
    "time_budget_min": (0, False, None, False),
    "budget_min": (0, False, None, False),
    "clip_grad": (0, False, None, False),
    "backbone_lr_scale": (0, True, None, False),
    "weight_decay": (0, True, None, False),
    "warmup_epochs": (0, True, None, False),
    "mixup": (0, True, None, False),
    "cutmix": (0, True, None, False),
    "manifold_mixup": (0, True, None, False),
    "crop_pct": (0, False, 1, True),
    "layer_decay": (0, False, 1, True),
    "val_fraction": (0, True, 1, False),
    "test_size": (0, False, 1, False),
    "drop_rate": (0, True, 1, False),
    "label_smoothing": (0, True, 1, False),
    "momentum": (0, True, 1, False),
    "ema_decay": (0, False, 1, False),
}

_NONE = type(None)


def option(default: Any, help: str = "", *, choices: Iterable[str] | None = None, flag: str | None = None,
           words: bool = False):  # fmt: skip
    """A config field declared once: its default, the help the command line shows, its valid names (checked by
    `build_config` from every source: command line, YAML, Python keywords), for a bool the flag that flips it
    (`--no-finetune`), for a tuple `words`: given as several words (`--query a.jpg b.jpg`) rather than a comma list.
    The command line is generated from these (cli/options.py)."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "flag": flag, "words": words}
    return dataclasses.field(default=default, metadata=meta)


def config_choices(cls: type) -> dict[str, tuple[str, ...]]:
    """{field: valid names} declared with `option(choices=...)`."""
    return {f.name: f.metadata["choices"] for f in dataclasses.fields(cls) if f.metadata.get("choices")}


def build_config(
    cls: type[C],
    *,
    yaml_path: str | None = None,
    overrides: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
    choices: Mapping[str, Iterable[str]] | None = None,
) -> C:
    """`defaults` (the caller's, over the class's) <- YAML file <- overrides (None values in overrides are ignored).

    Every value is checked and coerced by its field's annotation (an int where a float is expected becomes a float,
    a list a tuple) and RULES; `choices` maps a field to its valid names (`last:K` accepts `last:<anything>`, the
    argument being checked where it is parsed). Any problem raises FinegrainError with a one-line reason.
    """
    values: dict[str, Any] = dict(defaults or {})
    names = {f.name for f in dataclasses.fields(cls)}
    if yaml_path:
        values.update(read_yaml(yaml_path))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(set(values) - names)
    if unknown:
        raise FinegrainError(
            f"unknown option(s) {', '.join(unknown)} for {cls.__name__}; valid: {', '.join(sorted(names))}"
        )
    hints = typing.get_type_hints(cls)
    checked = {k: check_value(k, v, hints[k], choices=(choices or {}).get(k)) for k, v in values.items()}
    try:
        return cls(**checked)
    except TypeError as e:  # a required field left unset
        raise FinegrainError(f"{cls.__name__}: {e}") from None


def read_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise FinegrainError(f"cannot read config {path}: {' '.join(str(e).split())}") from None
    if not isinstance(loaded, dict):
        raise FinegrainError(f"config {path} must be a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in loaded.items()}


def check_value(name: str, value: Any, annotation: Any, *, choices: Iterable[str] | None = None) -> Any:
    """`value` coerced to `annotation`, within RULES[name] and `choices`; else FinegrainError in the one format."""
    allowed = _union(annotation)
    if value is None and _NONE in allowed:
        return None
    for tp in (t for t in allowed if t is not _NONE):
        ok, out = _coerce(value, tp)
        if ok and _in_range(name, out) and _in_choices(out, choices):
            return out
    raise FinegrainError(f"{name} must be {describe_type(name, annotation, choices)}, got {_show(value)}")


def describe_type(name: str, annotation: Any, choices: Iterable[str] | None = None) -> str:
    """`an integer >= 1`, `a number in (0, 1] or null`, `one of ce, focal`: what a field accepts, in words."""
    allowed = _union(annotation)
    words = [_describe(tp) for tp in allowed if tp is not _NONE]
    text = " or ".join(words)
    if choices is not None:
        text = f"one of {', '.join(choices)}"
    elif name in RULES and any(tp in (int, float) for tp in allowed):
        text += " " + _rule_text(RULES[name])
    return text + (" or null" if _NONE in allowed else "")


def _union(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).split(' ', 1)[1]}s"
        return f"a list of {len(args)} {_describe(args[0]).split(' ', 1)[1]}s"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}.get(
        origin or tp, str(tp)
    )


def _rule_text(rule: tuple[float | None, bool, float | None, bool]) -> str:
    lo, lo_in, hi, hi_in = rule
    if hi is None:
        return f"{'>=' if lo_in else '>'} {lo:g}"
    return f"in {'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"


def _in_range(name: str, value: Any) -> bool:
    if name not in RULES or isinstance(value, bool) or not isinstance(value, int | float):
        return True
    lo, lo_in, hi, hi_in = RULES[name]
    above = lo is None or (value >= lo if lo_in else value > lo)
    below = hi is None or (value <= hi if hi_in else value < hi)
    return above and below


def _in_choices(value: Any, choices: Iterable[str] | None) -> bool:
    if choices is None or not isinstance(value, str):
        return True
    kind, sep, _ = value.partition(":")
    with_argument = {c.split(":", 1)[0] for c in choices if ":" in c}
    return kind in with_argument if sep else value in set(choices)


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(True, value as tp) when `value` reads as `tp`, else (False, None). bool is never taken for a number."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        return _coerce_tuple(value, args)
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return True, value.lower() in ("true", "yes")
        return isinstance(value, bool), value
    if isinstance(value, bool):
        return False, None
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        if isinstance(value, str):
            try:
                return True, int(value.strip())
            except ValueError:
                return False, None
        return isinstance(value, int), value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                return False, None
        return (True, float(value)) if isinstance(value, int | float) and value == value else (False, None)
    if tp is str:
        return (True, str(value)) if isinstance(value, str | int | float) else (False, None)
    if (origin or tp) is dict:
        return isinstance(value, dict), value
    return True, value


def _coerce_tuple(value: Any, args: tuple[Any, ...]) -> tuple[bool, Any]:
    if isinstance(value, str):
        value = [t.strip() for t in value.split(",") if t.strip()]
    if not isinstance(value, list | tuple):
        return False, None
    item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
    if len(item_types) != len(value):
        return False, None
    out = []
    for v, tp in zip(value, item_types):
        ok, c = _coerce(v, tp)
        if not ok:
            return False, None
        out.append(c)
    return True, tuple(out)


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` strings -> dict, values parsed as YAML scalars (so 10 is an int, true a bool)."""
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise FinegrainError(f"override {item!r} must look like key=value")
        k, v = item.split("=", 1)
        try:
            out[k.strip().replace("-", "_")] = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise FinegrainError(f"cannot read {item!r} as key=value: {' '.join(str(e).split())}") from None
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


DEVICE_HELP = "auto (cuda when available, else cpu), cpu, cuda, cuda:N"


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    """`finegrain extract`'s options, each declared once (the command line is generated: cli/options.py)."""

    data: str = option("", "folder (root/class/img or root/{train,val,test}/class/img) or CSV manifest")
    out: str = option("", "store folder")
    backbone: str = option("efficientnet_lite0", "efficientnet_lite0 (offline), any timm name, hf-hub:..., or a "
                           "finegrain model/run folder (its trained trunk and preprocessing)")  # fmt: skip
    checkpoint: str | None = option(None, "local .safetensors/.pth weights for the backbone (a finegrain model's too)")
    pooling: tuple[str, ...] = option(("gem", "gap"), "comma list of gap, gem, gem:P, max, stages")
    flip: bool = option(False, "average with the mirrored image (2x compute)")
    zoom: bool = option(False, "look closer: a second pass on the box the first pass attends to, decoded at twice "
                        "the side; each pooling stores both descriptors (2x compute)")  # fmt: skip
    image_size: int | None = option(None, "input resolution (default: the weights' own)")
    crop_pct: float | None = option(None, "center-crop fraction (default: the weights' own)")
    batch_size: int = option(32, "images a batch")
    workers: int | None = option(None, "decoding processes (default: cores / 2)")
    precision: str = option("auto", "auto: bf16 where the CPU has it, else fp32", choices=("auto", "fp32", "bf16"))
    channels_last: bool = option(True, "keep the NCHW memory layout", flag="--no-channels-last")
    device: str = option("auto", DEVICE_HELP)
    overwrite: bool = option(False, "replace a store made with other settings")
    runtime: str = option("auto", "auto: the fastest engine that keeps accuracy, measured here (torch or ONNX "
                          "Runtime)", choices=("auto", "torch", "onnx"))  # fmt: skip


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """`finegrain knn`, `ncm` and `probe`'s options on a feature store, each declared once (each command shows the
    ones it reads: cli/main.py)."""

    store: str = option("", "a feature store made by `finegrain extract`")
    out: str | None = option(None, "output folder (default: STORE/eval/<classifier>-<norm>-<pooling>)")
    classifier: str = option("probe", "set by the command", choices=("probe", "knn", "ncm"))
    pooling: str | None = option(None, "which stored pooling to use (default: the first one extracted)")
    norm: str = option("l2", "none | l2 | cl2n | pca-whiten[:K] (fitted on the train split)",
                       choices=("none", "l2", "cl2n", "pca-whiten", "pca-whiten:K"))  # fmt: skip
    k: int = option(10, "neighbours (1 = 1-NN)")
    metric: str = option("cosine", "", choices=("cosine", "l2"))
    weights: str = option("temperature", "how neighbours vote", choices=("temperature", "distance", "uniform"))
    temperature: float = option(0.07, "of the temperature vote")
    train_split: str = option("train", "the split the classifier learns from")
    test_split: str | None = option(None, "default: test, else val; a flat folder gets a seeded holdout")
    test_size: float = option(0.2, "the seeded holdout of a flat folder")
    seed: int = option(0, "fixes the holdout and the probe's validation carve")
    solver: str = option("auto", "lbfgs: full batch in memory; stream: mini-batches over the memory-mapped store "
                         "(DDP under torchrun); auto: stream above 2 GiB of training features",
                         choices=("auto", "lbfgs", "stream"))  # fmt: skip


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """`finegrain evaluate`'s options, each declared once (the command line is generated: cli/options.py);
    `extra` is the caller's (recorded in metrics.json), not an option."""

    models: tuple[str, ...] = option((), "run or model folder(s): several are averaged as an ensemble")
    data: str = option("", "the labelled dataset folder or CSV manifest (its --split is evaluated)")
    out: str | None = option(None, "output folder (default: MODEL/eval-<split>-<tta>)")
    split: str = option("test", "the split to score (a flat folder: the run's recorded test)")
    tta: str = option("none", "none | flip | 5crop | 10crop, combined with + (e.g. flip+5crop)")
    sizes: tuple[int, ...] = option((), "test resolutions to average, e.g. 224,256,288 (multi-scale)")
    sweep: tuple[int, ...] = option((), "evaluate at each of these test resolutions in turn, e.g. 224,288 (one "
                                    "folder each under --out, and sweep.json)")  # fmt: skip
    batch_size: int = option(32, "images a batch")
    workers: int | None = option(None, "decoding processes (default: cores / 2)")
    precision: str = option("auto", "auto: bf16 where the CPU has it, else fp32", choices=("auto", "fp32", "bf16"))
    device: str = option("auto", DEVICE_HELP)
    runtime: str = option("auto", "auto: the fastest engine that keeps accuracy, measured here (torch or ONNX "
                          "Runtime)", choices=("auto", "torch", "onnx"))  # fmt: skip
    bootstrap: int = option(1000, "resamples for the confidence intervals (0: none)")
    seed: int = option(0, "of the bootstrap resamples")
    many: int = option(100, "many-shot: more than this many training images")
    few: int = option(20, "few-shot: fewer than this many training images")
    allow_train_images: bool = option(False, "score images the model trained or validated on (its run's "
                                      "splits.json); marked in metrics.json")  # fmt: skip
    extra: dict = dataclasses.field(default_factory=dict)


# the fields above that are command-line options (`extra` is not)
EVALUATE_OPTIONS = tuple(f.name for f in dataclasses.fields(EvaluateConfig) if f.name != "extra")

RUNTIMES = ("auto", "torch", "onnx")
RUNTIME_HELP = "auto: the fastest engine that keeps accuracy, measured here (torch or ONNX Runtime)"
MODEL_HELP = "a model folder saved by finegrain (fit's, train's, probe's, an ensemble) or its run folder"


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """`finegrain predict`'s options, each declared once (the command line is generated: cli/options.py)."""

    model: str = option("", MODEL_HELP)
    images: tuple[str, ...] = option((), "image file(s)")
    k: int = option(3, "classes to show per image")
    coverage: float | None = option(None, "instead of the top k: the set of classes that holds the true one with "
                                    "this probability, e.g. 0.9 (a model made by `finegrain fit`, calibrated on "
                                    "images it did not train on)")  # fmt: skip
    json: bool = option(False, "one JSON document on stdout (for scripts) instead of text")
    device: str = option("auto", DEVICE_HELP)
    runtime: str = option("auto", RUNTIME_HELP, choices=RUNTIMES)


@dataclasses.dataclass(frozen=True)
class ExplainConfig:
    """`finegrain explain`'s options, each declared once (the command line is generated: cli/options.py)."""

    model: str = option("", MODEL_HELP)
    images: tuple[str, ...] = option((), "image file(s)")
    out: str = option("", "folder for the overlays (PNG) and explanations.json (required)")
    method: str = option("auto", "the map", choices=("auto", "cam", "gradcam", "attention"))
    layer: str | None = option(None, "Grad-CAM target layer (default: the last spatial layer)")
    target: str | None = option(None, "class to explain (default: the predicted one)")
    threshold: float = option(0.2, "box: fraction of the map's peak")
    device: str = option("auto", DEVICE_HELP)


@dataclasses.dataclass(frozen=True)
class FixresConfig:
    """`finegrain fixres`'s options, each declared once (the command line is generated: cli/options.py)."""

    model: str = option("", MODEL_HELP)
    data: str = option("", "dataset whose train split re-estimates the statistics")
    size: int | None = option(None, "the new test resolution, e.g. 288 (required)")
    out: str = option("", "folder for the adapted model (required)")
    head_epochs: int = option(5, "classifier fine-tuning epochs (0: BatchNorm only)")
    head_lr: float = option(0.01, "the classifier's learning rate")
    max_images: int | None = option(None, "use a seeded subset of this many train images")
    bn_layers: str = option("last", "BatchNorm layers to re-estimate", choices=("last", "all"))
    split: str = option("train", "the split the statistics come from (never test)")
    seed: int = option(0, "of the subset")
    device: str = option("auto", DEVICE_HELP)


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """`finegrain serve`'s options, each declared once (the command line is generated: cli/options.py)."""

    model: str = option("", MODEL_HELP)
    host: str = option("127.0.0.1", "interface to listen on (0.0.0.0: every interface)")
    port: int = option(8000, "TCP port (0: any free one)")
    runtime: str = option("auto", "inference path", choices=RUNTIMES)
    device: str = option("auto", DEVICE_HELP)
    max_batch: str = option("auto", "images run together at most: N (1: one at a time) or auto (measured)")
    max_wait_ms: float = option(5.0, "how long a request may wait to fill a batch")
    max_upload_mb: float = option(20.0, "larger uploads get 413")
    k: int = option(5, "classes returned when a request does not say")
    log_level: str = option("info", "uvicorn's", choices=("critical", "error", "warning", "info", "debug"))


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """`finegrain export`'s options, each declared once (the command line is generated: cli/options.py)."""

    model: str = option("", "a model folder (or run folder) saved by finegrain; not an ensemble")
    format: str = option("onnx", "onnx, or timm: safetensors in timm's key layout", choices=("onnx", "timm"))
    out: str | None = option(None, "the .onnx file (default: MODEL/model.onnx; int8: beside, .int8.onnx)")
    quantize: str | None = option(None, "also a static int8 graph, calibrated", choices=("int8",))
    calibration: str | None = option(None, "labelled data: its train split calibrates int8, its test split checks "
                                     "(default: the model's records)")  # fmt: skip
    max_images: int = option(200, "images to check on (and to calibrate with)")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """`finegrain search`'s options, each declared once (the command line is generated: cli/options.py)."""

    store: str | None = option(None, "a feature store made by `finegrain extract`")
    index: str | None = option(None, "the store, as an option (the older spelling)")
    query: tuple[str, ...] = option((), "query image file(s) (required)", words=True)
    k: int = option(10, "nearest images a query")
    pooling: str | None = option(None, "the store's pooling to search (default: its first)")
    norm: str = option("l2", "normalizer fitted on the gallery (l2: cosine similarity)")
    json: bool = option(False, "one JSON document on stdout (for scripts) instead of text")


@dataclasses.dataclass(frozen=True)
class SuggestConfig:
    """`finegrain suggest`'s options, each declared once (the command line is generated: cli/options.py)."""

    data: str = option("", "the labelled images: folder (root/class/img, root/train/class/img) or CSV manifest")
    unlabeled: str = option("", "folder of images without labels, any depth (required)")
    n: int = option(50, "how many images to suggest")
    out: str = option("", "output folder: suggestions.csv, suggest.json, feature stores (required)")
    backbone: str = option("efficientnet_lite0", "the frozen backbone")
    view: str = option("eval", "extraction view (fit's)", choices=("eval", "full256-flip"))
    seed: int = option(0, "the ranking is the same for the same seed")
    batch_size: int = option(32, "images a batch")
    workers: int | None = option(None, "decoding processes (default: cores / 2)")
    precision: str = option("auto", "auto: bf16 where the CPU has it, else fp32", choices=("auto", "fp32", "bf16"))
    device: str = option("auto", DEVICE_HELP)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """`finegrain demo`'s options, each declared once (the command line is generated: cli/options.py)."""

    data: str | None = option(None, "default: the bundled sample (finegrain/_demo/birds10)")
    out: str = option("runs/demo", "output folder")
    budget_min: float = option(2.0, "fit's time budget, minutes")


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """`finegrain report`'s options, each declared once (the command line is generated: cli/options.py)."""

    run: str = option("", "a run folder of `finegrain fit` or `finegrain train`")
    data: str | None = option(None, "dataset (default: the one in the run's config.yaml)")
    out: str | None = option(None, "HTML file (default: RUN/report.html)")
    split: str = option("test", "the split to score")
    tta: str = option("none", "none | flip | 5crop | 10crop, combined with + (e.g. flip+5crop)")
    gallery: int = option(12, "images in the CAM and mistakes galleries")
    allow_train_images: bool = option(False, "score images the model trained or validated on (its run's "
                                      "splits.json); marked in metrics.json")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """`finegrain train`'s options, declared once: the command line (`--name VALUE` or `name=VALUE`), `--config`
    YAML keys and Python keywords are generated from these (cli/main.py)."""

    data: str = option("", "folder (root/class/img or root/{train,val,test}/class/img) or CSV manifest")
    out: str = option("", "run folder (config, logs, checkpoints, model/)")
    backbone: str = option("efficientnet_lite0", "timm name, an offline one, or hf-hub:org/name")
    checkpoint: str | None = option(None, "start from these weights (a .pt or safetensors file)")
    regime: str = option("auto", "auto | head | last:K | full | scratch (auto: chosen from the images a class and "
                         "time_budget_min)")  # fmt: skip
    pretrained: bool = option(True, "false: random init, for tests and ablations (scratch is always random)")
    pooling: str = option("gap", "gap | gem | ... (models/pooling.py)")
    drop_rate: float = option(0.2, "dropout before the head")
    image_size: int | None = option(None, "input side (default: the weights' own resolution)")
    crop_pct: float | None = option(None, "eval center-crop fraction (1.0: the whole short side; default: the "
                                    "weights' own)")  # fmt: skip
    feature_norm: bool = option(False, "L2-normalize the pooled features (scaled to sqrt(D)) before the head")
    epochs: int = option(10, "training epochs")
    batch_size: int = option(32, "images a step (per process under torchrun)")
    lr: float = option(0.01, "the head's learning rate; the backbone's is lr x backbone_lr_scale")
    backbone_lr_scale: float = option(0.1, "the backbone's learning rate over the head's")
    layer_decay: float | None = option(None, "layer-wise learning-rate decay (timm's param groups)")
    optimizer: str = option("sgd", "sgd | adamw")
    momentum: float = option(0.9, "SGD momentum")
    nesterov: bool = option(True, "Nesterov momentum")
    weight_decay: float = option(1e-4, "never on norms and biases")
    schedule: str = option("cosine", "cosine | step | constant")
    warmup_epochs: float = option(1.0, "linear warm-up before the schedule")
    label_smoothing: float = option(0.1, "cross-entropy label smoothing")
    loss: str = option("ce", "ce | focal | cb | ldam | logit-adjusted | balanced-softmax (long tail: counts come "
                       "from train)")  # fmt: skip
    loss_options: dict | None = option(None, "e.g. {beta: 0.9999} for cb, {max_margin: 0.5, s: 30, drw_start: "
                                       "0.8} for ldam")  # fmt: skip
    sampler: str = option("instance", "instance | class-balanced | sqrt | progressive")
    normed_head: bool = option(False, "cosine classifier (NormedLinear), as LDAM expects")
    shot_thresholds: tuple[int, int] = option((100, 20), "many-shot: > first; few-shot: < second (Kang et al., 2020)")
    augment: str = option("crop-flip", "none | crop-flip | autoaugment | randaugment | trivialaugment")
    crop_scale: tuple[float, float] = option((0.25, 1.0), "RandomResizedCrop area range, as fractions of the image")
    mixup: float = option(0.0, "mixup Beta(α, α); 0: off")
    cutmix: float = option(0.0, "CutMix Beta(α, α); 0: off")
    manifold_mixup: float = option(0.0, ">0: manifold mixup (Verma et al., 2019), the Beta(α, α) of mixing the "
                                   "cached trunk output at the cut with the flipped batch, targets alike; needs the "
                                   "trunk cache (regime head or last:K, cache_views >= 1), no mixup/cutmix",
                                   )  # fmt: skip
    ema_decay: float | None = option(None, "keep an exponential moving average of the weights (e.g. 0.999)")
    clip_grad: float | None = option(None, "clip the gradient norm at this value")
    freeze_bn: bool = option(False, "keep BatchNorm statistics frozen")
    cache_views: int = option(0, ">0: run the frozen trunk once over this many augmented views per image (head, "
                              "last:K)")  # fmt: skip
    head_init: str = option("msra", "msra | probe: fit the new head on frozen features first (LP-FT, Kumar et al. "
                            "2022)")  # fmt: skip
    val_fraction: float = option(0.1, "carved from train (stratified, seeded) when the data has no val split")
    early_stop: int | None = option(None, "patience in epochs on validation top-1")
    precision: str = option("fp32", "fp32 | bf16 (CPU autocast) | amp (CUDA autocast); bf16 does not speed CPU "
                            "training")  # fmt: skip
    channels_last: bool = option(True, "channels-last memory format")
    workers: int | None = option(None, "decoding processes (default: from the cores)")
    device: str = option("auto", DEVICE_HELP)
    seed: int = option(0, "seeds the split, the initialisation and the data order")
    resume: bool = option(False, "continue the run in --out from its checkpoint")
    max_steps: int | None = option(None, "stop after this many optimizer steps (tests, budgets); the schedule is "
                                   "unchanged")  # fmt: skip
    time_budget_min: float | None = option(None, "stop at the end of the epoch that passes this many minutes")
    unlabeled: str | None = option(None, "folder of images without labels: the run is a student distilled from "
                                   "label propagation's probe on its frozen features (regime head or last:K)",
                                   )  # fmt: skip
    distill_temperature: float = option(2.0, "with unlabeled: the softening temperature T")
    distill_weight: float = option(1.0, "with unlabeled: the weight of the KL term")


SPLITS_FILE = "splits.json"


def save_splits(out_dir: str, *, data: str, how: str, splits: dict[str, list[str]]) -> str:
    """Record which images a run trained, validated and is tested on: out_dir/splits.json, absolute paths a split.

    `evaluate` and `report` read it back (load_splits) to score only images the model never learned from."""
    import json

    body = {"data": os.path.abspath(data), "how": how}
    body.update({name: sorted(os.path.abspath(p) for p in paths) for name, paths in splits.items()})
    path = os.path.join(out_dir, SPLITS_FILE)
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(path, json.dumps(body, indent=1) + "\n")
    return path


def load_splits(model_dir: str) -> tuple[str, dict] | None:
    """(path, record) of the splits.json of a run folder or of its model/ folder's run; None when none is recorded."""
    import json

    folder = os.path.abspath(model_dir.rstrip("/\\"))
    for cand in (folder, os.path.dirname(folder) if os.path.basename(folder) == "model" else None):
        path = os.path.join(cand, SPLITS_FILE) if cand else None
        if path and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    return path, json.load(f)
            except (OSError, ValueError) as e:
                raise FinegrainError(f"cannot read the recorded split {path}: {e}") from None
    return None


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """`fit`'s options, declared once: the command line (`finegrain fit --help`), `--config` YAML keys and
    `finegrain.fit(...)` keywords are generated from / checked against these fields (config.option)."""

    data: str = option("", "folder (root/class/img or root/{train,val,test}/class/img) or CSV manifest")
    out: str = option("", "output folder: model/, leaderboard.csv, fit.json")
    budget_min: float = option(10.0, "minutes for the whole command: extraction, candidates, fine-tuning, test pass")
    backbone: str = option("efficientnet_lite0", "the first backbone: efficientnet_lite0 (offline), any timm name, "
                           "hf-hub:...")  # fmt: skip
    backbones: str = option(
        "", "comma-separated backbones whose views fit tries, the first one's first "
        "(default: --backbone, then the offline ones: recipe/candidates.py DEFAULT_BACKBONES)",
    )  # fmt: skip
    val_fraction: float = option(0.2, "validation part of train (stratified, seeded) when the data has no val split")
    seed: int = option(0, "fixes the validation split, the folds and training")
    finetune: bool = option(True, "frozen candidates only", flag="--no-finetune")
    ensemble: bool = option(True, "no ensembles", flag="--no-ensemble")
    batch_size: int = option(32, "images a batch (extraction, the test pass)")
    workers: int | None = option(None, "decoding processes (default: cores / 2)")
    precision: str = option("auto", "of extraction and the test pass", choices=("auto", "fp32", "bf16"))
    runtime: str = option("auto", "engine of extraction and the test pass (runtime/engine.py)",
                          choices=("auto", "torch", "onnx"))  # fmt: skip
    device: str = option("auto", "auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    bootstrap: int = option(1000, "resamples of the test score's interval")
    unlabeled: str = option("", "folder of images without labels: semi-supervised candidates too")
    transductive: bool = option(False, "the test images join the unlabeled pool (labels unread); the test score is "
                                "reported as transductive (fit.json test_transductive)")  # fmt: skip
