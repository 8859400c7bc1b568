"""Accuracy metrics on arrays: top-k, per-class and mean per-class accuracy.

Scores are [N, C] with column c the score of class index c; labels are class indices in 0..C-1. Per-class
accuracy is scikit-learn's per-class recall. Top-k stays a rank of the true class: one ranking serves every k (and
the bootstrap resamples), and its ties follow argmax, where scikit-learn's top_k_accuracy_score breaks them towards
the higher class index.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import recall_score


def _check_scores(scores: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, y = np.asarray(scores), np.asarray(y)
    if scores.ndim != 2 or y.ndim != 1 or len(scores) != len(y):
        raise ValueError(f"need scores [N, C] and labels [N]; got shapes {scores.shape} and {y.shape}")
    if len(y) and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= scores.shape[1]):
        raise ValueError(f"labels must be class indices in 0..{scores.shape[1] - 1}")
    return scores, y


def true_class_rank(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Scores [N, C], labels [N] -> 0-based rank [N] of the true class, best first.

    Ties are broken towards the lower class index, as argmax does, so rank 0 means argmax hits the true class.
    """
    scores, y = _check_scores(scores, y)
    true = scores[np.arange(len(y)), y][:, None]
    lower_index = np.arange(scores.shape[1])[None, :] < y[:, None]
    return ((scores > true) | ((scores == true) & lower_index)).sum(axis=1)


def topk_accuracy(scores: np.ndarray, y: np.ndarray, k: int = 1) -> float:
    """Fraction of rows [N] whose true class is among the k highest of scores [N, C] (top-1 = argmax)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= np.shape(scores)[-1]:
        raise ValueError(f"k must be an integer in 1..{np.shape(scores)[-1]} (the number of classes); got {k!r}")
    ranks = true_class_rank(scores, y)
    return float(np.mean(ranks < k)) if len(ranks) else float("nan")


def per_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int | None = None) -> np.ndarray:
    """Labels [N] in 0..C-1 -> accuracy of each class [C]; NaN for a class absent from y_true.

    C is n_classes, or one more than the largest label seen.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"y_true and y_pred must be 1-D and the same length; got {y_true.shape} and {y_pred.shape}")
    seen = int(max(y_true.max(initial=-1), y_pred.max(initial=-1))) + 1
    n = seen if n_classes is None else n_classes
    if n < seen or min(y_true.min(initial=0), y_pred.min(initial=0)) < 0:
        raise ValueError(f"labels must be class indices in 0..{n - 1}")
    if len(y_true) == 0:
        return np.full(n, np.nan)
    return recall_score(y_true, y_pred, labels=np.arange(n), average=None, zero_division=np.nan)


def mean_per_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int | None = None) -> float:
    """Labels [N] -> the unweighted mean of the accuracies of the classes present in y_true."""
    acc = per_class_accuracy(y_true, y_pred, n_classes)
    present = acc[~np.isnan(acc)]
    return float(present.mean()) if len(present) else float("nan")


def classification_metrics(
    scores: np.ndarray, y_true: np.ndarray, *, classes: Sequence | np.ndarray | None = None
) -> dict[str, float | int]:
    """Scores [N, C] and true labels [N] -> {"top1", "top5", "mean_per_class", "n"}.

    top5 is top-min(5, C). classes: the label of each score column (a classifier's classes_); when given,
    y_true holds labels rather than column indices.
    """
    scores = np.asarray(scores)
    y_true = np.asarray(y_true)
    if classes is not None:
        y_true = _labels_to_columns(y_true, np.asarray(classes))
    ranks = true_class_rank(scores, y_true)
    y_pred = np.argmax(scores, axis=1)
    return {
        "top1": float(np.mean(ranks < 1)) if len(ranks) else float("nan"),
        "top5": float(np.mean(ranks < min(5, scores.shape[1]))) if len(ranks) else float("nan"),
        "mean_per_class": mean_per_class_accuracy(y_true, y_pred, scores.shape[1]),
        "n": int(len(y_true)),
    }


def _labels_to_columns(y: np.ndarray, classes: np.ndarray) -> np.ndarray:
    if classes.ndim != 1 or len(np.unique(classes)) != len(classes):
        raise ValueError("classes must be a 1-D array of distinct labels, one per score column")
    order = np.argsort(classes)
    pos = np.clip(np.searchsorted(classes[order], y), 0, len(classes) - 1)
    unknown = classes[order][pos] != y
    if unknown.any():
        raise ValueError(f"y_true has labels not in classes: {np.unique(y[unknown])[:10].tolist()}")
    return order[pos]
