"""Self-training on frozen embeddings: the probe labels the unlabeled images it is sure of, at most a cap a class
(so a frequent or broad class does not swamp the rare ones), and is fitted again on labelled + pseudo-labelled
images, for a few rounds (Su, Cheng, Maji, CVPR 2021, "A realistic evaluation of semi-supervised learning for
fine-grained classification": confidence-thresholded, class-balanced pseudo-labels)."""

from __future__ import annotations

import math

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from finegrain.semi.guard import guard_mask
from finegrain.semi.probe import SEMI_C, WeightedProbe
from finegrain.semi.propagation import PseudoLabelMixin, balancing, check_inputs


def capped_pseudo_labels(proba: np.ndarray, *, threshold: float, cap: int) -> np.ndarray:
    """Pseudo-labels [M] (-1: none) from probabilities [M, C]: rows whose top probability reaches `threshold`,
    the `cap` most confident of each class at most."""
    labels, conf = proba.argmax(axis=1), proba.max(axis=1)
    out = np.full(len(proba), -1)
    for c in np.unique(labels):
        rows = np.flatnonzero((labels == c) & (conf >= threshold))
        rows = rows[np.argsort(-conf[rows], kind="stable")][:cap]
        out[rows] = c
    return out


class SelfTrainingProbe(PseudoLabelMixin, ClassifierMixin, BaseEstimator):
    """fit(X_lab [L, D], y [L], X_unlab [M, D]) or fit(X, y) with y = -1 on the unlabeled rows: `rounds` rounds
    of pseudo-labelling by the current probe (top probability >= threshold; at most `cap` a class, None: the
    pool's even share, ceil(M / C)) and a `WeightedProbe` refit, each pseudo-label weighted by its probability x
    its class's balancing weight. guard "auto": images outside the labelled classes' region (`guard.guard_mask`)
    are never pseudo-labelled; "none": all may be. After fit: pseudo_labels_ [M] (-1: not used), pseudo_weights_
    [M], report_."""

    def __init__(self, *, threshold: float = 0.5, cap: int | None = None, rounds: int = 3, C: float = SEMI_C,
                 guard: str = "auto", random_state: int | None = 0) -> None:  # fmt: skip
        self.threshold, self.cap, self.rounds = threshold, cap, rounds
        self.C, self.guard, self.random_state = C, guard, random_state

    def fit(self, X_lab: np.ndarray, y: np.ndarray, X_unlab: np.ndarray | None = None) -> SelfTrainingProbe:
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be a probability in [0, 1]; got {self.threshold!r}")
        if self.guard not in ("auto", "none"):
            raise ValueError(f"guard must be one of auto, none; got {self.guard!r}")
        X_lab, X_unlab, classes, codes, y = check_inputs(self, X_lab, y, X_unlab)
        C = len(classes)
        cap = self.cap if self.cap is not None else max(1, math.ceil(len(X_unlab) / C))
        seed = self.random_state or 0
        keep = guard_mask(X_lab, codes, X_unlab, C, seed=seed) if self.guard == "auto" else np.ones(len(X_unlab), bool)
        probe = WeightedProbe(C=self.C, random_state=self.random_state).fit(X_lab, codes)
        pseudo, conf = np.full(len(X_unlab), -1), np.zeros(len(X_unlab))
        for _ in range(max(int(self.rounds), 0)):
            if not keep.any():
                break
            proba = np.zeros((len(X_unlab), C))
            proba[keep] = probe.predict_proba(X_unlab[keep])  # the probe's classes_ are the codes 0..C-1
            pseudo = capped_pseudo_labels(proba, threshold=self.threshold, cap=cap)
            pseudo[~keep] = -1  # dropped by the guard: never pseudo-labelled, even with threshold 0
            conf = proba.max(axis=1)
            used = pseudo >= 0
            y_all = np.concatenate([codes, pseudo[used]])
            w = np.concatenate([np.ones(len(X_lab)), conf[used]]) * balancing(y_all, C)[y_all]
            probe = WeightedProbe(C=self.C, random_state=self.random_state)
            probe.fit(np.concatenate([X_lab, X_unlab[used]]), y_all, sample_weight=w)
        used = pseudo >= 0
        probe.classes_ = classes  # fitted on codes 0..C-1: report the caller's labels
        self._expose(probe)
        self.pseudo_labels_ = np.where(used, classes[np.maximum(pseudo, 0)], -1) if used.any() else pseudo
        self.pseudo_weights_ = np.where(used, conf, 0.0)
        self.report_ = {"method": "self-training", "cap": int(cap), **self._report(used, conf, len(X_unlab),
                                                                                   (~keep).sum())}  # fmt: skip
        return self
