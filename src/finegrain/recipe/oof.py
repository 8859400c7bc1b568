"""Out-of-fold (OOF) estimates for fit's frozen and semi-supervised candidates: K-fold predictions over every training
image (fit's train + val), as scikit-learn's `cross_val_predict` makes them, so near-tied candidates are ranked on
all N images instead of on the validation split alone (on cub100 its 583 images ranked a 0.920-test candidate below a
0.904 one).

Cheap by construction: features are extracted once per view; a fold refits the head once with the hyperparameters its
single fit on fit's train part chose (the probe's C, NCM's temperature), so K folds cost K solver runs, not K searches.
An ensemble's OOF probabilities are the average of its members' (free). A semi-supervised candidate
(recipe/unlabeled.py) is refitted in each fold on the other folds' labels and the whole unlabeled pool; the held-out
images are not added to the pool (the saved model predicts new images with its probe, not by propagation)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedKFold

from finegrain.recipe.candidates import class_proba, fit_head

K_DEFAULT = 5


@dataclass(frozen=True)
class Folds:
    """Every training image (fit's train + val, in the data's order) and its fold."""

    paths: list[str]
    y: np.ndarray  # [N] class ids
    fold: np.ndarray  # [N] fold of each image, 0..k-1
    k: int

    @property
    def estimate(self) -> str:
        """The name of the estimate in the leaderboard: 'oof-5' for 5 folds."""
        return f"oof-{self.k}"


def n_folds(y: np.ndarray, k: int = K_DEFAULT) -> int:
    """Folds for labels y [N]: k, fewer when a class has fewer than k images; 0 when a class has < 2 (no OOF)."""
    counts = np.bincount(np.asarray(y, np.int64))
    counts = counts[counts > 0]
    n = int(min(k, counts.min())) if len(counts) else 0
    return n if n >= 2 else 0


def make_folds(paths: list[str], y: np.ndarray, *, seed: int, k: int = K_DEFAULT) -> Folds | None:
    """Stratified, seeded folds over the training images; None when a class has fewer than 2 images."""
    y = np.asarray(y, np.int64)
    k = n_folds(y, k)
    if k == 0:
        return None
    fold = np.empty(len(y), np.int64)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for f, (_, held) in enumerate(splitter.split(np.zeros((len(y), 1)), y)):
        fold[held] = f
    return Folds(list(paths), y, fold, k)


def fixed_params(clf) -> dict:
    """The hyperparameters a fitted classifier chose on its own data, to reuse unchanged in every fold."""
    if hasattr(clf, "C_"):  # LogisticProbe: its C search, done once
        return {"Cs": (float(clf.C_),)}
    if hasattr(clf, "temperature_"):  # NearestClassMean: its softmax temperature
        return {"temperature": float(clf.temperature_)}
    return {}


def head_fit_predict(head: tuple, *, fixed: dict, seed: int, n_classes: int):
    """fit_predict(X_fit, y_fit, X_held) -> probabilities [n_held, n_classes] of one HEADS entry (for `oof_loop`)."""

    def fit_predict(X_fit: np.ndarray, y_fit: np.ndarray, X_held: np.ndarray) -> np.ndarray:
        norm, clf = fit_head(head, X_fit, y_fit, seed=seed, fixed=fixed)
        return class_proba(clf, norm.transform(X_held), n_classes)

    return fit_predict


def oof_loop(
    fit_predict: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray], X: np.ndarray, folds: Folds, *,
    n_classes: int, time_left: Callable[[], float],
) -> np.ndarray | None:  # fmt: skip
    """OOF probabilities [N, n_classes]: image i predicted by `fit_predict(X_fit, y_fit, X_held)` -> [n_held,
    n_classes] fitted on the other folds. X [N, D] is aligned with folds.paths; NaN rows (unreadable files) are
    never fitted and stay 0. None when, measured on the folds done, the rest would not fit in time_left() seconds."""
    ok = ~np.isnan(X[:, 0])
    out = np.zeros((len(X), n_classes))
    t0 = time.perf_counter()
    for f in range(folds.k):
        fit_rows, held = ok & (folds.fold != f), ok & (folds.fold == f)
        if held.any():
            out[held] = fit_predict(X[fit_rows], folds.y[fit_rows], X[held])
        per_fold = (time.perf_counter() - t0) / (f + 1)
        if f + 1 < folds.k and per_fold * (folds.k - f - 1) > time_left():
            return None
    return out
