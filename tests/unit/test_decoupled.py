import numpy as np
import pytest

from finegrain.heads import create_classifier
from finegrain.heads.decoupled import (
    LinearHead,
    LogitAdjusted,
    TauNormalized,
    choose_tau,
    class_weights_for_sampling,
)


@pytest.fixture
def longtail():
    """Gaussian classes with a long-tailed training set (40 .. 3 a class) and a balanced test set."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 8)) * 1.2
    counts = [40, 30, 15, 8, 5, 3]
    X = np.concatenate([centres[c] + rng.normal(size=(n, 8)) for c, n in enumerate(counts)]).astype(np.float32)
    y = np.repeat(np.arange(6), counts)
    Xte = np.concatenate([centres[c] + rng.normal(size=(200, 8)) for c in range(6)]).astype(np.float32)
    return X, y, Xte, np.repeat(np.arange(6), 200), np.array(counts)


def _balanced_acc(clf, X, y):
    p = clf.predict(X)
    return np.mean([np.mean(p[y == c] == c) for c in np.unique(y)])


def test_sampling_weights():
    codes = np.array([0, 0, 0, 1])
    np.testing.assert_allclose(class_weights_for_sampling(codes, "instance"), [0.25] * 4)
    w = class_weights_for_sampling(codes, "class-balanced")
    assert np.isclose(w[:3].sum(), 0.5) and np.isclose(w[3], 0.5)
    with pytest.raises(ValueError, match="class-balanced"):
        class_weights_for_sampling(codes, "uniform")


def test_logit_adjustment_and_tau_norm_reduce_to_the_base_at_zero(longtail):
    X, y, Xte, _, counts = longtail
    probe = create_classifier("probe").fit(X, y)
    np.testing.assert_allclose(
        TauNormalized(probe, tau=0).fit().decision_function(Xte), probe.decision_function(Xte), rtol=1e-5, atol=1e-5
    )
    la = LogitAdjusted(probe, tau=1.0, class_counts=counts).fit()
    diff = la.decision_function(Xte) - probe.decision_function(Xte)
    np.testing.assert_allclose(diff, np.broadcast_to(-np.log(counts / counts.sum()), diff.shape), rtol=1e-5)


def test_posthoc_adjustment_helps_the_tail(longtail):
    X, y, Xte, yte, counts = longtail
    probe = create_classifier("probe").fit(X, y)
    tau, scores = choose_tau(lambda t: LogitAdjusted(probe, tau=t, class_counts=counts), [0, 0.5, 1, 1.5], X, y)
    assert set(scores) == {0.0, 0.5, 1.0, 1.5}
    adjusted = LogitAdjusted(probe, tau=1.0, class_counts=counts).fit()
    assert _balanced_acc(adjusted, Xte, yte) >= _balanced_acc(probe, Xte, yte)


def test_crt_and_lws_train_and_predict(longtail):
    X, y, Xte, yte, counts = longtail
    crt = LinearHead(sampler="class-balanced", epochs=50).fit(X, y)
    assert crt.coef_.shape == (6, 8) and _balanced_acc(crt, Xte, yte) > 0.6
    probe = create_classifier("probe").fit(X, y)
    lws = LinearHead(scales_only=True, init=probe, epochs=20).fit(X, y)
    np.testing.assert_allclose(lws.coef_, lws.scales_[:, None] * probe.coef_, rtol=1e-5)
    with pytest.raises(ValueError, match="init"):
        LinearHead(scales_only=True).fit(X, y)
