"""Nearest class mean classifier over embeddings, scikit-learn style."""

from __future__ import annotations

import numbers

import numpy as np
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from finegrain.heads.checks import fit_data, predict_data
from finegrain.heads.index import check_metric, l2_normalize

COSINE_TEMPERATURE = 0.05


class NearestClassMean(ClassifierMixin, BaseEstimator):
    """Assign each embedding to the class whose mean is most similar.

    metric "cosine": means of L2-normalised embeddings, compared by cosine similarity.
    metric "l2": plain means, compared by negative squared euclidean distance.
    predict_proba = softmax(similarities / temperature). temperature None: 0.05 for cosine; for l2,
    2 * sigma^2 with sigma^2 the pooled within-class variance per dimension, i.e. the posterior of a Gaussian
    model with one shared isotropic covariance.
    """

    def __init__(self, *, metric: str = "cosine", temperature: float | None = None) -> None:
        self.metric = metric
        self.temperature = temperature

    def fit(self, X: np.ndarray, y: np.ndarray) -> NearestClassMean:
        """X [N, D] training embeddings, y [N] labels."""
        check_metric(self.metric)
        t = self.temperature
        if t is not None and (not isinstance(t, numbers.Real) or not t > 0):
            raise ValueError(f"temperature must be a positive number or None; got {t!r}")
        X, y = fit_data(self, X, y)
        if len(X) == 0:
            raise ValueError("X is empty: nearest class mean needs at least one training sample")
        if self.metric == "cosine":
            X = l2_normalize(X)
        self.classes_, codes = np.unique(y, return_inverse=True)
        counts = np.bincount(codes, minlength=len(self.classes_)).astype(np.float64)
        order = np.argsort(codes, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts[:-1])]).astype(np.int64)
        sums = np.add.reduceat(X[order].astype(np.float64), starts, axis=0)  # [C, D]; every class has a row
        means = (sums / counts[:, None]).astype(np.float32)
        self.means_ = l2_normalize(means) if self.metric == "cosine" else means
        self.temperature_ = float(t) if t is not None else self._default_temperature(X, codes)
        return self

    def _default_temperature(self, X: np.ndarray, codes: np.ndarray) -> float:
        if self.metric == "cosine":
            return COSINE_TEMPERATURE
        sigma2 = float(np.mean((X - self.means_[codes]) ** 2))
        if sigma2 <= 0:  # one sample per class: fall back to the spread of the whole set
            sigma2 = float(X.var()) or 1.0
        return 2.0 * sigma2

    def similarities(self, X: np.ndarray) -> np.ndarray:
        """X [M, D] -> similarity to each class mean [M, C]: cosine, or negative squared euclidean distance."""
        check_is_fitted(self, "means_")
        X = predict_data(self, X)
        if self.metric == "cosine":
            return l2_normalize(X) @ self.means_.T
        X64, means = X.astype(np.float64), self.means_.astype(np.float64)
        return 2.0 * X64 @ means.T - (X64**2).sum(1)[:, None] - (means**2).sum(1)[None, :]

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """`similarities` [M, C], as scikit-learn's classifiers give it: with two classes the second class's margin
        over the first [M]."""
        s = self.similarities(X)
        return s[:, 1] - s[:, 0] if len(self.classes_) == 2 else s

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """X [M, D] -> class probabilities [M, C], columns in the order of classes_."""
        return softmax(self.similarities(X).astype(np.float64) / self.temperature_, axis=1)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """X [M, D] -> labels [M] of the most similar class mean."""
        scores = self.similarities(X)  # first, so an unfitted model raises NotFittedError
        return self.classes_[np.argmax(scores, axis=1)]
