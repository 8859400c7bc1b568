"""A classifier fitted on frozen embeddings -> one finegrain model (backbone + pooling + normalizer + head).

The frozen path (extract -> normalizer -> probe / NCM / k-NN / long-tail head) becomes the same `ImageClassifier` a
fine-tune is, saved in the same model folder, so `finegrain.load`, predict, evaluate, explain and report take it.
Every head is exact: a linear classifier keeps its weights; NCM is a linear layer on the normalized features (the
per-row term of the squared distance cancels in the softmax); k-NN keeps its gallery.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from finegrain.backbones import Backbone
from finegrain.embed.normalize import CenterL2Normalizer, Identity, L2Normalizer, Normalizer, PCAWhitening
from finegrain.errors import FinegrainError
from finegrain.heads.knn import KNNClassifier
from finegrain.heads.ncm import NearestClassMean
from finegrain.heads.search import backbone_from_meta
from finegrain.models import ImageClassifier, ModelSpec, build_model, create_pooling, pooled_dim, save_model

ABSENT = -1e4  # the logit of a class the classifier never saw: probability ~0


def _normalizer_spec(norm: Normalizer, dim: int) -> tuple[str, int, dict[str, torch.Tensor]]:
    """(layer name, output dim, buffers) of a fitted normalizer."""
    if isinstance(norm, Identity):
        return "none", dim, {}
    if isinstance(norm, L2Normalizer):
        return "unit-l2", dim, {}
    if isinstance(norm, CenterL2Normalizer):
        return "cl2n", dim, {"norm.mean": torch.as_tensor(norm.mean_)}
    if isinstance(norm, PCAWhitening):
        if not norm.l2_after:
            raise FinegrainError("only PCA-whitening followed by L2 (l2_after=True) can be saved in a model")
        comps = torch.as_tensor(norm.components_)
        return "pca-whiten", comps.shape[1], {"norm.mean": torch.as_tensor(norm.mean_), "norm.components": comps}
    raise FinegrainError(f"cannot save a {type(norm).__name__} normalizer in a model")


def _linear(clf, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Weight [C, D] and bias [C] over all class ids of a fitted classifier with a linear decision_function."""
    if isinstance(clf, NearestClassMean):
        t, m = clf.temperature_, clf.means_.astype(np.float64)
        coef, bias = (m / t, np.zeros(len(m))) if clf.metric == "cosine" else (2 * m / t, -(m * m).sum(1) / t)
    elif hasattr(clf, "coef_"):
        coef, bias = np.asarray(clf.coef_, np.float64), np.asarray(clf.intercept_, np.float64)
        if len(clf.classes_) == 2 and coef.shape[0] == 1:  # binary logistic regression: logits (0, w.x + b)
            coef, bias = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], bias])
    else:
        raise FinegrainError(f"{type(clf).__name__} has no linear form to save")
    weight = np.zeros((n_classes, coef.shape[1]))
    full_bias = np.full(n_classes, ABSENT)
    weight[clf.classes_], full_bias[clf.classes_] = coef, bias
    return weight, full_bias


def frozen_model(
    backbone: Backbone,
    clf,
    normalizer: Normalizer,
    *,
    classes: Sequence[str],
    pooling: str,
    flip: bool = False,
    zoom: bool = False,
    gallery: tuple[np.ndarray, np.ndarray] | None = None,
    train_counts: Sequence[int] | None = None,
    extra: dict | None = None,
) -> tuple[ImageClassifier, ModelSpec]:
    """The model that computes `clf.predict_proba(normalizer.transform(features))` from images.

    clf: a fitted LogisticProbe, NearestClassMean, KNNClassifier, or a decoupled long-tail head (cRT, LWS, τ-norm,
    logit-adjusted), trained with class ids 0..len(classes)-1 as labels. gallery: (raw training features [N, D],
    labels [N]) for k-NN (the normalizer is applied here). The backbone's preprocess must be the extraction's."""
    width = pooled_dim(backbone, create_pooling(pooling)) * (2 if zoom else 1)  # zoom: full | zoomed region
    norm_name, dim, buffers = _normalizer_spec(normalizer, width)
    if isinstance(clf, NearestClassMean) and clf.metric == "cosine" and norm_name == "none":
        norm_name = "unit-l2"  # NCM normalizes its inputs itself: the same as an L2 layer before it
    spec = ModelSpec.of_backbone(backbone).replace(
        pooling=pooling,
        normalizer=norm_name,
        embed_dim=dim,
        flip=flip,
        zoom=zoom,
        classes=tuple(classes),
        train_counts=None if train_counts is None else tuple(int(c) for c in train_counts),
        kind="frozen",
        extra={"classifier": type(clf).__name__, **(extra or {})},
    )
    if isinstance(clf, KNNClassifier):
        if gallery is None:
            raise FinegrainError("a k-NN model needs its gallery: pass gallery=(training features, labels)")
        feats, labels = normalizer.transform(gallery[0]), np.asarray(gallery[1])
        opts = {"k": clf.n_neighbors, "metric": clf.metric, "weights": clf.weights, "temperature": clf.temperature}
        spec = spec.replace(head="knn", head_options={"n_gallery": len(feats), **opts})
        buffers |= {"head.gallery": torch.as_tensor(feats), "head.labels": torch.as_tensor(labels, dtype=torch.long)}
    else:
        weight, bias = _linear(clf, len(classes))
        buffers |= {"head.weight": torch.as_tensor(weight).float(), "head.bias": torch.as_tensor(bias).float()}
    model = build_model(spec, backbone=backbone)
    missing = model.load_state_dict(buffers, strict=False)
    if missing.unexpected_keys:
        raise FinegrainError(f"internal: unexpected model keys {missing.unexpected_keys}")
    return model.eval(), spec


def save_store_model(store, clf, normalizer: Normalizer, folder: str, *, pooling: str, train_X, train_y, extra=None):
    """Save a classifier fitted on a feature store's features as a model folder on the store's own backbone,
    preprocessing and flip averaging; returns the folder."""
    counts = np.bincount(np.asarray(train_y, np.int64), minlength=len(store.classes))
    model, spec = frozen_model(
        backbone_from_meta(store.meta),
        clf,
        normalizer,
        classes=store.classes,
        pooling=pooling,
        flip=bool(store.meta.get("flip")),
        zoom=bool(store.meta.get("zoom")),
        gallery=(train_X, train_y),
        train_counts=counts,
        extra=extra,
    )
    return save_model(model, folder, spec)
