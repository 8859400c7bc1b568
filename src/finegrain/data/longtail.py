"""Long-tailed training subsets with an exponential profile (Cao et al., 2019; Cui et al., 2019) and shot groups."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from finegrain.data.folders import Sample


def exponential_profile(n_max: int, n_classes: int, imbalance_ratio: float) -> list[int]:
    """Images per class: n_c = floor(n_max * ρ^(-c / (C - 1))), from n_max down to n_max / ρ."""
    if imbalance_ratio < 1 or n_classes < 1 or n_max < 1:
        raise ValueError("need imbalance_ratio >= 1, n_classes >= 1 and n_max >= 1")
    if n_classes == 1:
        return [n_max]
    return [int(n_max * imbalance_ratio ** (-c / (n_classes - 1))) for c in range(n_classes)]


def make_longtailed(
    samples: Sequence[Sample], *, imbalance_ratio: float, seed: int = 0, n_max: int | None = None
) -> list[Sample]:
    """Class c (by label index) keeps a seeded random choice of profile[c] of its samples (all, if it has fewer)."""
    labels = np.array([s.label for s in samples])
    n_classes = int(labels.max()) + 1
    n_max = n_max or int(np.bincount(labels).max())
    profile = exponential_profile(n_max, n_classes, imbalance_ratio)
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        keep += sorted(rng.permutation(idx)[: profile[c]].tolist())
    return [samples[i] for i in sorted(keep)]


def shot_groups(train_counts: Sequence[int], *, many: int = 100, few: int = 20) -> np.ndarray:
    """ "many" (> many images), "few" (< few), else "medium" — Kang et al. (2020) use 100 and 20."""
    counts = np.asarray(train_counts)
    return np.where(counts > many, "many", np.where(counts < few, "few", "medium"))


def describe_counts(counts: Sequence[int]) -> dict:
    counts = np.asarray(counts)
    present = counts[counts > 0]
    return {
        "total": int(counts.sum()),
        "classes": int(len(counts)),
        "max": int(present.max()),
        "min": int(present.min()),
        "imbalance_ratio": round(float(present.max() / present.min()), 2),
    }
