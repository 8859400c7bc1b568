"""Accuracy by shot group: many / medium / few classes by their number of training images (Kang et al., 2020)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from finegrain.data.longtail import shot_groups
from finegrain.evaluate.metrics import per_class_accuracy


def shot_accuracy(
    y_true: np.ndarray, y_pred: np.ndarray, train_counts: Sequence[int], *, many: int = 100, few: int = 20
) -> dict[str, float]:
    """Mean per-class accuracy within each shot group (NaN for an empty group)."""
    acc = per_class_accuracy(np.asarray(y_true), np.asarray(y_pred), len(train_counts))
    groups = shot_groups(train_counts, many=many, few=few)
    out = {}
    for g in ("many", "medium", "few"):
        vals = acc[(groups == g) & ~np.isnan(acc)]
        out[g] = float(vals.mean()) if len(vals) else float("nan")
    return out
