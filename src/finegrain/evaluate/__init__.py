"""Evaluation: accuracy metrics on score arrays."""

from finegrain.evaluate.metrics import (
    classification_metrics,
    mean_per_class_accuracy,
    per_class_accuracy,
    topk_accuracy,
    true_class_rank,
)

__all__ = [
    "classification_metrics",
    "mean_per_class_accuracy",
    "per_class_accuracy",
    "topk_accuracy",
    "true_class_rank",
]
