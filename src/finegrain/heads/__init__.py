"""Classifiers on frozen embeddings (k-NN, nearest class mean, logistic probe) and nearest-neighbour search."""

from __future__ import annotations

from typing import Any

from finegrain.heads.index import FaissIndex, NumpyIndex, build_index
from finegrain.heads.knn import KNNClassifier
from finegrain.heads.ncm import NearestClassMean
from finegrain.heads.probe import LogisticProbe
from finegrain.heads.stream_probe import StreamingProbe
from finegrain.registry import Registry

CLASSIFIERS: Registry[type] = Registry("classifier")
CLASSIFIERS.register("knn")(KNNClassifier)
CLASSIFIERS.register("ncm")(NearestClassMean)
CLASSIFIERS.register("probe")(LogisticProbe)


def create_classifier(name: str, **kwargs: Any) -> KNNClassifier | NearestClassMean | LogisticProbe:
    """Build the classifier registered as name; keyword arguments set to None keep the classifier's default."""
    return CLASSIFIERS.create(name, **kwargs)


__all__ = [
    "CLASSIFIERS",
    "FaissIndex",
    "KNNClassifier",
    "LogisticProbe",
    "NearestClassMean",
    "NumpyIndex",
    "StreamingProbe",
    "build_index",
    "create_classifier",
]
