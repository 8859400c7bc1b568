"""k-nearest-neighbour classifier over embeddings, scikit-learn style."""

from __future__ import annotations

import numbers

import numpy as np
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from finegrain.heads.checks import fit_data, predict_data
from finegrain.heads.index import BACKENDS, FAISS_KINDS, build_index, check_metric, on_disk

WEIGHTS = ("uniform", "distance", "temperature")


def check_labels(y: np.ndarray, n: int) -> np.ndarray:
    """y [n] of class labels (any sortable values) -> a 1-D array; ValueError on a shape mismatch."""
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"y must be a 1-D array of {n} labels (one per row of X); got shape {y.shape}")
    return y


class KNNClassifier(ClassifierMixin, BaseEstimator):
    """Vote of the n_neighbors most similar training embeddings.

    weights: "uniform" is a majority vote; "distance" weighs by 1/d, with d = 1 - cos (cosine) or the euclidean
    distance (l2), and exact matches take all the weight, as in scikit-learn; "temperature" weighs by
    softmax(sim / temperature) over the neighbours, as DINOv2's k-NN evaluation does (sim = cos for cosine,
    the negative squared distance for l2).
    backend: "auto" | "numpy" | "faiss", see `build_index`. index: "flat" (exact) | "ivf" | "ivfpq" | "hnsw"
    (faiss, approximate); "ivfpq" on a memory map (a store larger than memory) keeps the vectors on disk and
    re-ranks its candidates exactly from them.
    """

    def __init__(
        self,
        n_neighbors: int = 10,
        *,
        metric: str = "cosine",
        weights: str = "temperature",
        temperature: float = 0.07,
        backend: str = "auto",
        index: str = "flat",
    ) -> None:
        self.n_neighbors = n_neighbors
        self.metric = metric
        self.weights = weights
        self.temperature = temperature
        self.backend = backend
        self.index = index

    def _check_params(self) -> None:
        n = self.n_neighbors
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"n_neighbors must be a positive integer; got {n!r}")
        check_metric(self.metric)
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}; got {self.weights!r}")
        if not isinstance(self.temperature, numbers.Real) or not self.temperature > 0:
            raise ValueError(f"temperature must be a positive number; got {self.temperature!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.index not in FAISS_KINDS:
            raise ValueError(f"index must be one of {', '.join(FAISS_KINDS)}; got {self.index!r}")

    def fit(self, X: np.ndarray, y: np.ndarray) -> KNNClassifier:
        """X [N, D] training embeddings, y [N] labels. The embeddings are copied into an index."""
        self._check_params()
        if self.index != "flat" and on_disk(X):  # on disk: indexed without a copy in RAM
            y = check_labels(y, len(X))
            self.n_features_in_ = X.shape[1]
        else:
            X, y = fit_data(self, X, y)
        if len(X) == 0:
            raise ValueError("X is empty: k-NN needs at least one training sample")
        self.classes_, self.gallery_labels_ = np.unique(y, return_inverse=True)
        self.index_ = build_index(X, metric=self.metric, backend=self.backend, kind=self.index)
        return self

    def kneighbors(self, X: np.ndarray, n_neighbors: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """X [M, D] -> (similarities [M, k], training-row indices [M, k]), most similar first; k <= N."""
        check_is_fitted(self, "index_")
        X = predict_data(self, X)
        return self.index_.search(X, self.n_neighbors if n_neighbors is None else n_neighbors)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """X [M, D] -> class probabilities [M, C], columns in the order of classes_."""
        sims, neighbors = self.kneighbors(X)
        labels = self.gallery_labels_[neighbors]  # [M, k] class indices
        weights = self._vote_weights(sims)
        m, n_classes = labels.shape[0], len(self.classes_)
        flat = (np.arange(m)[:, None] * n_classes + labels).ravel()
        votes = np.bincount(flat, weights=weights.ravel(), minlength=m * n_classes).reshape(m, n_classes)
        return votes / votes.sum(axis=1, keepdims=True)

    def _vote_weights(self, sims: np.ndarray) -> np.ndarray:
        """Similarities [M, k] -> non-negative vote weights [M, k] (float64)."""
        sims = sims.astype(np.float64)
        if self.weights == "uniform":
            return np.ones_like(sims)
        if self.weights == "temperature":
            return softmax(sims / self.temperature, axis=1)
        dist = 1.0 - sims if self.metric == "cosine" else np.sqrt(np.maximum(-sims, 0.0))
        dist = np.maximum(dist, 0.0)
        with np.errstate(divide="ignore"):
            weights = 1.0 / dist
        exact = np.isinf(weights)
        rows = exact.any(axis=1)
        weights[rows] = exact[rows]  # an exact match outvotes everything else, as in scikit-learn
        return weights

    def predict(self, X: np.ndarray) -> np.ndarray:
        """X [M, D] -> predicted labels [M] (values from classes_; ties go to the first class)."""
        scores = self.predict_proba(X)  # first, so an unfitted model raises NotFittedError
        return self.classes_[np.argmax(scores, axis=1)]
