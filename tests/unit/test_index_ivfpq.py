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


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact)]))


@pytest.fixture
def on_disk(tmp_path):
    X = _gallery()
    path = tmp_path / "gallery.f32"
    X.tofile(path)
    return np.memmap(path, dtype=np.float32, mode="r", shape=X.shape)


def test_ivfpq_recall_at_10_with_rerank_from_the_memory_map(on_disk):
    queries = _gallery(200, seed=1)
    _, exact = NumpyIndex("cosine").add(np.asarray(on_disk)).search(queries, 10)
    index = build_index(on_disk, kind="ivfpq", m=16, nprobe=16)
    assert isinstance(index, FaissIndex) and index.m_ == 16
    assert index.bytes_per_vector == 16 + 8  # the code and the id: the vectors stay on disk
    scores, found = index.search(queries, 10)
    assert _recall(found, exact) >= 0.9
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    plain = FaissIndex("cosine", kind="ivfpq", m=16).add(np.asarray(on_disk))  # in memory: no re-rank source
    assert plain.search(queries, 10)[1].shape == (200, 10)


def test_ivfpq_l2_and_hnsw(on_disk):
    queries = _gallery(100, seed=2)
    _, exact = NumpyIndex("l2").add(np.asarray(on_disk)).search(queries, 10)
    _, found = FaissIndex("l2", kind="ivfpq", m=16, nprobe=16).add(on_disk).search(queries, 10)
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


def test_bad_ivfpq_parameters():
    with pytest.raises(ValueError, match="divide"):
        FaissIndex(kind="ivfpq", m=7).add(_gallery(500))
    with pytest.raises(ValueError):
        FaissIndex(kind="pq")


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
