"""Compressed and graph search (heads/index.py): IVF-PQ with an exact re-rank from the memory map, HNSW, and the
measured choice between the exact backends."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("faiss")

from finegrain.heads.index import FaissIndex, NumpyIndex, build_index, choose_exact_backend  # noqa: E402


def _gallery(n: int = 6000, d: int = 64, seed: int = 0) -> np.ndarray:
    """Clustered vectors of low intrinsic dimension, like real embeddings."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(16, d))
    centers = rng.normal(size=(50, 16)) * 2
    z = centers[rng.integers(0, 50, n)] + rng.normal(size=(n, 16))
    return (z @ basis + 0.1 * rng.normal(size=(n, d))).astype(np.float32)


def _wide(n: int = 8000, d: int = 768, seed: int = 0) -> np.ndarray:
    """bench/scale.py's store in small: classes in a 32-d latent through one random ReLU map to D."""
    fixed = np.random.default_rng(99)  # the same classes and map for the gallery and the queries
    basis, centers = fixed.normal(size=(32, d)) / np.sqrt(32), fixed.normal(size=(100, 32))
    rng = np.random.default_rng(seed)
    z = centers[rng.integers(0, 100, n)] + rng.normal(size=(n, 32))
    return np.maximum(z @ basis + 0.05 * rng.normal(size=(n, d)), 0).astype(np.float32)


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact)]))


@pytest.fixture
def on_disk(tmp_path):
    X = _gallery()
    path = tmp_path / "gallery.f32"
    X.tofile(path)
    return np.memmap(path, dtype=np.float32, mode="r", shape=X.shape)


def test_ivfpq_defaults_reach_recall_at_10_of_0_9_from_the_memory_map(tmp_path):
    """The parameters FaissIndex picks for a wide gallery (PCA 64, 64 4-bit fast-scan codes = 32 bytes, a quarter of
    the cells, re-rank x10 from the map) on a small copy of the benchmark's distribution."""
    X = _wide()
    X.tofile(tmp_path / "wide.f32")
    on_disk = np.memmap(tmp_path / "wide.f32", dtype=np.float32, mode="r", shape=X.shape)
    queries = _wide(300, seed=1)
    _, exact = NumpyIndex("cosine").add(X).search(queries, 10)
    index = build_index(on_disk, kind="ivfpq")
    assert isinstance(index, FaissIndex) and (index.pca_, index.m_, index.code_bytes) == (64, 64, 32)
    assert 32 + 8 < index.bytes_per_vector < 32 + 8 + 100  # + the PCA and centroids, amortized over only 8,000
    scores, found = index.search(queries, 10)
    assert _recall(found, exact) >= 0.9
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    best = NumpyIndex("cosine").add(X).search(queries, 1)[0][:, 0]
    assert np.mean(np.isclose(scores[:, 0], best, atol=1e-5)) >= 0.95  # re-ranked: exact cosines
    plain_scores, plain = FaissIndex("cosine", kind="ivfpq").add(X).search(queries, 10)  # in memory: no re-rank
    assert plain.shape == (300, 10) and _recall(plain, exact) < _recall(found, exact)
    assert np.all(np.abs(plain_scores) <= 1.5)  # approximate cosines, from the squared distances of unit rows


def test_ivfpq_tiny_gallery_and_reload(tmp_path, on_disk):
    """Below 256 vectors plain PQ of fewer bits (k-means needs a point a centroid); a saved index reloads as built."""
    small = FaissIndex(kind="ivfpq").add(_gallery(40))
    assert small.search(_gallery(2, seed=3), 3)[1].shape == (2, 3) and small.pca_ == 0
    index = FaissIndex("l2", kind="ivfpq", m=32).add(on_disk)
    index.save(str(tmp_path / "i.faiss"))
    again = FaissIndex.load(str(tmp_path / "i.faiss"), metric="l2", kind="ivfpq", source=on_disk)
    assert (again.m_, again.pca_, again.nlist_) == (32, 0, index.nlist_)
    q = _gallery(20, seed=4)
    np.testing.assert_array_equal(again.search(q, 10)[1], index.search(q, 10)[1])


def test_ivfpq_l2_and_hnsw(on_disk):
    queries = _gallery(100, seed=2)
    _, exact = NumpyIndex("l2").add(np.asarray(on_disk)).search(queries, 10)
    _, found = FaissIndex("l2", kind="ivfpq", nprobe=16).add(on_disk).search(queries, 10)
    assert _recall(found, exact) >= 0.9
    _, exact_cos = NumpyIndex("cosine").add(np.asarray(on_disk)).search(queries, 10)
    _, hnsw = build_index(np.asarray(on_disk), kind="hnsw").search(queries, 10)
    assert _recall(hnsw, exact_cos) >= 0.9


def test_auto_backend_is_measured_and_cached(tmp_path):
    X = _gallery(5000)
    cache = str(tmp_path / "auto.json")
    pick = choose_exact_backend(X, cache=cache)
    assert pick in ("numpy", "faiss")
    assert list(json.loads(open(cache).read()).values()) == [pick]
    assert choose_exact_backend(X, cache=cache) == pick
    assert build_index(X, kind="flat").search(X[:3], 1)[1][:, 0].tolist() == [0, 1, 2]
    # the default is a rule, not that race: the same backend on every machine
    assert isinstance(build_index(X), NumpyIndex) and isinstance(build_index(X, kind="hnsw"), FaissIndex)


def test_bad_ivfpq_parameters():
    with pytest.raises(ValueError, match="divide"):
        FaissIndex(kind="ivfpq", m=7).add(_gallery(500))
    with pytest.raises(ValueError):
        FaissIndex(kind="pq")
    with pytest.raises(ValueError, match="pca"):
        FaissIndex(kind="ivfpq", pca=-1)


def test_store_larger_than_memory_is_searched_through_a_saved_ivfpq_index(tmp_path):
    """heads/search.disk_index: IVF-PQ over the store's memory map, written beside it and reused."""
    import os

    from finegrain.embed.store import FeatureStore, IndexEntry
    from finegrain.heads.search import disk_index

    X = _gallery(3000)
    store = FeatureStore.create_or_resume(str(tmp_path / "s"), {"fingerprint": "f", "dim": 64, "poolings": ["gap"]})
    rows = store.append({"gap": X}, [f"{i:040x}" for i in range(len(X))])
    store.write_index([IndexEntry(f"{i}.jpg", 0, "train", r, f"{i:040x}") for i, r in enumerate(rows)], [])
    index = disk_index(store, "gap", "l2")
    assert os.path.exists(tmp_path / "s" / "index-ivfpq-gap.faiss")
    again = disk_index(store, "gap", "l2")
    q = X[:20]
    _, exact = NumpyIndex("cosine").add(X).search(q, 10)
    assert _recall(index.search(q, 10)[1], exact) >= 0.9
    np.testing.assert_array_equal(again.search(q, 10)[1], index.search(q, 10)[1])
    with pytest.raises(Exception, match="cosine"):
        disk_index(store, "gap", "cl2n")
