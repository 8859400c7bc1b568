"""Stratified, seeded splits of labelled rows: the one splitter behind holdouts, validation splits and the probe."""

from __future__ import annotations

import numpy as np


def stratified_split(
    y: np.ndarray, *, test_size: float, seed: int | None, min_test: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Labels [N] -> (train rows, test rows), sorted int64: about `test_size` of each class in test.

    Each class's rows are shuffled by one generator seeded with `seed` (classes in sorted order) and its first
    round(n x test_size) go to test, at least `min_test` but never all of them: every class keeps a training row,
    so a class with a single row stays whole in train (where scikit-learn's stratified splitters refuse to split).
    The algorithm is fixed: the same labels and seed give the same split as every earlier version.
    """
    if not 0 <= test_size <= 1:
        raise ValueError(f"test_size must be a fraction in [0, 1], got {test_size}")
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        n_test = min(max(int(round(len(rows) * test_size)), min_test), len(rows) - 1) if len(rows) > 1 else 0
        test += rows[:n_test].tolist()
        train += rows[n_test:].tolist()
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(test, dtype=np.int64))
