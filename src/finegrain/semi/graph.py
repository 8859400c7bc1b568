"""A symmetric k-NN affinity graph over embeddings and the normalized diffusion on it (Zhou et al., NeurIPS 2004;
Iscen, Tolias, Avrithis, Chum, "Label Propagation for Deep Semi-supervised Learning", CVPR 2019).

Following the authors' reference code (github.com/ahmetius/LP-DeepSSL, `lp/db_semisuper.py`): cosine similarities
of the k nearest neighbours raised to the power gamma, W + W^T, W_n = D^-1/2 W D^-1/2, then for each class c the
linear system (I - alpha W_n) z_c = y_c solved by conjugate gradient, y_c holding 1 / |labelled of c| on the labelled
images of c (so every class starts with the same mass)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import cg

from finegrain.heads.index import as_matrix, build_index, l2_normalize


def knn_graph(X: np.ndarray, *, k: int = 20, gamma: float = 3.0) -> sp.csr_matrix:
    """X [N, D] embeddings -> symmetric sparse affinities W [N, N]: max(cos, 0)^gamma to the k nearest neighbours
    (self excluded), W + W^T. faiss searches large sets, numpy small ones."""
    X = l2_normalize(as_matrix(X))
    n = len(X)
    k = int(min(k, n - 1))
    if k < 1:
        return sp.csr_matrix((n, n))
    sims, idx = build_index(X, metric="cosine").search(X, k + 1)
    keep = idx != np.arange(n)[:, None]  # drop self (exact duplicates may come first: drop by index)
    rows, cols, vals = [], [], []
    for i in range(n):
        j, s = idx[i][keep[i]][:k], sims[i][keep[i]][:k]
        rows.append(np.full(len(j), i)), cols.append(j), vals.append(np.clip(s, 0, None) ** gamma)
    W = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    W = W + W.T
    W.setdiag(0)
    W.eliminate_zeros()
    return W


def normalized(W: sp.csr_matrix) -> sp.csr_matrix:
    """D^-1/2 W D^-1/2 (isolated nodes keep degree 1)."""
    d = np.asarray(W.sum(axis=1)).ravel()
    d[d == 0] = 1.0
    inv = sp.diags(1.0 / np.sqrt(d))
    return (inv @ W @ inv).tocsr()


def diffuse(
    W: sp.csr_matrix, labelled: np.ndarray, y: np.ndarray, n_classes: int, *, alpha: float = 0.8, max_iter: int = 20
) -> np.ndarray:
    """Scores Z [N, n_classes] >= 0 of the diffusion from labelled nodes (indices [L]) with classes y [L];
    a class with no labelled node keeps a zero column."""
    A = sp.eye(W.shape[0], format="csr") - alpha * normalized(W)
    Z = np.zeros((W.shape[0], n_classes))
    for c in range(n_classes):
        seeds = labelled[y == c]
        if len(seeds) == 0:
            continue
        b = np.zeros(W.shape[0])
        b[seeds] = 1.0 / len(seeds)
        Z[:, c], _ = cg(A, b, rtol=1e-6, maxiter=max_iter)
    return np.clip(Z, 0.0, None)


def certainty(P: np.ndarray) -> np.ndarray:
    """Per-row weight 1 - H(p) / log C of row-stochastic P [N, C] (Iscen et al., eq. 11): 1 for a one-hot row,
    0 for a uniform one (not rescaled by the maximum as the reference code does, so it stays comparable)."""
    C = P.shape[1]
    if C < 2:
        return np.ones(len(P))
    logp = np.log(np.where(P > 0, P, 1.0))
    return 1.0 - (-(P * logp).sum(axis=1)) / np.log(C)
