"""Split-conformal sets and the unknown score (evaluate/conformal.py) on synthetic exchangeable data."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from finegrain.evaluate.conformal import Conformal, UnknownScore, count_bands, coverage_report


def _draw(rng, n: int, n_classes: int = 8, sharp: float = 2.0, counts=None):
    """Exchangeable (labels, probabilities): a noisy classifier whose logits favour the true class."""
    p_class = None if counts is None else np.asarray(counts, float) / np.sum(counts)
    y = rng.choice(n_classes, n, p=p_class)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), y] += sharp
    return y, softmax(logits, axis=1)


@pytest.mark.parametrize("method", ["lac", "aps"])
def test_marginal_coverage_holds_over_many_draws(method):
    """Split conformal: P(y in set) >= 1 - alpha; LAC also not much more (<= 1 - alpha + 1 / (n + 1) in expectation),
    the non-randomized APS over-covers (its scores jump by whole classes' mass: 0.943 at 0.90 here)."""
    rng = np.random.default_rng(0)
    for coverage in (0.9, 0.95):
        got = []
        for _ in range(200):
            y_cal, p_cal = _draw(rng, 300)
            y, p = _draw(rng, 300)
            got.append(coverage_report(Conformal(method).fit(p_cal, y_cal).predict_set(p, coverage), y)["coverage"])
        upper = coverage + 1 / 301 + 0.01 if method == "lac" else 1.0
        assert coverage - 0.005 <= np.mean(got) <= upper, (method, coverage, np.mean(got))


def test_the_set_always_holds_the_top1_and_shrinks_as_coverage_drops():
    rng = np.random.default_rng(1)
    y_cal, p_cal = _draw(rng, 400)
    _, p = _draw(rng, 200)
    conf = Conformal("aps").fit(p_cal, y_cal)
    wide, narrow = conf.predict_set(p, 0.95), conf.predict_set(p, 0.5)
    assert wide[np.arange(200), p.argmax(1)].all() and narrow[np.arange(200), p.argmax(1)].all()
    assert (wide >= narrow).all() and wide.sum() > narrow.sum()
    again = Conformal.from_dict(conf.to_dict()).predict_set(p, 0.95)  # saved with a model, read back
    assert (again == wide).all()


def test_classwise_calibration_covers_a_rare_class_that_marginal_calibration_misses():
    rng = np.random.default_rng(2)
    counts = [40] + [400] * 7  # class 0 rare, and the classifier is worse on it
    rare_cov = {True: [], False: []}
    for _ in range(60):
        y_cal, p_cal = _draw(rng, 2840, counts=counts)
        y, p = _draw(rng, 2840, counts=counts)
        for arr_y, arr_p in ((y_cal, p_cal), (y, p)):  # the rare class's logits are flatter
            rare = arr_y == 0
            arr_p[rare] = softmax(np.log(arr_p[rare]) * 0.3, axis=1)
        for classwise in (True, False):
            sets = Conformal("lac", classwise=classwise).fit(p_cal, y_cal).predict_set(p, 0.9)
            rare_cov[classwise].append(coverage_report(sets, y)["per_class"][0])
    assert np.mean(rare_cov[True]) >= 0.88 and np.mean(rare_cov[False]) < np.mean(rare_cov[True]) - 0.03


def test_count_bands_calibrate_the_rare_classes_together_where_each_alone_has_too_few_images():
    """A long tail: 20 head classes and 40 rare ones, 8 calibration images each (too few for 90% class by class:
    they fall back to the marginal threshold, which the head classes set); the rare classes are harder. Calibrated
    by bands of training counts, the rare classes are covered at the nominal 90%; marginally (and class by class)
    they are not. The bands survive saving."""
    rng = np.random.default_rng(4)
    train_counts = np.r_[np.full(20, 300), np.full(40, 12)]
    assert np.unique(count_bands(train_counts)).tolist() == [3, 8]
    assert count_bands([0, 1, 2, 3, 4]).tolist() == [0, 0, 1, 1, 2]
    cal_counts = np.r_[np.full(20, 150), np.full(40, 8)]

    def draw(counts):
        y = np.repeat(np.arange(60), counts)
        logits = rng.normal(size=(len(y), 60))
        logits[np.arange(len(y)), y] += np.where(y < 20, 4.0, 2.5)  # the rare classes are harder
        return y, softmax(logits, axis=1)

    rare_cov = {"marginal": [], "class": [], "bands": []}
    for _ in range(20):
        y_cal, p_cal = draw(cal_counts)
        y, p = draw(cal_counts * 4)
        for name, kw in (
            ("marginal", {}),
            ("class", {"classwise": True}),
            ("bands", {"groups": count_bands(train_counts)}),
        ):
            conf = Conformal("lac", **kw).fit(p_cal, y_cal)
            hit = conf.predict_set(p, 0.9)[np.arange(len(y)), y]
            rare_cov[name].append(hit[y >= 20].mean())
    assert abs(np.mean(rare_cov["bands"]) - 0.9) < 0.02, rare_cov
    assert np.mean(rare_cov["marginal"]) < 0.85 and np.mean(rare_cov["class"]) < 0.85
    again = Conformal.from_dict(Conformal("lac", groups=count_bands(train_counts)).fit(p_cal, y_cal).to_dict())
    assert (again.thresholds(0.9) == conf.thresholds(0.9)).all() and again.calibration == "by 2 groups of classes"


def test_bad_coverage_and_method_are_one_line_errors():
    conf = Conformal().fit(np.full((4, 2), 0.5), np.array([0, 1, 0, 1]))
    for bad in (0, 1, 1.5, -0.1, True, "0.9"):
        with pytest.raises(ValueError, match="coverage must be a number between 0 and 1"):
            conf.predict_set(np.full((1, 2), 0.5), bad)
    with pytest.raises(ValueError, match="lac, aps"):
        Conformal("raps")


def test_unknown_score_flags_far_images_and_accepts_the_stated_share_of_known_ones():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(5, 32)) * 3
    train = (centres[rng.integers(0, 5, 1000)] + rng.normal(size=(1000, 32))).astype(np.float32)
    known = (centres[rng.integers(0, 5, 500)] + rng.normal(size=(500, 32))).astype(np.float32)
    far = (rng.normal(size=(3, 32)) * 3)[rng.integers(0, 3, 500)] + rng.normal(size=(500, 32))
    det = UnknownScore(k=10, accept=0.95).fit(train)
    assert 0.92 <= 1 - det.is_unknown(known).mean() <= 0.98  # about 95% of known images accepted
    assert det.is_unknown(far).mean() > 0.9


def test_the_unknown_flag_accepts_the_stated_share_of_known_images_and_flags_flat_ones():
    """The flag a saved model raises reads the top probability: 95% of fresh known images pass (the level is set on
    the calibration images), an image whose probabilities are flat (like no class) is flagged; it survives saving."""
    rng = np.random.default_rng(3)
    y, proba = _draw(rng, 4000)
    conf = Conformal("lac").fit(proba, y)
    _, fresh = _draw(rng, 20000)
    accepted = 1 - conf.is_unknown(fresh).mean()
    assert accepted == pytest.approx(0.95, abs=0.01)
    flat = np.full((3, proba.shape[1]), 1 / proba.shape[1])
    assert conf.is_unknown(flat).all() and 0 < conf.unknown_threshold() < 1
    again = Conformal.from_dict(conf.to_dict())
    assert again.unknown_threshold() == conf.unknown_threshold()
    old = {k: v for k, v in conf.to_dict().items() if k != "top_proba"}  # a calibration saved before the flag
    assert Conformal.from_dict(old).is_unknown(flat) is None
