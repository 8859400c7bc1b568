"""finegrain's logistic probe with per-example weights (pseudo-labels count as much as their certainty)."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression

from finegrain.heads.probe import LogisticProbe

# With one labelled image a class the probe cannot validate C and takes the middle of its grid (0.1); the semi-
# supervised probes use that value too, so a pseudo-labelled fit has no choice to make on data it cannot check.
SEMI_C = 0.1


class WeightedProbe(LogisticProbe):
    """LogisticProbe with one C and `fit(X, y, sample_weight)`; predict / predict_proba as the probe's."""

    def __init__(self, *, C: float = SEMI_C, standardize: bool = True, random_state: int | None = 0,
                 max_iter: int = 1000) -> None:  # fmt: skip
        super().__init__(Cs=(C,), standardize=standardize, random_state=random_state, max_iter=max_iter)
        self.C = C

    def fit(self, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> WeightedProbe:
        """X [N, D], y [N], sample_weight [N] >= 0 (None: all 1)."""
        self._sample_weight = None if sample_weight is None else np.asarray(sample_weight, np.float64)
        try:
            return super().fit(X, y)
        finally:
            self._sample_weight = None

    def _fit_scaled(self, X: np.ndarray, y: np.ndarray, C: float) -> tuple[LogisticRegression, np.ndarray, np.ndarray]:
        mean, scale = self._scaling(X)
        model = self._model(C).fit((X - mean) / scale, y, sample_weight=self._sample_weight)
        return model, mean, scale
