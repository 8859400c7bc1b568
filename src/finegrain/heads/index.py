"""Nearest-neighbour search over an [N, D] float32 gallery, exact (numpy, faiss flat) or approximate (faiss IVF).

Every index returns similarities, higher = closer: the cosine similarity, or for "l2" the negative squared
euclidean distance, so one top-k convention serves both metrics.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Protocol

import numpy as np

METRICS = ("cosine", "l2")
BACKENDS = ("auto", "numpy", "faiss")
FAISS_KINDS = ("flat", "ivf")
AUTO_FAISS_MIN_N = 4096  # below this a numpy matmul is as fast as faiss and needs no extra library
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
    """[N, D] -> a new [N, D] float32 array of unit rows (zero rows stay zero)."""
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return (X / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


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


class FaissIndex:
    """faiss search: "flat" is exact, "ivf" clusters the gallery into nlist cells and probes nprobe of them.

    nlist: None -> about 4 * sqrt(N), capped at N / 39 (faiss wants >= 39 training points per cell).
    The IVF quantizer is trained on the first batch given to add().
    """

    def __init__(
        self, metric: str = "cosine", *, kind: str = "flat", nlist: int | None = None, nprobe: int = 16
    ) -> None:
        self.metric = check_metric(metric)
        if kind not in FAISS_KINDS:
            raise ValueError(f"kind must be one of {', '.join(FAISS_KINDS)}; got {kind!r}")
        if nlist is not None and nlist < 1:
            raise ValueError(f"nlist must be a positive integer or None; got {nlist!r}")
        if nprobe < 1:
            raise ValueError(f"nprobe must be a positive integer; got {nprobe!r}")
        self.kind, self.nlist, self.nprobe = kind, nlist, nprobe
        self._index = None

    @property
    def ntotal(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    def add(self, X: np.ndarray) -> FaissIndex:
        """Append the [N, D] vectors X to the gallery (copied; the caller's array is never modified)."""
        X = as_matrix(X)
        if self._index is None:
            self._index = self._create(X)
        elif X.shape[1] != self._index.d:
            raise ValueError(f"X has {X.shape[1]} features, the index holds {self._index.d}")
        if self.kind == "flat":
            self._add_flat(X)
            return self
        for start in range(0, len(X), _ADD_BLOCK):  # normalised block by block: no second copy of the gallery
            block = X[start : start + _ADD_BLOCK]
            self._index.add(l2_normalize(block) if self.metric == "cosine" else block)
        return self

    def _add_flat(self, X: np.ndarray) -> None:
        """Copy X into the flat index in one call, then normalise the new rows where they now live."""
        import faiss

        start = self._index.ntotal
        self._index.add(X)
        if self.metric != "cosine":
            return
        d = self._index.d
        stored = faiss.rev_swig_ptr(self._index.get_xb(), self._index.ntotal * d).reshape(-1, d)
        for row in range(start, len(stored), _ADD_BLOCK):
            block = stored[row : row + _ADD_BLOCK]
            block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)

    def _create(self, X: np.ndarray):
        import faiss  # optional heavy import, only when a faiss index is asked for

        n, d = X.shape
        faiss_metric = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2
        if self.kind == "flat":
            return faiss.IndexFlatIP(d) if self.metric == "cosine" else faiss.IndexFlatL2(d)
        if n == 0:
            raise ValueError("an IVF index is trained on the first vectors added; X is empty")
        nlist = self.nlist or max(1, min(round(4 * math.sqrt(n)), n // 39))
        nlist = min(nlist, n)
        quantizer = faiss.IndexFlatIP(d) if self.metric == "cosine" else faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss_metric)
        index.train(l2_normalize(X) if self.metric == "cosine" else X)
        index.nprobe = min(self.nprobe, nlist)
        self.nlist_ = nlist
        return index

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
        scores, indices = self._index.search(Q, k)
        if self.metric == "l2":
            scores = -scores
        scores[indices < 0] = -np.inf
        return scores.astype(np.float32, copy=False), indices.astype(np.int64, copy=False)


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def build_index(
    X: np.ndarray,
    *,
    metric: str = "cosine",
    backend: str = "auto",
    kind: str = "flat",
    nlist: int | None = None,
    nprobe: int = 16,
    chunk_size: int | None = None,
) -> NumpyIndex | FaissIndex:
    """Index the [N, D] gallery X. backend "auto": faiss when N > 4096 (or kind="ivf") and faiss is installed."""
    check_metric(metric)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if kind not in FAISS_KINDS:
        raise ValueError(f"kind must be one of {', '.join(FAISS_KINDS)}; got {kind!r}")
    if backend == "auto":
        wants_faiss = kind == "ivf" or len(X) > AUTO_FAISS_MIN_N
        backend = "faiss" if wants_faiss and faiss_available() else "numpy"
    if backend == "numpy":
        if kind != "flat":
            raise ValueError(f"kind={kind!r} needs backend='faiss' (numpy search is exact, kind='flat')")
        return NumpyIndex(metric, chunk_size=chunk_size).add(X)
    return FaissIndex(metric, kind=kind, nlist=nlist, nprobe=nprobe).add(X)
