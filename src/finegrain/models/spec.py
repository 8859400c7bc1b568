"""One model spec: what a model is (backbone, pooling, normalizer, head), how to feed it, what it knows.

Like torchvision's weights objects, the spec travels with the weights: `model.json` is `ModelSpec.to_dict()`, a
feature store's meta records the spec of the backbone it was made with, and `build_model(spec)` is the one place a
model is constructed — for training, loading, search, FixRes and the report alike.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from finegrain.backbones import Backbone, Preprocess, create_backbone
from finegrain.errors import FinegrainError
from finegrain.models.classifier import HEADS, ImageClassifier
from finegrain.models.layers import NORMALIZERS

FORMAT = "finegrain-classifier/1"
# model.json keys that the spec owns; every other key is kept as `extra` (regime, best_epoch, fixres, ...)
_OWN = {"format", "backbone", "source", "preprocess", "pooling", "normalizer", "feature_norm", "head", "num_classes"}
_OWN |= {"classes", "train_counts", "embed_dim", "flip", "head_options", "kind", "zoom"}


@dataclass(frozen=True)
class ModelSpec:
    """backbone: a name `create_backbone` knows; source: where its pretrained weights come from ("offline-package",
    "timm-hub", "checkpoint:<path>", "random"); preprocess: the eval geometry and normalization; classes: names in
    output order (empty for a feature model: no head); train_counts: images a class the model trained on.
    normalizer: see models.layers.build_normalizer ("l2": fine-tuning's FeatureNorm; "unit-l2", "cl2n",
    "pca-whiten": frozen-feature normalizers, state in the weights); embed_dim: what the normalizer outputs (PCA);
    head: linear | normed | knn (head_options: n_gallery, k, metric, weights, temperature); flip: the pooled
    features of the image and its mirror are averaged (the flip-averaged descriptor); kind: "fine-tuned" or
    "frozen" (a classifier fitted on frozen features: probe, NCM, k-NN, long-tail heads); zoom: look closer
    (models/zoom.py: preprocess decodes at twice the trunk's side, the head reads the full view and the attention
    box's view concatenated)."""

    backbone: str
    preprocess: Preprocess
    source: str = "offline-package"
    pooling: str = "gap"
    normalizer: str = "none"
    head: str = "linear"
    classes: tuple[str, ...] = ()
    train_counts: tuple[int, ...] | None = None
    embed_dim: int | None = None
    flip: bool = False
    head_options: dict[str, Any] = field(default_factory=dict)
    kind: str = "fine-tuned"
    extra: dict[str, Any] = field(default_factory=dict)
    zoom: bool = False

    def __post_init__(self) -> None:
        if self.normalizer not in NORMALIZERS:
            raise FinegrainError(f"normalizer must be one of {', '.join(NORMALIZERS)}; got {self.normalizer!r}")
        if self.head not in HEADS:
            raise FinegrainError(f"head must be one of {', '.join(HEADS)}; got {self.head!r}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def replace(self, **changes: Any) -> ModelSpec:
        return dataclasses.replace(self, **changes)

    @classmethod
    def of(cls, model: ImageClassifier, *, classes, train_counts=None, extra: dict | None = None) -> ModelSpec:
        """The spec of a built model (its backbone id, geometry, pooling, normalizer and head kind)."""
        return cls(
            backbone=model.backbone.name,
            source=model.backbone.source,
            preprocess=model.preprocess,
            pooling=model.pooling_name,
            normalizer=model.normalizer_name,
            head=model.head_kind,
            classes=tuple(classes),
            train_counts=None if train_counts is None else tuple(int(c) for c in train_counts),
            extra=dict(extra or {}),
        )

    def to_dict(self) -> dict:
        """model.json's content; `feature_norm` is kept beside `normalizer` so older readers still understand it."""
        d = {
            "format": FORMAT,
            "backbone": self.backbone,
            "source": self.source,
            "preprocess": self.preprocess.to_dict(),
            "pooling": self.pooling,
            "normalizer": self.normalizer,
            "feature_norm": self.normalizer == "l2",
            "head": self.head,
            "num_classes": self.num_classes,
            "classes": list(self.classes),
        }
        if self.train_counts is not None:
            d["train_counts"] = list(self.train_counts)
        if self.kind != "fine-tuned":  # older readers know fine-tuned models only
            d.update(kind=self.kind, embed_dim=self.embed_dim, flip=self.flip, head_options=dict(self.head_options))
        if self.zoom:
            d["zoom"] = True
        return {**d, **self.extra}

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        if d.get("format") != FORMAT:
            raise FinegrainError(f"not a {FORMAT} model description (format: {d.get('format')!r})")
        normalizer = d.get("normalizer") or ("l2" if d.get("feature_norm") else "none")
        counts = d.get("train_counts")
        return cls(
            backbone=d["backbone"],
            source=d.get("source", "random"),
            preprocess=Preprocess.from_dict(d["preprocess"]),
            pooling=d.get("pooling", "gap"),
            normalizer=normalizer,
            head=d.get("head", "linear"),
            classes=tuple(d.get("classes", ())),
            train_counts=None if counts is None else tuple(int(c) for c in counts),
            embed_dim=d.get("embed_dim"),
            flip=bool(d.get("flip", False)),
            head_options=dict(d.get("head_options") or {}),
            kind=d.get("kind", "fine-tuned"),
            zoom=bool(d.get("zoom", False)),
            extra={k: v for k, v in d.items() if k not in _OWN},
        )

    @classmethod
    def of_backbone(cls, backbone: Backbone) -> ModelSpec:
        """The spec of a feature model on a built backbone (its name, weights source and preprocessing)."""
        return cls(backbone=backbone.name, source=backbone.source, preprocess=backbone.preprocess)

    @classmethod
    def from_backbone_info(cls, info: dict, **kwargs: Any) -> ModelSpec:
        """The spec of a feature model from `Backbone.describe()` (what a feature store records)."""
        return cls(
            backbone=info["name"], source=info.get("source", ""), preprocess=Preprocess.from_dict(info["preprocess"])
        ).replace(**kwargs)


def build_backbone(spec: ModelSpec, *, pretrained: bool = True, checkpoint: str | None = None) -> Backbone:
    """The spec's backbone with the spec's preprocessing. pretrained: load the weights its source names (a
    checkpoint source is read again); False when the weights come from a saved model instead."""
    source = spec.source or ""
    if checkpoint is None and pretrained and source.startswith("checkpoint:"):
        checkpoint = source.split(":", 1)[1]
    backbone = create_backbone(spec.backbone, pretrained=pretrained and source != "random", checkpoint=checkpoint)
    backbone.preprocess = spec.preprocess
    return backbone


def build_model(
    spec: ModelSpec,
    *,
    pretrained: bool = False,
    checkpoint: str | None = None,
    backbone: Backbone | None = None,
    drop_rate: float = 0.0,
) -> ImageClassifier:
    """The classifier a spec describes. Default: untrained weights, to be loaded from a saved model;
    `pretrained=True` starts from the backbone's own weights (training). `backbone`: one already built."""
    if not spec.classes:
        raise FinegrainError("a classifier needs classes: this spec describes a feature model (no head)")
    backbone = backbone or build_backbone(spec, pretrained=pretrained, checkpoint=checkpoint)
    backbone.preprocess = spec.preprocess
    return ImageClassifier(
        backbone,
        spec.num_classes,
        pooling=spec.pooling,
        drop_rate=drop_rate,
        normalizer=spec.normalizer,
        head=spec.head,
        embed_dim=spec.embed_dim,
        flip=spec.flip,
        head_options=spec.head_options,
        zoom=spec.zoom,
    )
