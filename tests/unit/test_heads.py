"""Classifiers on embeddings and nearest-neighbour search: a contract suite over every registered classifier,
then the behaviour of each one against scikit-learn or a hand computation."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import finegrain.heads.probe as probe_module
from finegrain.data.splits import stratified_split
from finegrain.errors import FinegrainError
from finegrain.heads import (
    CLASSIFIERS,
    FaissIndex,
    KNNClassifier,
    LogisticProbe,
    NearestClassMean,
    NumpyIndex,
    build_index,
    create_classifier,
)

faiss = pytest.importorskip("faiss")

BAD_PARAMS = {
    "knn": [
        {"n_neighbors": 0},
        {"n_neighbors": 2.5},
        {"metric": "manhattan"},
        {"weights": "gaussian"},
        {"temperature": 0},
        {"backend": "annoy"},
    ],
    "ncm": [{"metric": "dot"}, {"temperature": -1.0}],
    "probe": [{"Cs": ()}, {"Cs": (1.0, -1.0)}, {"val_size": 0.0}, {"val_size": 1.0}, {"max_iter": 0}],
}


def blobs(n_per_class: int, labels: list[int], dim: int = 16, *, spread: float = 1.0, seed: int = 0):
    """Gaussian blobs around random centres: X [n_per_class * len(labels), dim] float32, y [N] with the given labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(len(labels), dim))
    y = np.repeat(np.asarray(labels), n_per_class)
    X = centres[np.repeat(np.arange(len(labels)), n_per_class)] + spread * rng.normal(size=(len(y), dim))
    perm = rng.permutation(len(y))
    return X[perm].astype(np.float32), y[perm]


@pytest.fixture(scope="module")
def data():
    labels = [-3, 7, 42, 1000]  # deliberately not 0..C-1
    X, y = blobs(40, labels, seed=1)
    return X[:120], y[:120], X[120:], y[120:]


# --- contract suite, every registered classifier ---------------------------------------------------------------


def test_every_classifier_is_in_the_contract_suite():
    assert set(CLASSIFIERS.names()) == set(BAD_PARAMS) == {"knn", "ncm", "probe"}


@pytest.mark.parametrize("name", CLASSIFIERS.names())
def test_contract_fit_predict(name, data):
    X_train, y_train, X_test, y_test = data
    X_before = X_train.copy()
    clf = create_classifier(name)
    assert clf.fit(X_train, y_train) is clf
    np.testing.assert_array_equal(X_train, X_before)  # the caller's array is not modified
    np.testing.assert_array_equal(clf.classes_, [-3, 7, 42, 1000])
    assert clf.n_features_in_ == X_train.shape[1]
    proba = clf.predict_proba(X_test)
    assert proba.shape == (len(X_test), 4)
    assert (proba >= 0).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    pred = clf.predict(X_test)
    assert pred.shape == (len(X_test),)
    np.testing.assert_array_equal(pred, clf.classes_[np.argmax(proba, axis=1)])
    assert set(pred) <= set(clf.classes_.tolist())
    assert np.mean(pred == y_test) > 0.9  # well separated blobs


@pytest.mark.parametrize("name", CLASSIFIERS.names())
def test_contract_params_are_sklearn_params(name):
    clf = CLASSIFIERS.get(name)()
    assert not [k for k in vars(clf) if k.endswith("_")]  # __init__ only stores parameters
    twin = clone(clf)
    assert twin.get_params() == clf.get_params()


@pytest.mark.parametrize("name", CLASSIFIERS.names())
def test_contract_bad_params_raise_value_error(name, data):
    X_train, y_train, _, _ = data
    for params in BAD_PARAMS[name]:
        clf = CLASSIFIERS.get(name)(**params)  # construction never validates, like scikit-learn
        with pytest.raises(ValueError, match="must be"):
            clf.fit(X_train, y_train)


@pytest.mark.parametrize("name", CLASSIFIERS.names())
def test_contract_input_checks(name, data):
    X_train, y_train, X_test, _ = data
    clf = create_classifier(name)
    with pytest.raises(NotFittedError):
        clf.predict(X_test)
    with pytest.raises(ValueError, match="labels"):
        clf.fit(X_train, y_train[:-1])
    clf.fit(X_train, y_train)
    with pytest.raises(ValueError, match="features"):
        clf.predict_proba(X_test[:, :-1])


def test_create_classifier_drops_none_and_rejects_unknown():
    clf = create_classifier("knn", n_neighbors=None, weights="uniform")
    assert clf.n_neighbors == 10 and clf.weights == "uniform"
    with pytest.raises(FinegrainError, match="knn, ncm, probe"):
        create_classifier("svm")
    with pytest.raises(ValueError, match="n_neighbours"):
        create_classifier("knn", n_neighbours=5)


# --- k-NN ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["numpy", "faiss"])
@pytest.mark.parametrize(("metric", "sk_metric"), [("cosine", "cosine"), ("l2", "euclidean")])
@pytest.mark.parametrize("weights", ["uniform", "distance"])
def test_knn_matches_sklearn(backend, metric, sk_metric, weights):
    rng = np.random.default_rng(3)
    X, y = rng.normal(size=(300, 12)).astype(np.float32), rng.integers(0, 6, 300) * 5
    Q = rng.normal(size=(80, 12)).astype(np.float32)
    ours = KNNClassifier(7, metric=metric, weights=weights, backend=backend).fit(X, y)
    ref = KNeighborsClassifier(7, metric=sk_metric, weights=weights, algorithm="brute").fit(X, y)
    np.testing.assert_allclose(ours.predict_proba(Q), ref.predict_proba(Q), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(ours.predict(Q), ref.predict(Q))
    _, ref_idx = ref.kneighbors(Q, 7)
    assert_same_neighbours(ours.kneighbors(Q)[1], ref_idx, X, Q, metric)


def test_knn_temperature_is_softmax_of_neighbour_similarities():
    rng = np.random.default_rng(4)
    X, y = rng.normal(size=(50, 8)).astype(np.float32), rng.integers(0, 3, 50)
    q = rng.normal(size=(1, 8)).astype(np.float32)
    clf = KNNClassifier(5, weights="temperature", temperature=0.1).fit(X, y)
    Xn, qn = X / np.linalg.norm(X, axis=1, keepdims=True), q[0] / np.linalg.norm(q)
    sims = Xn @ qn
    top = np.argsort(-sims)[:5]
    w = np.exp(sims[top] / 0.1)
    expected = np.array([w[y[top] == c].sum() for c in range(3)]) / w.sum()
    np.testing.assert_allclose(clf.predict_proba(q)[0], expected, rtol=1e-5)


def test_knn_one_neighbour_is_nearest_neighbour_and_k_is_clamped():
    rng = np.random.default_rng(5)
    X, y = rng.normal(size=(30, 6)).astype(np.float32), rng.integers(0, 4, 30)
    Q = rng.normal(size=(20, 6)).astype(np.float32)
    d2 = ((Q[:, None, :] - X[None]) ** 2).sum(-1)
    pred = KNNClassifier(1, metric="l2").fit(X, y).predict(Q)
    np.testing.assert_array_equal(pred, y[np.argmin(d2, axis=1)])
    big = KNNClassifier(100, weights="uniform").fit(X, y)  # more neighbours than samples: vote of all 30
    np.testing.assert_allclose(big.predict_proba(Q[:1])[0], np.bincount(y, minlength=4) / 30)


def test_knn_distance_weights_exact_match_wins():
    X = np.array([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [0.0, 1.1]], dtype=np.float32)
    clf = KNNClassifier(4, metric="l2", weights="distance").fit(X, [0, 1, 1, 1])
    np.testing.assert_allclose(clf.predict_proba(X[:1]), [[1.0, 0.0]])


# --- nearest class mean ----------------------------------------------------------------------------------------


def test_ncm_means_and_decisions():
    X = np.array([[2.0, 0.0], [4.0, 0.0], [0.0, 1.0], [0.0, 3.0]], dtype=np.float32)
    y = np.array([5, 5, 9, 9])
    l2 = NearestClassMean(metric="l2").fit(X, y)
    np.testing.assert_allclose(l2.means_, [[3.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(l2.similarities([[3.0, 1.0]]), [[-1.0, -10.0]])
    np.testing.assert_allclose(l2.decision_function([[3.0, 1.0]]), [-9.0])  # binary: scikit-learn's one score
    assert l2.temperature_ == pytest.approx(2 * (1 + 1 + 1 + 1) / 8)  # 2 * pooled within-class variance
    cos = NearestClassMean(metric="cosine", temperature=0.5).fit(X * [[1.0], [9.0], [1.0], [0.1]], y)
    np.testing.assert_allclose(cos.means_, [[1.0, 0.0], [0.0, 1.0]], atol=1e-7)  # means of unit vectors
    np.testing.assert_allclose(cos.similarities([[1.0, 1.0]]), [[0.5**0.5, 0.5**0.5]], rtol=1e-6)
    np.testing.assert_allclose(cos.predict_proba([[1.0, 0.0]]), [[1 / (1 + np.exp(-2)), 1 / (1 + np.exp(2))]])


# --- logistic probe --------------------------------------------------------------------------------------------


def test_probe_selects_C_on_training_data_only(monkeypatch, data):
    X_train, y_train, X_test, _ = data
    train_rows = {row.tobytes() for row in X_train}
    test_rows = {row.tobytes() for row in X_test}
    seen = []

    class SpyLogisticRegression(LogisticRegression):
        def fit(self, X, y, sample_weight=None):
            seen.append(("fit", X))
            return super().fit(X, y, sample_weight)

        def predict_proba(self, X):
            seen.append(("score", X))
            return super().predict_proba(X)

    monkeypatch.setattr(probe_module, "LogisticRegression", SpyLogisticRegression)
    Cs = (0.01, 1.0, 100.0)
    probe = LogisticProbe(Cs=Cs, standardize=False).fit(X_train, y_train)
    probe.predict(X_test)  # prediction never goes through a scikit-learn model

    rows = {kind: {r.tobytes() for _, X in seen if _ == kind for r in X} for kind in ("fit", "score")}
    assert rows["fit"] <= train_rows and rows["score"] <= train_rows
    assert not (rows["fit"] | rows["score"]) & test_rows
    selection_fit = {r.tobytes() for kind, X in seen[:-1] if kind == "fit" for r in X}
    assert not selection_fit & rows["score"]  # validation rows are held out from the selection fits
    assert len(seen[-1][1]) == len(X_train) and seen[-1][0] == "fit"  # refit on all training data
    assert set(probe.val_scores_) == set(Cs)
    assert probe.val_scores_[probe.C_] == max(probe.val_scores_.values())
    expected_val = sum(min(round(0.2 * n), n - 1) for n in np.unique(y_train, return_counts=True)[1])
    assert sum(len(X) for kind, X in seen if kind == "score") == expected_val * len(Cs)


def test_probe_matches_sklearn_with_the_chosen_C(data):
    X_train, y_train, X_test, _ = data
    probe = LogisticProbe(Cs=(0.05,)).fit(X_train, y_train)
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=1000)).fit(X_train, y_train)
    np.testing.assert_allclose(probe.predict_proba(X_test), ref.predict_proba(X_test), atol=1e-4)
    assert probe.coef_.shape == (4, X_train.shape[1]) and probe.intercept_.shape == (4,)


def test_probe_binary_logits_have_two_columns_and_the_decision_function_one():
    X, y = blobs(20, [3, 8], spread=3.0, seed=2)
    probe = LogisticProbe(Cs=(1.0,), standardize=False).fit(X, y)
    ref = LogisticRegression(C=1.0, max_iter=1000).fit(X, y)
    assert probe.logits(X).shape == (40, 2) and probe.decision_function(X).shape == (40,)  # as scikit-learn's
    np.testing.assert_allclose(probe.decision_function(X), ref.decision_function(X), atol=1e-3)
    np.testing.assert_allclose(probe.predict_proba(X), ref.predict_proba(X), atol=1e-4)


def test_probe_survives_singleton_classes_and_is_deterministic():
    X, y = blobs(12, [0, 1, 2], seed=3)
    X = np.vstack([X, np.full((2, X.shape[1]), 5.0, np.float32)])
    y = np.concatenate([y, [7, 9]])  # two classes with a single sample each
    a = LogisticProbe(Cs=(0.1, 1.0, 10.0)).fit(X, y)
    b = LogisticProbe(Cs=(0.1, 1.0, 10.0)).fit(X, y)
    np.testing.assert_array_equal(a.classes_, [0, 1, 2, 7, 9])
    assert a.C_ == b.C_ and a.val_scores_ == b.val_scores_
    with pytest.warns(UserWarning, match="validation"):
        only_singletons = LogisticProbe(Cs=(0.1, 1.0, 10.0)).fit(X[:3], [0, 1, 2])
    assert only_singletons.C_ == 1.0


def test_stratified_split_keeps_every_class_in_training():
    codes = np.array([0] * 10 + [1] * 3 + [2] * 2 + [3])
    train, val = stratified_split(codes, test_size=0.2, seed=0, min_test=0)
    assert not set(train) & set(val) and len(train) + len(val) == len(codes)
    np.testing.assert_array_equal(np.bincount(codes[val], minlength=4), [2, 1, 0, 0])
    assert set(codes[train]) == {0, 1, 2, 3}


def test_probe_parallel_Cs_agree_with_sequential(data):
    X_train, y_train, _, _ = data
    seq = LogisticProbe(Cs=(0.01, 1.0)).fit(X_train, y_train)
    par = LogisticProbe(Cs=(0.01, 1.0), n_jobs=2).fit(X_train, y_train)
    assert seq.val_scores_ == pytest.approx(par.val_scores_, abs=0.05)


# --- nearest-neighbour search ----------------------------------------------------------------------------------


def exact_sims(X: np.ndarray, Q: np.ndarray, metric: str) -> np.ndarray:
    """[M, N] similarities in float64, computed directly (no |q|^2 - 2 q.x + |x|^2 expansion)."""
    X, Q = X.astype(np.float64), Q.astype(np.float64)
    if metric == "cosine":
        return (Q / np.linalg.norm(Q, axis=1, keepdims=True)) @ (X / np.linalg.norm(X, axis=1, keepdims=True)).T
    return -((Q[:, None, :] - X[None]) ** 2).sum(-1)


def brute_force(X: np.ndarray, Q: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    sims = exact_sims(X, Q, metric)
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, idx, axis=1), idx


def assert_same_neighbours(idx, ref_idx, X, Q, metric: str, *, rtol: float = 1e-5) -> None:
    """idx ranks the gallery X for the queries Q like ref_idx: the same index at every rank, except where the two
    indices are a near-tie (exact similarities within rtol), whose order float32 rounding may swap.

    Scores from float32 BLAS differ in the last bits between CPUs (AVX2 vs AVX-512 kernels), so a near-tie may
    come out in either order; neighbours further apart than rtol never swap, and there this is exact equality.
    """
    idx, ref_idx = np.asarray(idx), np.asarray(ref_idx)
    assert idx.shape == ref_idx.shape
    assert all(len(set(row)) == len(row) for row in idx.tolist())  # no neighbour twice
    sims = exact_sims(X, Q, metric)
    ours, ref = np.take_along_axis(sims, idx, axis=1), np.take_along_axis(sims, ref_idx, axis=1)
    tied = np.abs(ours - ref) <= rtol * np.maximum(1.0, np.abs(ref))
    assert ((idx == ref_idx) | tied).all(), f"ranks differ beyond near-ties at {np.argwhere(~tied)[:5].tolist()}"


@pytest.fixture(scope="module")
def gallery():
    rng = np.random.default_rng(7)
    return rng.normal(size=(500, 24)).astype(np.float32), rng.normal(size=(60, 24)).astype(np.float32)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_numpy_and_faiss_flat_agree_with_brute_force(metric, gallery):
    X, Q = gallery
    ref_scores, ref_idx = brute_force(X, Q, 10, metric)
    for index in (NumpyIndex(metric).add(X), FaissIndex(metric, kind="flat").add(X)):
        scores, idx = index.search(Q, 10)
        assert scores.dtype == np.float32 and idx.dtype == np.int64 and idx.shape == (60, 10)
        assert_same_neighbours(idx, ref_idx, X, Q, metric)
        np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-3)
        assert (np.diff(scores, axis=1) <= 0).all()


def test_cosine_ignores_scale_and_l2_does_not(gallery):
    X, Q = gallery
    scaled = X * np.linspace(0.1, 10, len(X), dtype=np.float32)[:, None]
    for backend in ("numpy", "faiss"):
        cos, cos_scaled = (build_index(G, metric="cosine", backend=backend).search(Q, 5) for G in (X, scaled))
        assert_same_neighbours(cos_scaled[1], cos[1], X, Q, "cosine")
        l2, l2_scaled = (build_index(G, metric="l2", backend=backend).search(Q, 5) for G in (X, scaled))
        assert (l2[1] != l2_scaled[1]).any()
        assert (l2[0] <= 0).all() and (cos[0] <= 1 + 1e-6).all()


def test_chunked_search_equals_unchunked_and_inputs_are_not_modified(gallery):
    X, Q = gallery
    X_before, Q_before = X.copy(), Q.copy()
    for metric in ("cosine", "l2"):
        whole = NumpyIndex(metric).add(X).search(Q, 8)
        chunked = NumpyIndex(metric, chunk_size=7).add(X).search(Q, 8)
        # A [7, N] block and a [60, N] one go through different BLAS kernels: the scores may differ in the last
        # bit (1.2e-7 with OpenBLAS's AVX2 kernels), so near-tied neighbours may swap; compare up to rounding.
        assert_same_neighbours(chunked[1], whole[1], X, Q, metric)
        np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(X, X_before)  # exact: the index copies its inputs, it never writes to them
    np.testing.assert_array_equal(Q, Q_before)


def test_add_twice_and_k_clamped(gallery):
    X, Q = gallery
    X_before = X.copy()
    for metric in ("cosine", "l2"):
        expected = NumpyIndex(metric).add(X).search(Q, 5)[1]
        for index in (NumpyIndex(metric), FaissIndex(metric), FaissIndex(metric, kind="ivf", nprobe=1000)):
            index.add(X[:200]).add(X[200:])
            assert_same_neighbours(index.search(Q, 5)[1], expected, X, Q, metric)
    np.testing.assert_array_equal(X, X_before)
    small = NumpyIndex().add(X[:3])
    scores, idx = small.search(Q, 10)
    assert idx.shape == (60, 3) and sorted(idx[0]) == [0, 1, 2]
    assert FaissIndex().add(X[:3]).search(Q, 10)[1].shape == (60, 3)


def test_ivf_recall_on_clustered_data():
    rng = np.random.default_rng(8)
    centres = rng.normal(scale=4.0, size=(64, 32))
    X = (centres[rng.integers(0, 64, 20000)] + rng.normal(size=(20000, 32))).astype(np.float32)
    Q = (centres[rng.integers(0, 64, 200)] + rng.normal(size=(200, 32))).astype(np.float32)
    exact = NumpyIndex("cosine").add(X).search(Q, 10)[1]
    ivf = build_index(X, metric="cosine", kind="ivf", nprobe=16)
    assert isinstance(ivf, FaissIndex) and ivf.nlist_ == min(round(4 * 20000**0.5), 20000 // 39)
    approx = ivf.search(Q, 10)[1]
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)])
    assert recall > 0.9


def test_build_index_choices_and_errors(gallery):
    X, Q = gallery
    assert isinstance(build_index(X), NumpyIndex)  # exact search: numpy, by rule, at any size
    big = np.zeros((4097, 2), np.float32) + 1
    assert isinstance(build_index(big), NumpyIndex) and isinstance(build_index(big, kind="hnsw"), FaissIndex)
    with pytest.raises(ValueError, match="cosine, l2"):
        build_index(X, metric="dot")
    with pytest.raises(ValueError, match="auto, numpy, faiss"):
        build_index(X, backend="scann")
    with pytest.raises(ValueError, match="faiss"):
        build_index(X, backend="numpy", kind="ivf")
    with pytest.raises(ValueError, match="k must be"):
        NumpyIndex().add(X).search(Q, 0)
    with pytest.raises(ValueError, match="empty"):
        NumpyIndex().search(Q, 1)
    with pytest.raises(ValueError, match="features"):
        FaissIndex().add(X).search(Q[:, :5], 1)
