"""Which unlabeled images to label next: the uncertain ones (margin sampling: smallest gap between the two most
probable classes; Scheffer et al. 2001) spread over the embedding space (greedy k-center coverage; Sener & Savarese,
ICLR 2018). Deterministic: ties are broken by a seeded permutation, so a seed gives one ranking."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

import numpy as np

from finegrain.atomic import atomic_write_text
from finegrain.heads.index import as_matrix, l2_normalize


def margins(proba: np.ndarray) -> np.ndarray:
    """[M] top-1 minus top-2 probability of each row of proba [M, C] (small: uncertain)."""
    if proba.shape[1] < 2:
        return np.ones(len(proba))
    top2 = np.sort(proba, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def suggest_to_label(
    X_unlab: np.ndarray, proba: np.ndarray, n: int, *, X_lab: np.ndarray | None = None, pool: float = 3.0,
    seed: int = 0,
) -> np.ndarray:  # fmt: skip
    """Indices [min(n, M)] of unlabeled images X_unlab [M, D] to label, in order. The `pool` x n smallest margins
    of proba [M, C] are candidates; among them, greedy k-center picks each time the one farthest (cosine) from
    the labelled images X_lab and the images already picked."""
    X_unlab = l2_normalize(as_matrix(X_unlab, name="X_unlab"))
    n = int(min(n, len(X_unlab)))
    if n <= 0:
        return np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(X_unlab))  # seeded tie-break
    by_margin = order[np.argsort(margins(proba)[order], kind="stable")]
    cand = by_margin[: max(n, int(np.ceil(pool * n)))]
    Xc = X_unlab[cand]
    if X_lab is not None and len(X_lab):
        dist = 1.0 - (Xc @ l2_normalize(as_matrix(X_lab, name="X_lab")).T).max(axis=1)
    else:
        dist = np.full(len(cand), np.inf)
    picked: list[int] = []
    for _ in range(n):
        j = int(np.argmax(dist))  # first maximum: the most uncertain among equals (cand is margin-ordered)
        picked.append(j)
        dist = np.minimum(dist, 1.0 - Xc @ Xc[j])
        dist[picked] = -np.inf
    return cand[np.array(picked)]


def write_suggestions(path: str, paths: Sequence[str], proba: np.ndarray, order: np.ndarray, classes: Sequence[str]):
    """CSV (written atomically): rank, path, margin, best guess and its probability, second guess."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rank", "path", "margin", "guess", "guess_probability", "second_guess"])
    m = margins(proba)
    for rank, i in enumerate(order, 1):
        top = np.argsort(-proba[i], kind="stable")[:2]
        second = classes[top[1]] if len(top) > 1 else ""
        w.writerow([rank, paths[i], f"{m[i]:.4f}", classes[top[0]], f"{proba[i, top[0]]:.4f}", second])
    atomic_write_text(path, buf.getvalue())
    return path
