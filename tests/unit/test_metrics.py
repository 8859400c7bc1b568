"""Accuracy metrics on hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from finegrain.evaluate import (
    classification_metrics,
    mean_per_class_accuracy,
    per_class_accuracy,
    topk_accuracy,
    true_class_rank,
)

# 4 samples, 3 classes. True-class ranks: 0, 1, 2, 0.
SCORES = np.array(
    [
        [0.7, 0.2, 0.1],  # y=0: rank 0
        [0.5, 0.3, 0.2],  # y=1: rank 1
        [0.6, 0.3, 0.1],  # y=2: rank 2
        [0.1, 0.1, 0.8],  # y=2: rank 0
    ]
)
Y = np.array([0, 1, 2, 2])


def test_topk_accuracy_by_hand():
    assert topk_accuracy(SCORES, Y, 1) == pytest.approx(2 / 4)
    assert topk_accuracy(SCORES, Y, 2) == pytest.approx(3 / 4)
    assert topk_accuracy(SCORES, Y, 3) == 1.0
    np.testing.assert_array_equal(true_class_rank(SCORES, Y), [0, 1, 2, 0])


def test_top1_ties_follow_argmax():
    scores = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]])
    y = np.array([0, 1])
    # argmax picks column 0 on a tie, so only the first row counts at top-1; both count at top-2
    assert topk_accuracy(scores, y, 1) == 0.5
    assert topk_accuracy(scores, y, 1) == np.mean(np.argmax(scores, axis=1) == y)
    assert topk_accuracy(scores, y, 2) == 1.0


def test_topk_rejects_bad_k_and_labels():
    with pytest.raises(ValueError, match="k must be"):
        topk_accuracy(SCORES, Y, 0)
    with pytest.raises(ValueError, match="k must be"):
        topk_accuracy(SCORES, Y, 4)
    with pytest.raises(ValueError, match="class indices"):
        topk_accuracy(SCORES, np.array([0, 1, 3, 2]), 1)
    with pytest.raises(ValueError, match="shapes"):
        topk_accuracy(SCORES, Y[:3], 1)


def test_per_class_and_mean_per_class_accuracy_by_hand():
    y_true = np.array([0, 0, 0, 0, 1, 2, 2])
    y_pred = np.array([0, 0, 0, 1, 0, 2, 0])
    # class 0: 3/4, class 1: 0/1, class 2: 1/2; overall accuracy 4/7 weighs class 0 more
    np.testing.assert_allclose(per_class_accuracy(y_true, y_pred), [0.75, 0.0, 0.5])
    assert mean_per_class_accuracy(y_true, y_pred) == pytest.approx((0.75 + 0.0 + 0.5) / 3)
    acc = per_class_accuracy(y_true, y_pred, n_classes=5)  # classes 3, 4 absent from y_true
    assert acc.shape == (5,) and np.isnan(acc[3:]).all()
    assert mean_per_class_accuracy(y_true, y_pred, n_classes=5) == pytest.approx(1.25 / 3)


def test_per_class_accuracy_is_scikit_learn_recall():
    from sklearn.metrics import balanced_accuracy_score, recall_score

    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 6, 200)
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 6, 200))
    np.testing.assert_array_equal(per_class_accuracy(y_true, y_pred), recall_score(y_true, y_pred, average=None))
    assert mean_per_class_accuracy(y_true, y_pred) == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert np.isnan(per_class_accuracy(y_true[:0], y_pred[:0], n_classes=3)).all()


def test_mean_per_class_ignores_classes_only_predicted():
    y_true = np.array([0, 0, 1])
    y_pred = np.array([0, 2, 1])  # class 2 is predicted but never true
    np.testing.assert_allclose(per_class_accuracy(y_true, y_pred), [0.5, 1.0, np.nan])
    assert mean_per_class_accuracy(y_true, y_pred) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="class indices"):
        per_class_accuracy(y_true, y_pred, n_classes=2)


def test_classification_metrics_by_hand():
    m = classification_metrics(SCORES, Y)
    assert m == {"top1": 0.5, "top5": 1.0, "mean_per_class": pytest.approx((1 + 0 + 0.5) / 3), "n": 4}
    scores = np.eye(6)[[0, 1, 2, 3, 4, 5, 0]]  # 6 classes: top5 really is top-5
    scores[6, 5] = 0.5  # last row: true class 5 ranks second
    m6 = classification_metrics(scores, np.array([0, 1, 2, 3, 4, 5, 5]))
    assert m6["top1"] == pytest.approx(6 / 7) and m6["top5"] == 1.0
    assert m6["mean_per_class"] == pytest.approx((5 + 0.5) / 6)


def test_classification_metrics_with_class_labels():
    classes = np.array([10, 20, 30])  # a classifier's classes_: column c scores label classes[c]
    m = classification_metrics(SCORES, np.array([10, 20, 30, 30]), classes=classes)
    assert m == classification_metrics(SCORES, Y)
    unsorted = classification_metrics(SCORES[:, [2, 0, 1]], np.array([10, 20, 30, 30]), classes=[30, 10, 20])
    assert unsorted == m
    with pytest.raises(ValueError, match="not in classes"):
        classification_metrics(SCORES, np.array([10, 20, 40, 30]), classes=classes)


def test_empty_input_gives_nan():
    m = classification_metrics(np.zeros((0, 3)), np.zeros(0, dtype=int))
    assert m["n"] == 0 and math.isnan(m["top1"]) and math.isnan(m["mean_per_class"])
