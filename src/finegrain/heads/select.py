"""One way to choose a hyperparameter on a validation split, used by every head that has one: `best_of` is the rule
(the best validation score; ties to the lower validation loss, then the earlier grid value), applied by
`LogisticProbe` and `StreamingProbe` to their C (top-1 on a stratified split) and by `select_on_validation` to the
long-tail heads' grids (balanced accuracy on the class-balanced split they are given).

`select_on_validation(make, grid, X_val, y_val)` fits `make(value)` for each value of the grid and keeps the value
with the best balanced accuracy (mean per-class recall, scikit-learn's `balanced_accuracy_score`) on the validation
split; ties go to the earlier grid value. `fingerprint(X_val, y_val)` names a split, so a result can say which
split each choice was made on (a comparison is fair only when every method chose on the same one).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import balanced_accuracy_score


def fingerprint(X_val: np.ndarray, y_val: np.ndarray) -> str:
    """A short hash of a validation split's features and labels."""
    h = hashlib.sha1()
    for a in (np.ascontiguousarray(X_val, np.float32), np.ascontiguousarray(y_val, np.int64)):
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


@dataclass
class Selection:
    """What `select_on_validation` chose: the fitted estimator, its value, the score of every value, the split."""

    estimator: object
    value: object
    scores: dict = field(default_factory=dict)
    split: str = ""

    @property
    def score(self) -> float:
        return self.scores[self.value]


def best_of(grid: Sequence, scores: Mapping, losses: Mapping | None = None):
    """The one rule every head picks a hyperparameter by (C, tau, weight decay): the grid value with the best
    validation score; ties go to the lower validation log-loss where it was measured, then to the earlier grid value
    (grids ascend: the smaller C, the stronger penalty)."""
    order = {v: i for i, v in enumerate(grid)}
    return max(grid, key=lambda v: (scores[v], -(losses or {}).get(v, 0.0), -order[v]))


def select_on_validation(
    make: Callable[[object], object], grid: Sequence, X_val: np.ndarray, y_val: np.ndarray
) -> Selection:
    """The fitted `make(value)` (value from `grid`) with the best balanced accuracy on (X_val, y_val).

    `make(value)` must return a fitted estimator with `predict`. A one-value grid is fitted and scored all the same.
    """
    if len(grid) == 0:
        raise ValueError("select_on_validation needs a non-empty grid")
    y_val = np.asarray(y_val)
    fitted, scores = {}, {}
    for value in grid:
        fitted[value] = make(value)
        scores[value] = float(balanced_accuracy_score(y_val, fitted[value].predict(X_val)))
    value = best_of(grid, scores)
    return Selection(estimator=fitted[value], value=value, scores=scores, split=fingerprint(X_val, y_val))
