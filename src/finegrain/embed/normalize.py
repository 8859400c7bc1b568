"""Feature normalizers, fitted on training features only, scikit-learn style (fit / transform, state ends in _)."""

from __future__ import annotations

import numpy as np

from finegrain.registry import Registry

NORMALIZERS: Registry[type] = Registry("normalizer")


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class _Normalizer:
    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> _Normalizer:
        return self

    def fit_transform(self, X: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        return self.fit(X, y).transform(X)

    def get_state(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in vars(self).items() if k.endswith("_")}

    def set_state(self, state: dict[str, np.ndarray]) -> _Normalizer:
        for k, v in state.items():
            setattr(self, k, np.asarray(v))
        return self


@NORMALIZERS.register("none")
class Identity(_Normalizer):
    def transform(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, dtype=np.float32)


@NORMALIZERS.register("l2")
class L2Normalizer(_Normalizer):
    def transform(self, X: np.ndarray) -> np.ndarray:
        return _l2(np.asarray(X, dtype=np.float32))


@NORMALIZERS.register("cl2n")
class CenterL2Normalizer(_Normalizer):
    """Subtract the training mean, then L2 (CL2N, Wang et al. 2019 "SimpleShot")."""

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> CenterL2Normalizer:
        self.mean_ = np.asarray(X, dtype=np.float64).mean(0).astype(np.float32)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        return _l2(np.asarray(X, dtype=np.float32) - self.mean_)


@NORMALIZERS.register("pca-whiten")
class PCAWhitening(_Normalizer):
    """L2, center, project on the top `n_components` principal axes divided by sqrt(eigenvalue + reg), then L2.

    Jégou & Chum (2012): whitening learnt on the training set; the final L2 makes cosine the natural metric.
    `shrinkage` regularises the whitening (reg = shrinkage x the mean kept eigenvalue, plus eps): full whitening
    (0) blows up the noisiest directions of a few thousand training images, which costs 1-NN about one point on
    cub100; 1.0 makes whitened 1-NN better than raw instead (BENCHMARKS.md). `n_components` is capped at
    min(N - 1, D).
    """

    def __init__(
        self, n_components: int | None = 256, *, shrinkage: float = 1.0, eps: float = 1e-6, l2_after: bool = True
    ) -> None:
        self.n_components = n_components
        self.shrinkage = shrinkage
        self.eps = eps
        self.l2_after = l2_after

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> PCAWhitening:
        X = _l2(np.asarray(X, dtype=np.float64))
        self.mean_ = X.mean(0)
        Xc = X - self.mean_
        _, s, vt = np.linalg.svd(Xc, full_matrices=False)
        k = min(self.n_components or vt.shape[0], vt.shape[0], max(X.shape[0] - 1, 1))
        if self.shrinkage < 0:
            raise ValueError(f"shrinkage must be >= 0, got {self.shrinkage}")
        var = s[:k] ** 2 / max(X.shape[0] - 1, 1)
        reg = self.eps + self.shrinkage * float(var.mean())
        self.components_ = (vt[:k].T / np.sqrt(var + reg)).astype(np.float32)  # [D, k]
        self.mean_ = self.mean_.astype(np.float32)
        self.explained_variance_ = var.astype(np.float32)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        Z = (_l2(np.asarray(X, dtype=np.float32)) - self.mean_) @ self.components_
        return _l2(Z) if self.l2_after else Z


def create_normalizer(name: str, **kwargs) -> _Normalizer:
    """`none`, `l2`, `cl2n`, `pca-whiten` or `pca-whiten:K` (K components); kwargs set to None are ignored."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if name.startswith("pca-whiten:"):
        name, kwargs["n_components"] = "pca-whiten", int(name.split(":", 1)[1])
    return NORMALIZERS.get(name)(**kwargs)
