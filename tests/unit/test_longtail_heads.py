"""Fair long-tail comparisons: every method's hyperparameter is chosen the same way, on the same balanced split."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from finegrain.heads import LogisticProbe
from finegrain.heads.longtail import fit_long_tail_heads
from finegrain.heads.probe import DEFAULT_CS
from finegrain.heads.select import fingerprint, select_on_validation

COUNTS = [40, 25, 15, 8, 5, 3]


def _blobs(counts, seed, spread=1.6):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(0).normal(size=(len(counts), 16)) * 1.5
    X = np.concatenate([centers[c] + spread * rng.normal(size=(n, 16)) for c, n in enumerate(counts)])
    y = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    return X.astype(np.float32), y


@pytest.fixture(scope="module")
def data():
    X, y = _blobs(COUNTS, seed=1)
    Xv, yv = _blobs([10] * len(COUNTS), seed=2)
    return X, y, Xv, yv


@pytest.fixture(scope="module")
def heads(data):
    X, y, Xv, yv = data
    return fit_long_tail_heads(X, y, Xv, yv, crt_weight_decays=(2e-2,))


def test_the_ce_probe_and_the_post_hoc_methods_choose_on_the_same_validation_split(data, heads):
    X, y, Xv, yv = data
    assert set(heads) == {
        "CE probe",
        "NCM",
        "tau-norm",
        "logit adjustment (post-hoc)",
        "cRT (class-balanced re-training)",
        "LWS (learnable weight scaling)",
    }
    assert {sel.split for sel in heads.values()} == {fingerprint(Xv, yv)}
    # The probe's C is the one with the best balanced accuracy on that split, not on a split of the training set.
    scores = {C: balanced_accuracy_score(yv, LogisticProbe(Cs=[C]).fit(X, y).predict(Xv)) for C in DEFAULT_CS}
    assert heads["CE probe"].scores == pytest.approx(scores)
    assert heads["CE probe"].value == max(DEFAULT_CS, key=lambda C: (scores[C], -DEFAULT_CS.index(C)))
    # The post-hoc methods adjust that very probe.
    assert heads["logit adjustment (post-hoc)"].estimator.base is heads["CE probe"].estimator
    assert heads["tau-norm"].estimator.base is heads["CE probe"].estimator


def test_logit_adjustment_helps_the_rare_classes_on_balanced_validation(heads):
    la, ce = heads["logit adjustment (post-hoc)"], heads["CE probe"]
    assert la.score >= ce.score  # τ = 0 is in the grid, so the adjusted probe is never worse on validation
    assert la.value > 0  # and on long-tailed blobs some adjustment wins


def test_another_split_is_another_fingerprint(data):
    X, y, Xv, yv = data
    assert fingerprint(Xv, yv) != fingerprint(Xv[1:], yv[1:])
    with pytest.raises(ValueError, match="non-empty"):
        select_on_validation(lambda v: None, [], Xv, yv)
