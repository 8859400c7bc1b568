"""Normalizers are scikit-learn transformers: clone, get/set_params, pipelines, fit on train only."""

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.utils.validation import check_is_fitted

from finegrain.embed import NORMALIZERS, create_normalizer
from finegrain.errors import FinegrainError


def _l2(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 16)) * 3.0
    y = np.repeat(np.arange(3), 30)
    X = centers[y] + rng.normal(size=(90, 16)) @ rng.normal(size=(16, 16)) * 0.3 + 5.0  # off-centre, correlated
    order = rng.permutation(90)
    X, y = X[order].astype(np.float32), y[order]
    return X[:60], y[:60], X[60:], y[60:]


@pytest.mark.parametrize("name", NORMALIZERS.names())
def test_clone_and_params_round_trip(name, data):
    X, y, _, _ = data
    n = create_normalizer(name)
    assert not [k for k in vars(n) if k.endswith("_")]  # __init__ only stores parameters
    params = n.get_params()
    twin = clone(n)
    assert type(twin) is type(n) and twin is not n and twin.get_params() == params
    assert n.set_params(**params) is n and n.get_params() == params
    fitted = clone(n).fit(X)
    assert not [k for k in vars(clone(fitted)) if k.endswith("_")]  # clone drops fitted state
    np.testing.assert_array_equal(n.fit_transform(X), fitted.transform(X))


def test_pca_params_are_sklearn_params():
    w = create_normalizer("pca-whiten:7", shrinkage=0.5)
    assert w.get_params() == {"n_components": 7, "shrinkage": 0.5, "eps": 1e-6, "l2_after": True}
    assert clone(w.set_params(l2_after=False)).l2_after is False


@pytest.mark.parametrize("name", NORMALIZERS.names())
def test_pipeline_with_logistic_regression(name, data):
    X, y, Xt, yt = data
    pipe = make_pipeline(create_normalizer(name), LogisticRegression(max_iter=1000))
    assert pipe.fit(X, y) is pipe
    pred = pipe.predict(Xt)
    assert pred.shape == yt.shape and np.mean(pred == yt) > 0.9
    np.testing.assert_allclose(pipe.predict_proba(Xt).sum(1), 1.0, rtol=1e-6)


def test_grid_search_over_a_normalizer_parameter(data):
    X, y, _, _ = data
    pipe = make_pipeline(create_normalizer("pca-whiten"), LogisticRegression(max_iter=1000))
    search = GridSearchCV(pipe, {"pcawhitening__n_components": [2, 8]}, cv=3).fit(X, y)
    assert search.best_params_["pcawhitening__n_components"] in (2, 8)


def test_transforms_match_their_definitions(data):
    X, _, Xt, _ = data
    np.testing.assert_array_equal(create_normalizer("none").transform(X), X)
    l2 = create_normalizer("l2").transform(Xt)
    np.testing.assert_allclose(l2, _l2(Xt), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(l2, axis=1), 1.0, rtol=1e-6)
    cl2n = create_normalizer("cl2n").fit(X)
    np.testing.assert_allclose(cl2n.transform(Xt), _l2(Xt - X.mean(0)), rtol=1e-5, atol=1e-6)
    white = create_normalizer("pca-whiten", n_components=5, shrinkage=0.0, l2_after=False).fit(X)
    Z = white.transform(X)
    np.testing.assert_allclose(Z.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.cov(Z, rowvar=False), np.eye(5), atol=1e-3)  # whitened train: identity covariance
    unit = create_normalizer("pca-whiten", n_components=5).fit(X).transform(Xt)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)


def test_statistics_come_from_fit_rows_only(data):
    X, _, Xt, _ = data
    shifted = Xt + 10.0  # test rows far from train: their own statistics would differ
    cl2n = create_normalizer("cl2n").fit(X)
    np.testing.assert_allclose(cl2n.transform(shifted), _l2(shifted - X.mean(0)), rtol=1e-5, atol=1e-6)
    white = create_normalizer("pca-whiten", n_components=5).fit(X)
    state = {k: v.copy() for k, v in white.get_state().items()}
    out = white.transform(shifted)
    for k, v in white.get_state().items():
        np.testing.assert_array_equal(v, state[k])  # transform learns nothing
    refit = create_normalizer("pca-whiten", n_components=5).fit(shifted)
    assert not np.allclose(refit.transform(shifted), out)
    pipe = make_pipeline(create_normalizer("cl2n"), LogisticRegression()).fit(X, np.arange(len(X)) % 2)
    np.testing.assert_allclose(pipe[0].mean_, X.mean(0), rtol=1e-5)


def test_stateful_normalizers_refuse_to_transform_unfitted(data):
    X, _, _, _ = data
    for name in ("cl2n", "pca-whiten"):
        with pytest.raises(NotFittedError):
            create_normalizer(name).transform(X)
    for name in ("none", "l2"):  # stateless: nothing to fit, and scikit-learn knows it
        check_is_fitted(create_normalizer(name))
        assert create_normalizer(name).transform(X).shape == X.shape


def test_bad_parameters_raise_in_fit(data):
    X, _, _, _ = data
    w = create_normalizer("pca-whiten", shrinkage=-1.0)  # construction never validates, like scikit-learn
    with pytest.raises(ValueError, match="shrinkage"):
        w.fit(X)


def test_factory_drops_none_and_rejects_unknown_keywords():
    assert create_normalizer("pca-whiten", n_components=None, shrinkage=None).get_params()["n_components"] == 256
    assert create_normalizer("pca-whiten:3", n_components=None).n_components == 3
    with pytest.raises(ValueError, match="n_component.*valid: n_components, shrinkage, eps, l2_after"):
        create_normalizer("pca-whiten", n_component=3)
    with pytest.raises(TypeError, match="no parameter n_components"):  # Python's convention holds too
        create_normalizer("l2", n_components=3)
    with pytest.raises(FinegrainError, match="cl2n, l2, none, pca-whiten"):
        create_normalizer("zscore")
