"""The one stratified splitter (holdouts of a flat folder, validation carved from train, the probe's C split)."""

import numpy as np
import pytest

from finegrain.data.splits import stratified_split


def test_split_is_pinned():
    # saved runs and benchmarks rely on these exact rows: the algorithm must never change
    y = np.array([2, 0, 1, 0, 2, 2, 0, 1, 0, 5, 2, 0, 1, 2])
    train, test = stratified_split(y, test_size=0.25, seed=0)
    assert test.tolist() == [6, 12, 13] and train.dtype == test.dtype == np.int64
    assert train.tolist() == sorted(set(range(len(y))) - set(test.tolist()))


def test_split_is_stratified_seeded_and_keeps_every_class_in_train():
    y = np.repeat([10, 20, 30, 40], [20, 10, 2, 1])
    train, test = stratified_split(y, test_size=0.2, seed=3)
    assert not set(train) & set(test) and len(train) + len(test) == len(y)
    assert [int((y[test] == c).sum()) for c in (10, 20, 30, 40)] == [4, 2, 1, 0]  # at least one, never all
    assert set(y[train]) == {10, 20, 30, 40}
    again = stratified_split(y, test_size=0.2, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(again, (train, test)))
    assert not np.array_equal(stratified_split(y, test_size=0.2, seed=4)[1], test)
    _, probe_val = stratified_split(y, test_size=0.2, seed=3, min_test=0)  # the probe's rule: round, maybe none
    assert [int((y[probe_val] == c).sum()) for c in (10, 20, 30, 40)] == [4, 2, 0, 0]
    assert stratified_split(y, test_size=0.0, seed=0)[1].size == 3  # min_test 1: one of each class with 2+ rows


def test_split_rejects_a_bad_fraction():
    with pytest.raises(ValueError, match="test_size"):
        stratified_split(np.array([0, 0, 1, 1]), test_size=1.5, seed=0)
