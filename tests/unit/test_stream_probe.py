"""The streaming probe (heads/stream_probe.py): loss goes down, memory stays bounded, it agrees with L-BFGS."""

from __future__ import annotations

import numpy as np
import pytest

from finegrain.errors import FinegrainError
from finegrain.heads.probe import LogisticProbe
from finegrain.heads.stream_probe import StoreRows, StreamingProbe, choose_solver


def _clustered(n: int, d: int = 16, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, d)) * 1.5
    y = rng.integers(0, classes, n)
    return (centers[y] + rng.normal(size=(n, d))).astype(np.float32), y


@pytest.fixture
def memmap(tmp_path):
    X, y = _clustered(4000)
    path = tmp_path / "features.f32"
    X[:3000].tofile(path)
    return np.memmap(path, dtype=np.float32, mode="r", shape=(3000, X.shape[1])), y[:3000], X[3000:]


def test_loss_decreases_and_rows_held_stay_bounded(memmap):
    X, y, _ = memmap
    probe = StreamingProbe(Cs=(0.1, 1.0), chunk_rows=256, batch_size=64, epochs=4).fit(X, y)
    assert probe.loss_curve_[-1] < probe.loss_curve_[0]
    assert probe.max_rows_held_ <= 256 < len(X)  # never more than one chunk of the store in memory
    assert probe.C_ in (0.1, 1.0) and set(probe.val_scores_) == {0.1, 1.0}
    assert (probe.predict(X[:500]) == y[:500]).mean() > 0.85
    proba = probe.predict_proba(X[:10])
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-6)


def test_agrees_with_the_lbfgs_probe_and_reads_store_rows(memmap):
    X, y, Xt = memmap
    rows = np.arange(0, 3000, 2)[::-1].copy()  # a view in any order
    view = StoreRows(X, rows)
    np.testing.assert_array_equal(view[np.arange(5)], np.asarray(X)[rows[:5]])
    stream = StreamingProbe(Cs=(1.0,), chunk_rows=500, epochs=30, random_state=1).fit(view, y[rows])
    full = LogisticProbe(Cs=(1.0,)).fit(np.asarray(X)[rows], y[rows])
    assert (stream.predict(Xt) == full.predict(Xt)).mean() >= 0.97
    assert stream.coef_.shape == full.coef_.shape


def test_bad_parameters_and_solver_choice():
    X, y = _clustered(100)
    for bad in ({"Cs": ()}, {"batch_size": 0}, {"normalize": "pca"}, {"lr": 0}):
        with pytest.raises(ValueError):
            StreamingProbe(**bad).fit(X, y)
    with pytest.raises(ValueError, match="2 classes"):
        StreamingProbe().fit(X, np.zeros(100))
    assert choose_solver("auto", 1000, 1280) == "lbfgs"
    assert choose_solver("auto", 3_000_000, 1280) == "stream"
    assert choose_solver("lbfgs", 3_000_000, 1280) == "lbfgs"
    with pytest.raises(FinegrainError):
        choose_solver("adam", 10, 10)


def test_cli_probe_solver_stream(tmp_path, train_data, tiny_backbone):
    """`finegrain probe STORE --solver stream`: the streaming probe over the memory map, a model folder out."""
    import json
    import os

    from finegrain.cli.main import main
    from finegrain.data import load_image_set
    from finegrain.embed import extract_to_store

    store = str(tmp_path / "store")
    extract_to_store(load_image_set(train_data), tiny_backbone, store, progress=False, num_workers=0, runtime="torch")
    out = str(tmp_path / "eval")
    assert main(["probe", store, "--solver", "stream", "--out", out]) == 0
    metrics = json.loads(open(os.path.join(out, "metrics.json")).read())
    assert metrics["solver"] == "stream" and 0 <= metrics["top1"] <= 1
    assert os.path.exists(os.path.join(out, "model", "model.json"))
    assert main(["probe", store, "--solver", "stream", "--norm", "cl2n"]) == 2  # one line, no traceback


def test_cli_on_a_store_larger_than_memory(tmp_path, train_data, tiny_backbone, monkeypatch):
    """Above the in-memory limit (patched down to nothing): probe streams and knn searches through IVF-PQ."""
    import json
    import os

    import finegrain.heads.stream_probe as sp
    from finegrain.cli.main import main
    from finegrain.data import load_image_set
    from finegrain.embed import extract_to_store

    store = str(tmp_path / "store")
    extract_to_store(load_image_set(train_data), tiny_backbone, store, progress=False, num_workers=0, runtime="torch")
    monkeypatch.setattr(sp, "dense_fits", lambda n_rows, dim: False)
    assert main(["probe", store, "--out", str(tmp_path / "p")]) == 0
    assert json.loads((tmp_path / "p" / "metrics.json").read_text())["solver"] == "stream"
    assert main(["knn", store, "-k", "3", "--out", str(tmp_path / "k")]) == 0
    metrics = json.loads((tmp_path / "k" / "metrics.json").read_text())
    assert "ivfpq" in metrics["classifier"] and 0 <= metrics["top1"] <= 1
    assert os.path.exists(tmp_path / "k" / "predictions.csv")
