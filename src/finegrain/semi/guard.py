"""The out-of-class guard: unlabeled images the labelled classes do not reach are left out.

Unlabeled pools hold other species (Su, Cheng, Maji, CVPR 2021: out-of-class images hurt pseudo-labelling). Two
signals, each with a reference measured on labelled images only, so the bar adapts to the data:
- diffusion mass (with 2+ labelled images in a class): how much of the labelled classes' diffused score reaches an
  image. The reference is cross-fitted: the labelled images of each class are split in two halves, the diffusion
  starts from one half and the other half's mass is read, as if unlabeled. On cub100 (5 a class, half the pool from
  50 other species) mass separates in- from out-of-class images best (ROC AUC 0.96, against 0.84 for similarity);
- similarity (one labelled image a class): the highest centred cosine similarity to a labelled image; the reference
  is the same, leave-one-out, on the labelled images (the nearest *other* class then: a lenient bar).
Unlabeled images below the `quantile` of the reference are dropped."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from finegrain.heads.index import l2_normalize

GUARD_QUANTILE = 0.1


def max_similarity(A: np.ndarray, B: np.ndarray, *, exclude_self: bool = False) -> np.ndarray:
    """[len(A)] highest cosine similarity of each row of A to the rows of B (A is B with exclude_self)."""
    S = l2_normalize(A) @ l2_normalize(B).T
    if exclude_self:
        np.fill_diagonal(S, -np.inf)
    return S.max(axis=1)


def similarity_guard(X_lab: np.ndarray, X_unlab: np.ndarray, *, quantile: float = GUARD_QUANTILE) -> np.ndarray:
    """Boolean mask [M] of the unlabeled images X_unlab [M, D] close enough to a labelled image of X_lab [L, D]."""
    if len(X_lab) < 2 or len(X_unlab) == 0:
        return np.ones(len(X_unlab), bool)
    center = X_lab.mean(axis=0)  # centred cosine: the component all embeddings share says nothing of classes
    ref = max_similarity(X_lab - center, X_lab - center, exclude_self=True)
    return max_similarity(X_unlab - center, X_lab - center) >= np.quantile(ref, quantile)


def halves(codes: np.ndarray, *, seed: int = 0) -> np.ndarray | None:
    """Fold 0 / 1 of each labelled image [L], half of every class with 2+ images in each fold (-1: a class with a
    single image, left out); None when fewer than half the classes have 2 images."""
    rng = np.random.default_rng(seed)
    fold = np.full(len(codes), -1)
    classes = np.unique(codes)
    for c in classes:
        idx = rng.permutation(np.flatnonzero(codes == c))
        if len(idx) >= 2:
            fold[idx] = np.arange(len(idx)) % 2
    return fold if (np.bincount(codes[fold >= 0]) >= 2).sum() * 2 >= len(classes) else None


def mass_threshold(W: sp.csr_matrix, codes: np.ndarray, n_classes: int, *, alpha: float, max_iter: int,
                   quantile: float = GUARD_QUANTILE, seed: int = 0) -> float | None:  # fmt: skip
    """The mass below which an unlabeled node counts as out of the labelled classes (nodes 0..L-1 of the graph W
    are the labelled ones, classes codes [L]); None when the labelled images cannot be split in halves."""
    from finegrain.semi.graph import diffuse

    fold = halves(codes, seed=seed)
    if fold is None:
        return None
    ref = []
    for a in (0, 1):
        seeds, held = np.flatnonzero(fold == a), np.flatnonzero(fold == 1 - a)
        Z = diffuse(W, seeds, codes[seeds], n_classes, alpha=alpha, max_iter=max_iter)
        ref.append(Z[held].sum(axis=1))
    return float(np.quantile(np.concatenate(ref), quantile))


def guard_mask(X_lab: np.ndarray, codes: np.ndarray, X_unlab: np.ndarray, n_classes: int, *, k: int = 10,
               gamma: float = 3.0, alpha: float = 0.8, max_iter: int = 20, seed: int = 0) -> np.ndarray:  # fmt: skip
    """Boolean mask [M] of the unlabeled images X_unlab [M, D] inside the labelled classes' region: by diffusion
    mass on the k-NN graph of all images when the labelled ones can be split in halves, else by similarity."""
    from finegrain.semi.graph import diffuse, knn_graph

    if len(X_unlab) == 0:
        return np.ones(0, bool)
    W = knn_graph(np.concatenate([X_lab, X_unlab]), k=k, gamma=gamma)
    bar = mass_threshold(W, codes, n_classes, alpha=alpha, max_iter=max_iter, seed=seed)
    if bar is None:
        return similarity_guard(X_lab, X_unlab)
    L = len(X_lab)
    return diffuse(W, np.arange(L), codes, n_classes, alpha=alpha, max_iter=max_iter)[L:].sum(axis=1) >= bar
