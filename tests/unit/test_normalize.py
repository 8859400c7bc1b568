import numpy as np
import pytest

from finegrain.embed import NORMALIZERS, create_normalizer
from finegrain.errors import FinegrainError


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(40, 6)) @ rng.normal(size=(6, 16)) + 3.0  # correlated, off-centre: like CNN features
    return A.astype(np.float32), (rng.normal(size=(10, 16)) + 3.0).astype(np.float32)


@pytest.mark.parametrize("name", NORMALIZERS.names())
def test_every_normalizer_fits_on_train_and_transforms_new_rows(name, data):
    train, test = data
    n = create_normalizer(name)
    assert n.fit(train) is n
    out = n.transform(test)
    assert out.dtype == np.float32 and out.shape[0] == 10 and np.isfinite(out).all()
    state = n.get_state()
    clone = create_normalizer(name).set_state(state)
    np.testing.assert_allclose(clone.transform(test), out, rtol=1e-6)
    if name != "none":
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_state_depends_on_training_rows_only(data):
    train, test = data
    a = create_normalizer("cl2n").fit(train)
    b = create_normalizer("cl2n").fit(np.concatenate([train, test]))
    np.testing.assert_allclose(a.mean_, train.mean(0), rtol=1e-5)
    assert not np.allclose(a.mean_, b.mean_)


def test_pca_whitening_decorrelates_training_features(data):
    train, _ = data
    w = create_normalizer("pca-whiten", n_components=5, shrinkage=0.0, l2_after=False).fit(train)
    Z = w.transform(train)
    cov = np.cov(Z, rowvar=False)
    np.testing.assert_allclose(cov, np.eye(5), atol=1e-3)
    shrunk = create_normalizer("pca-whiten", n_components=5, l2_after=False).fit(train).transform(train)
    var = np.var(shrunk, axis=0)
    assert np.all(var < 1.0) and var[0] > var[-1]  # regularised: large directions keep more of their variance
    assert create_normalizer("pca-whiten:3").fit(train).transform(train).shape == (40, 3)
    assert create_normalizer("pca-whiten:500").fit(train).components_.shape[1] <= 16  # capped at min(N-1, D)


def test_unknown_normalizer_lists_valid_ones():
    with pytest.raises(FinegrainError, match="cl2n"):
        create_normalizer("zscore")
