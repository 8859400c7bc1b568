"""Input checks of the scikit-learn-style heads, done by scikit-learn (`validate_data`,
`check_classification_targets`): the dtype, shape, finiteness, sparse and complex input, empty data, regression
targets, `n_features_in_`; each head runs them at fit and at prediction."""

from __future__ import annotations

import numpy as np
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import validate_data


def fit_data(est, X, y) -> tuple[np.ndarray, np.ndarray]:
    """(X as C-contiguous float32 [N, D], y [N] class labels), `est.n_features_in_` set; ValueError otherwise."""
    n = getattr(X, "shape", (None,))[0] if hasattr(X, "shape") else (len(X) if hasattr(X, "__len__") else None)
    if y is not None and n is not None and hasattr(y, "__len__") and len(y) != n:
        raise ValueError(f"y must hold {n} labels (one per row of X); got {len(y)}")
    X, y = validate_data(est, X, y, dtype=np.float32, order="C")
    check_classification_targets(y)
    return X, y


def predict_data(est, X) -> np.ndarray:
    """X as C-contiguous float32 [M, D] with the features the head was fitted on; ValueError otherwise."""
    return validate_data(est, X, reset=False, dtype=np.float32, order="C")
