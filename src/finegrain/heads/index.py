"""Nearest-neighbour search over an [N, D] float32 gallery, exact (numpy, faiss flat) or approximate (faiss IVF).

Every index returns similarities, higher = closer: the cosine similarity, or for "l2" the negative squared
euclidean distance, so one top-k convention serves both metrics.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from typing import Protocol

import numpy as np

from finegrain.runtime.faiss_env import import_faiss  # noqa: F401 - re-exported: callers import it from here

METRICS = ("cosine", "l2")
BACKENDS = ("auto", "numpy", "faiss")
FAISS_KINDS = ("flat", "ivf", "ivfpq", "hnsw")
AUTO_PROBE_ROWS = 1 << 15  # auto: both exact backends timed on at most this many gallery rows
# ivfpq defaults, measured on 200k and 1M synthetic vectors of 1280 dims (bench/scale.py) and on cub100: a 4-bit
# code a PCA dimension re-ranks as well as twice the bytes (PCA 128, 128 codes) and far better than 2 dimensions a
# code; the coarse cells, not the codes, bound recall, and fast-scan makes probing a quarter of them cheap.
PCA_DIM = 64  # ivfpq: a gallery wider than 2 x this is PCA-projected to it first (the re-rank uses full vectors)
PQ_SUBQUANTIZERS = 128  # ivfpq: at most this many 4-bit fast-scan codes a vector (one a dimension up to 128)
FAST_SCAN_MIN_N = 256  # ivfpq below this: plain PQ of log2(N) bits (k-means needs points for its centroids)
IVFPQ_PROBE_FRACTION = 1 / 4  # ivfpq: share of the cells probed by default
_TRAIN_MAX = 65536  # ivf / ivfpq: at most this many (seeded, sampled) vectors train the quantizers
DENSE_MAX_BYTES = 2 << 30  # a gallery (or training matrix) above 2 GiB or a quarter of RAM stays on disk


def dense_fits(n_rows: int, dim: int) -> bool:
    """Whether an [n_rows, dim] float32 matrix should be held in memory: at most 2 GiB and a quarter of RAM."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 1 << 40
    return n_rows * dim * 4 <= min(DENSE_MAX_BYTES, ram // 4)


_ADD_BLOCK = 1 << 13  # gallery rows normalised at a time when filling a faiss index
_BLOCK_ELEMENTS = 1 << 23  # per query block: [chunk, N] float32 similarities + argpartition's int64 indices ~ 96 MiB


class Index(Protocol):
    metric: str

    @property
    def ntotal(self) -> int: ...

    def add(self, X: np.ndarray) -> Index: ...

    def search(self, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
    return metric


def as_matrix(X: np.ndarray, *, name: str = "X") -> np.ndarray:
    """Return X as a C-contiguous float32 [N, D] array (no copy when it already is one)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D]; got shape {X.shape}")
    if X.size and not (np.isfinite(X.min()) and np.isfinite(X.max())):  # NaN propagates; no [N, D] mask
        raise ValueError(f"{name} contains NaN or infinite values")
    return X


def l2_normalize(X: np.ndarray) -> np.ndarray:
    """[N, D] -> a new [N, D] float32 array of unit rows (zero rows stay zero): scikit-learn's `normalize`."""
    from sklearn.preprocessing import normalize

    X = np.asarray(X, dtype=np.float32)
    return normalize(X) if len(X) else X.copy()  # scikit-learn refuses 0 rows; an empty search query is valid


def _check_k(k: int, ntotal: int) -> int:
    if ntotal == 0:
        raise ValueError("the index is empty: call add(X) before search")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    return min(int(k), ntotal)


class NumpyIndex:
    """Exact brute-force search: similarities by blocks of queries, top-k by argpartition then sort.

    chunk_size: queries per block; None keeps one block (similarities and their argpartition) near 96 MiB.
    """

    def __init__(self, metric: str = "cosine", *, chunk_size: int | None = None) -> None:
        self.metric = check_metric(metric)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer or None; got {chunk_size!r}")
        self.chunk_size = chunk_size
        self._X: np.ndarray | None = None
        self._sq_norms: np.ndarray | None = None  # [N], for l2

    @property
    def ntotal(self) -> int:
        return 0 if self._X is None else self._X.shape[0]

    def add(self, X: np.ndarray) -> NumpyIndex:
        """Append the [N, D] vectors X to the gallery (copied; the caller's array is never modified)."""
        given, X = X, as_matrix(X)
        if self.metric == "cosine":
            X = l2_normalize(X)
        elif np.may_share_memory(X, given):
            X = X.copy()
        if self._X is not None:
            if X.shape[1] != self._X.shape[1]:
                raise ValueError(f"X has {X.shape[1]} features, the index holds {self._X.shape[1]}")
            X = np.concatenate([self._X, X])
        self._X = X
        self._sq_norms = np.einsum("nd,nd->n", X, X) if self.metric == "l2" else None
        return self

    def search(self, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Q [M, D] -> (scores [M, k] float32, indices [M, k] int64), best first; k is clamped to N."""
        k = _check_k(k, self.ntotal)
        Q = as_matrix(Q, name="Q")
        if Q.shape[1] != self._X.shape[1]:
            raise ValueError(f"Q has {Q.shape[1]} features, the index holds {self._X.shape[1]}")
        if self.metric == "cosine":
            Q = l2_normalize(Q)
        n, m = self.ntotal, Q.shape[0]
        chunk = self.chunk_size or max(1, _BLOCK_ELEMENTS // max(n, 1))
        scores = np.empty((m, k), dtype=np.float32)
        indices = np.empty((m, k), dtype=np.int64)
        for start in range(0, m, chunk):
            block = slice(start, min(start + chunk, m))
            scores[block], indices[block] = self._search_block(Q[block], k)
        return scores, indices

    def _search_block(self, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims = Q @ self._X.T  # [m, N]
        if self.metric == "l2":
            # -(|q|^2 - 2 q.x + |x|^2), assembled in place to keep one [m, N] buffer
            sims *= 2.0
            sims -= self._sq_norms[None, :]
            sims -= np.einsum("md,md->m", Q, Q)[:, None]
        n = sims.shape[1]
        top = np.argpartition(sims, n - k, axis=1)[:, n - k :] if k < n else np.tile(np.arange(n), (len(sims), 1))
        top_sims = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-top_sims, axis=1, kind="stable")
        return np.take_along_axis(top_sims, order, axis=1), np.take_along_axis(top, order, axis=1).astype(np.int64)


def on_disk(X) -> bool:
    """A memory map, or a lazy row view of one (heads.stream_probe.StoreRows): worth re-ranking from, not copying."""
    return isinstance(X, np.memmap) or isinstance(getattr(X, "features", None), np.memmap)


class FaissIndex:
    """faiss search: "flat" is exact; "ivf" clusters the gallery into nlist cells and probes nprobe of them;
    "ivfpq" projects a wide gallery onto its first `pca` principal axes, clusters it into nlist cells and compresses
    each vector to m 4-bit codes (faiss fast-scan PQ: m / 2 bytes); when the gallery given to add() is a memory map it
    re-ranks rerank x k candidates exactly from it (the vectors stay on disk; RAM: `bytes_per_vector`). "hnsw" is a
    graph over full vectors (fast single queries, more RAM). nprobe: None -> chosen from nlist (`_nprobe`).

    nlist: None -> about 4 * sqrt(N), capped at (training vectors) / 39 (faiss wants >= 39 training points a cell).
    pca: None -> 64 when D > 128, else no projection (0). m: None -> the largest divisor of the (projected) dimension up
    to 128: a 4-bit code a dimension (32 bytes a vector for D = 1280). Quantizers are trained on at most 65,536
    vectors of the first batch given to add(), sampled with `seed`.
    """

    def __init__(
        self,
        metric: str = "cosine",
        *,
        kind: str = "flat",
        nlist: int | None = None,
        nprobe: int | None = None,
        m: int | None = None,
        pca: int | None = None,
        rerank: int = 10,
        hnsw_m: int = 32,
        seed: int = 0,
    ) -> None:
        self.metric = check_metric(metric)
        if kind not in FAISS_KINDS:
            raise ValueError(f"kind must be one of {', '.join(FAISS_KINDS)}; got {kind!r}")
        for name, value in (("nlist", nlist), ("m", m)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer or None; got {value!r}")
        if pca is not None and pca < 0:
            raise ValueError(f"pca must be 0 (no projection), a positive integer or None; got {pca!r}")
        if (nprobe is not None and nprobe < 1) or rerank < 1 or hnsw_m < 2:
            raise ValueError(f"nprobe and rerank must be positive, hnsw_m at least 2; got {nprobe}, {rerank}, {hnsw_m}")
        self.kind, self.nlist, self.nprobe, self.m, self.rerank = kind, nlist, nprobe, m, rerank
        self.pca, self.hnsw_m, self.seed = pca, hnsw_m, seed
        self._index = None
        self._source: list[np.ndarray] = []  # ivfpq: memory-mapped galleries, for the exact re-rank

    @property
    def ntotal(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    @property
    def bytes_per_vector(self) -> float:
        """RAM per stored vector: 4 D for flat, + graph links for hnsw, + the 8-byte id for ivf; for ivfpq all the
        index holds (codes padded to fast-scan blocks, ids, cell centroids, PQ tables, the PCA) over N."""
        d = 0 if self._index is None else self._index.d
        if self.kind == "flat":
            return 4.0 * d
        if self.kind == "hnsw":
            return 4.0 * d + 2 * self.hnsw_m * 4
        if self.kind == "ivf" or self.ntotal == 0:
            return float(self.code_bytes + 8) if self._index is not None else 8.0
        return len(import_faiss().serialize_index(self._index)) / self.ntotal

    @property
    def code_bytes(self) -> int:
        """ivf / ivfpq: bytes of one vector's code in its cell (4 D for ivf, m / 2 for ivfpq)."""
        return int(import_faiss().extract_index_ivf(self._index).code_size)

    def add(self, X: np.ndarray) -> FaissIndex:
        """Append the [N, D] vectors X to the gallery (copied; the caller's array is never modified).

        X may be a memory map larger than RAM: it is read in blocks (except by "flat", which holds it all)."""
        if self._index is None:
            self._index = self._create(X)
        elif X.shape[1] != self._index.d:
            raise ValueError(f"X has {X.shape[1]} features, the index holds {self._index.d}")
        if self.kind == "flat":
            self._add_flat(as_matrix(X))
            return self
        if self.kind == "ivfpq":
            self._source.append(X if on_disk(X) else None)
        for start in range(0, len(X), _ADD_BLOCK):  # normalised block by block: no second copy of the gallery
            block = as_matrix(X[start : start + _ADD_BLOCK])
            self._index.add(l2_normalize(block) if self.metric == "cosine" else block)
        return self

    def _add_flat(self, X: np.ndarray) -> None:
        """Copy X into the flat index in one call, then normalise the new rows where they now live."""
        faiss = import_faiss()

        start = self._index.ntotal
        self._index.add(X)
        if self.metric != "cosine":
            return
        d = self._index.d
        stored = faiss.rev_swig_ptr(self._index.get_xb(), self._index.ntotal * d).reshape(-1, d)
        for row in range(start, len(stored), _ADD_BLOCK):
            block = stored[row : row + _ADD_BLOCK]
            block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)

    def save(self, path: str) -> None:
        """Write the faiss index to `path` atomically (the re-rank source is the caller's memory map)."""
        faiss = import_faiss()
        tmp = f"{path}.tmp{os.getpid()}"
        faiss.write_index(self._index, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str, *, metric: str, kind: str, source: np.ndarray | None = None, **kwargs) -> FaissIndex:
        """An index written by `save`; `source`: the memory-mapped gallery it was built from (ivfpq re-rank)."""
        self = cls(metric, kind=kind, **kwargs)
        self._index = import_faiss().read_index(path)
        self._source = [source] if kind == "ivfpq" and on_disk(source) else []
        if kind in ("ivf", "ivfpq"):
            ivf = import_faiss().downcast_index(import_faiss().extract_index_ivf(self._index))
            self.nlist_ = int(ivf.nlist)
        if kind == "ivfpq":
            self.m_, self.pca_ = int(ivf.pq.M), int(ivf.d) if ivf.d < self._index.d else 0
        return self

    def _create(self, X: np.ndarray):
        faiss = import_faiss()  # optional heavy import, only when a faiss index is asked for
        n, d = X.shape
        faiss_metric = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2
        if self.kind == "flat":
            return faiss.IndexFlatIP(d) if self.metric == "cosine" else faiss.IndexFlatL2(d)
        if self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, self.hnsw_m, faiss_metric)
            index.hnsw.efSearch = max(64, 4 * (self.nprobe or 16))
            return index
        if n == 0:
            raise ValueError(f"an {self.kind.upper()} index is trained on the first vectors added; X is empty")
        nlist = min(self.nlist or max(1, min(round(4 * math.sqrt(n)), min(n, _TRAIN_MAX) // 39)), n)
        if self.kind == "ivf":
            quantizer = faiss.IndexFlatIP(d) if self.metric == "cosine" else faiss.IndexFlatL2(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss_metric)
        else:
            index = self._create_ivfpq(faiss, n, d, nlist)
        rows = np.sort(np.random.default_rng(self.seed).permutation(n)[:_TRAIN_MAX])
        sample = as_matrix(X[rows])
        index.train(l2_normalize(sample) if self.metric == "cosine" else sample)
        if self.kind == "ivfpq" and self.pca_:
            # the PCA keeps its full D x D eigenbasis (6.6 MB for D = 1280); its projection needs the first rows only
            pca = faiss.downcast_VectorTransform(index.chain.at(0))
            pca.PCAMat.resize(pca.d_out * pca.d_in)
        self.nlist_ = nlist
        return index

    def _create_ivfpq(self, faiss, n: int, d: int, nlist: int):
        """PCA -> IVF -> 4-bit fast-scan PQ, all under L2: a cosine gallery arrives as unit rows, whose L2 order is
        the cosine order, and a centred PCA keeps L2 distances (it would not keep inner products)."""
        fast = n >= FAST_SCAN_MIN_N
        pca = (PCA_DIM if d > 2 * PCA_DIM else 0) if self.pca is None else self.pca
        self.pca_ = pca if fast and pca < min(d, n) else 0  # no projection onto all of D, nor from too few rows
        d_in = self.pca_ or d
        self.m_ = self.m or max(m for m in range(1, min(PQ_SUBQUANTIZERS if fast else 64, d_in) + 1) if d_in % m == 0)
        if d_in % self.m_:
            raise ValueError(f"m must divide the (projected) dimension {d_in}; got {self.m_}")
        spec = f"{f'PCA{d_in},' if self.pca_ else ''}IVF{nlist},PQ{self.m_}"
        spec += "x4fs" if fast else f"x{max(1, int(math.log2(n)))}"
        return faiss.index_factory(d, spec, faiss.METRIC_L2)

    def _nprobe(self, nlist: int) -> int:
        """Cells probed: nprobe, or from the gallery's nlist: 16 for ivf; for ivfpq a quarter of the cells (at least
        16): on 1M vectors of intrinsic dimension 64 the neighbours spread over many cells (bench/scale.py)."""
        if self.nprobe is not None:
            return min(self.nprobe, nlist)
        return min(nlist, 16 if self.kind == "ivf" else max(16, round(nlist * IVFPQ_PROBE_FRACTION)))

    def search(self, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Q [M, D] -> (scores [M, k] float32, indices [M, k] int64), best first; k is clamped to N.

        IVF may find fewer than k vectors in the probed cells: those slots hold index -1 and score -inf.
        """
        k = _check_k(k, self.ntotal)
        Q = as_matrix(Q, name="Q")
        if Q.shape[1] != self._index.d:
            raise ValueError(f"Q has {Q.shape[1]} features, the index holds {self._index.d}")
        if self.metric == "cosine":
            Q = l2_normalize(Q)
        if self.kind in ("ivf", "ivfpq"):
            import_faiss().extract_index_ivf(self._index).nprobe = self._nprobe(self.nlist_)
        reranked = self.kind == "ivfpq" and self._source and all(s is not None for s in self._source)
        scores, indices = self._index.search(Q, min(k * self.rerank, self.ntotal) if reranked else k)
        if reranked:
            return self._rerank(Q, indices, k)
        if self._index.metric_type == import_faiss().METRIC_L2:  # squared distances (of unit rows for cosine)
            scores = 1 - scores / 2 if self.metric == "cosine" else -scores
        scores[indices < 0] = -np.inf
        return scores.astype(np.float32, copy=False), indices.astype(np.int64, copy=False)

    def _rerank(self, Q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact similarities of the [M, k'] candidates from the memory-mapped gallery; the best k of them."""
        scores = np.full(cand.shape, -np.inf, np.float32)
        sizes = np.cumsum([0] + [len(s) for s in self._source])
        for i, (q, row) in enumerate(zip(Q, cand)):
            ok = row >= 0
            ids = np.sort(row[ok])
            part = np.searchsorted(sizes, ids, side="right") - 1
            vecs = np.concatenate([np.asarray(self._source[p][ids[part == p] - sizes[p]]) for p in np.unique(part)])
            vecs = vecs.astype(np.float32, copy=False)
            sims = vecs @ q if self.metric == "l2" else (vecs @ q) / np.maximum(np.linalg.norm(vecs, axis=1), 1e-12)
            if self.metric == "l2":
                sims = 2 * sims - np.einsum("nd,nd->n", vecs, vecs) - q @ q
            cand[i, : len(ids)], scores[i, : len(ids)] = ids, sims
            cand[i, len(ids) :] = -1
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(cand, order, axis=1).astype(np.int64)


def build_index(
    X: np.ndarray,
    *,
    metric: str = "cosine",
    backend: str = "auto",
    kind: str = "flat",
    nlist: int | None = None,
    nprobe: int | None = None,
    chunk_size: int | None = None,
    m: int | None = None,
    pca: int | None = None,
) -> NumpyIndex | FaissIndex:
    """Index the [N, D] gallery X.

    backend "auto": numpy for exact search (kind flat), faiss for kind ivf / ivfpq / hnsw. Measured (`python -m
    bench.scale`, BENCHMARKS.md): numpy's exact search beat faiss flat at 10k, 100k and 1M gallery rows here, so
    the default no longer races them on the user's machine (`choose_exact_backend` still measures, on request).
    kind="ivfpq" on a memory map keeps the vectors on disk (RAM: the m / 2 code bytes, the 8-byte id and a share of
    the centroids) and re-ranks from it.
    """
    check_metric(metric)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if kind not in FAISS_KINDS:
        raise ValueError(f"kind must be one of {', '.join(FAISS_KINDS)}; got {kind!r}")
    if backend == "auto":  # a rule, the same on every machine (no race decides a head's results)
        backend = "numpy" if kind == "flat" else "faiss"
    if backend == "numpy":
        if kind != "flat":
            raise ValueError(f"kind={kind!r} needs backend='faiss' (numpy search is exact, kind='flat')")
        return NumpyIndex(metric, chunk_size=chunk_size).add(X)
    return FaissIndex(metric, kind=kind, nlist=nlist, nprobe=nprobe, m=m, pca=pca).add(X)


_AUTO_CACHE: dict[str, str] = {}


def choose_exact_backend(X: np.ndarray, *, metric: str = "cosine", n_queries: int = 64, cache: str | None = None):
    """numpy or faiss: whichever exact index answers `n_queries` gallery rows faster on (at most 32,768 rows of) X.

    Brute force costs N x D a query on either backend, so the slice ranks them as the whole gallery would. The
    answer is cached per (rows slice, D, metric, CPU count) in memory and in `cache` (default
    ~/.cache/finegrain/index-auto.json; FINEGRAIN_CACHE_DIR moves it).
    """
    n = min(len(X), AUTO_PROBE_ROWS)
    key = f"{n}x{X.shape[1]}-{metric}-{os.cpu_count()}cpu"
    path = cache or os.path.join(os.environ.get("FINEGRAIN_CACHE_DIR", os.path.expanduser("~/.cache/finegrain")),
                                 "index-auto.json")  # fmt: skip
    if key not in _AUTO_CACHE:
        _AUTO_CACHE.update(_read_cache(path))
    if key in _AUTO_CACHE:
        return _AUTO_CACHE[key]
    gallery = as_matrix(X[:n])
    queries = gallery[np.linspace(0, n - 1, min(n_queries, n)).astype(int)]
    times = {}
    for name, index in (("numpy", NumpyIndex(metric)), ("faiss", FaissIndex(metric))):
        index.add(gallery)
        index.search(queries[:2], 10)  # warm-up: first-call costs are not the backend's speed
        t0 = time.perf_counter()
        index.search(queries, 10)
        times[name] = time.perf_counter() - t0
    _AUTO_CACHE[key] = min(times, key=times.get)
    try:
        from finegrain.atomic import atomic_write_json

        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_json(path, {**_read_cache(path), key: _AUTO_CACHE[key]})
    except OSError:
        pass  # a read-only home only costs a re-measurement next time
    return _AUTO_CACHE[key]


def _read_cache(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            return {k: v for k, v in json.load(f).items() if v in ("numpy", "faiss")}
    except (OSError, ValueError, AttributeError):
        return {}


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None
