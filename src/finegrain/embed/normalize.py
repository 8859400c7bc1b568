"""Feature normalizers fitted on training features only: scikit-learn transformers (fit / transform, state ends in _).

Each one clones, pipelines (`make_pipeline(create_normalizer("cl2n"), LogisticRegression())`) and grid-searches like
any scikit-learn transformer; `get_state` / `set_state` carry the fitted arrays to and from a saved model.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from finegrain.registry import Registry

NORMALIZERS: Registry[type[Normalizer]] = Registry("normalizer")


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class Normalizer(TransformerMixin, BaseEstimator):
    """Base: features [N, D] -> normalized features [N, D'] (float32), statistics from `fit`'s rows only."""

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> Normalizer:
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def get_state(self) -> dict[str, np.ndarray]:
        """The fitted arrays (public attributes ending in `_`), e.g. for np.savez."""
        return {k: v for k, v in vars(self).items() if k.endswith("_") and not k.startswith("_")}

    def set_state(self, state: dict[str, np.ndarray]) -> Normalizer:
        """Restore what `get_state` returned, instead of fitting; returns self."""
        for k, v in state.items():
            setattr(self, k, np.asarray(v))
        return self


class _Stateless(Normalizer):
    """A normalizer with nothing to learn: `fit` is a no-op and it transforms unfitted (scikit-learn's stateless)."""

    def __sklearn_tags__(self):  # scikit-learn >= 1.6
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        return tags

    def __sklearn_is_fitted__(self) -> bool:  # what check_is_fitted asks before 1.6
        return True


@NORMALIZERS.register("none")
class Identity(_Stateless):
    def transform(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, dtype=np.float32)


@NORMALIZERS.register("l2")
class L2Normalizer(_Stateless):
    def transform(self, X: np.ndarray) -> np.ndarray:
        return _l2(np.asarray(X, dtype=np.float32))


@NORMALIZERS.register("cl2n")
class CenterL2Normalizer(Normalizer):
    """Subtract the training mean, then L2 (CL2N, Wang et al. 2019 "SimpleShot")."""

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> CenterL2Normalizer:
        self.mean_ = np.asarray(X, dtype=np.float64).mean(0).astype(np.float32)  # [D]
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "mean_")
        return _l2(np.asarray(X, dtype=np.float32) - self.mean_)


@NORMALIZERS.register("pca-whiten")
class PCAWhitening(Normalizer):
    """L2, center, project on the top `n_components` principal axes divided by sqrt(eigenvalue + reg), then L2.

    Jégou & Chum (2012): whitening learnt on the training set; the final L2 makes cosine the natural metric.
    `shrinkage` regularises the whitening (reg = shrinkage x the mean kept eigenvalue, plus eps): full whitening
    (0) blows up the noisiest directions of a few thousand training images, which costs 1-NN about one point on
    cub100; 1.0 makes whitened 1-NN better than raw instead (BENCHMARKS.md). `n_components` is capped at
    min(N - 1, D); None keeps them all.
    """

    def __init__(
        self, n_components: int | None = 256, *, shrinkage: float = 1.0, eps: float = 1e-6, l2_after: bool = True
    ) -> None:
        self.n_components = n_components
        self.shrinkage = shrinkage
        self.eps = eps
        self.l2_after = l2_after

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> PCAWhitening:
        if self.shrinkage < 0:
            raise ValueError(f"shrinkage must be >= 0, got {self.shrinkage}")
        X = _l2(np.asarray(X, dtype=np.float64))
        mean = X.mean(0)
        _, s, vt = np.linalg.svd(X - mean, full_matrices=False)
        k = min(self.n_components or vt.shape[0], vt.shape[0], max(X.shape[0] - 1, 1))
        var = s[:k] ** 2 / max(X.shape[0] - 1, 1)
        reg = self.eps + self.shrinkage * float(var.mean())
        self.mean_ = mean.astype(np.float32)  # [D]
        self.components_ = (vt[:k].T / np.sqrt(var + reg)).astype(np.float32)  # [D, k]
        self.explained_variance_ = var.astype(np.float32)  # [k]
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "components_")
        Z = (_l2(np.asarray(X, dtype=np.float32)) - self.mean_) @ self.components_
        return _l2(Z) if self.l2_after else Z


def create_normalizer(name: str, **kwargs) -> Normalizer:
    """`none`, `l2`, `cl2n`, `pca-whiten` or `pca-whiten:K` (K components); kwargs set to None are ignored."""
    if name.startswith("pca-whiten:"):
        name, kwargs["n_components"] = "pca-whiten", int(name.split(":", 1)[1])
    return NORMALIZERS.create(name, **kwargs)
