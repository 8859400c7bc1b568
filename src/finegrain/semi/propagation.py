"""Label propagation on frozen embeddings, then finegrain's probe on labelled + weighted pseudo-labelled images
(Iscen, Tolias, Avrithis, Chum, CVPR 2019, applied once on frozen features as in Lazarou, Avrithis, Stathaki,
ICCV 2021 "Iterative label cleaning for transductive and semi-supervised few-shot learning").

Defaults: gamma = 3 and alpha = 0.8 are the literature's for frozen features (iLPC, Lazarou et al.; Iscen et al.
use alpha = 0.99 and k = 50 on 50k-image sets, where a class has thousands of images: with tens a class a wide graph
crosses classes). k = 10 rather than iLPC's 20: on a development protocol that reads train-split labels only (cub100,
1 and 5 labelled images a class, seeds 5 and 6, pseudo-label accuracy on the unlabeled rest of train) k = 10 labels
1-4 points more of the pool correctly; never chosen on a test split."""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from finegrain.heads.checks import fit_data, predict_data
from finegrain.heads.index import as_matrix
from finegrain.semi.graph import certainty, diffuse, knn_graph
from finegrain.semi.guard import guard_mask
from finegrain.semi.probe import SEMI_C, WeightedProbe


class PseudoLabelMixin:
    """What every semi-supervised estimator here shares: the fitted probe's face and a report of what it used."""

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "probe_")
        return self.probe_.decision_function(predict_data(self, X))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """X [M, D] -> probabilities [M, C] over classes_."""
        check_is_fitted(self, "probe_")
        return self.probe_.predict_proba(predict_data(self, X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        proba = self.predict_proba(X)
        return self.classes_[proba.argmax(axis=1)]

    def _expose(self, probe: WeightedProbe) -> None:
        self.probe_ = probe
        self.classes_, self.coef_, self.intercept_ = probe.classes_, probe.coef_, probe.intercept_
        self.n_features_in_ = probe.n_features_in_

    def _report(self, used: np.ndarray, confidence: np.ndarray, n_unlabeled: int, dropped: int) -> dict:
        conf = confidence[used]
        return {
            "n_unlabeled": int(n_unlabeled),
            "n_used": int(used.sum()),
            "n_dropped_by_guard": int(dropped),
            "mean_confidence": round(float(conf.mean()), 4) if len(conf) else None,
            "min_confidence": round(float(conf.min()), 4) if len(conf) else None,
        }


UNLABELED = -1  # scikit-learn's semi-supervised convention: the label of a row nobody labelled


def check_inputs(est, X, y, X_unlab=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X_lab [L, D], X_unlab [M, D] float32, classes [C], codes [L] in 0..C-1, labels y [L]), checked by
    scikit-learn (`heads.checks.fit_data`: shape, dtype, finiteness, sparse input, targets; `n_features_in_`).
    The unlabeled rows: `X_unlab` given apart, or (scikit-learn's convention, as `LabelSpreading` and
    `SelfTrainingClassifier` take it, so the heads sit in a `Pipeline`) the rows of X whose y is -1."""
    X, y = fit_data(est, X, y)
    if X_unlab is None:
        unlabeled = (y == UNLABELED) if y.dtype.kind in "iuf" else np.zeros(len(y), bool)
        X, y, X_unlab = X[~unlabeled], y[~unlabeled], X[unlabeled]
    X_unlab = as_matrix(X_unlab, name="X_unlab") if len(X_unlab) else np.zeros((0, X.shape[1]), np.float32)
    if X_unlab.shape[1] != X.shape[1]:
        raise ValueError(f"X_unlab has {X_unlab.shape[1]} features, X {X.shape[1]}")
    classes, codes = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"semi-supervised probes need at least 2 labelled classes; y has {len(classes)} class")
    return X, X_unlab, classes, codes, y


def balancing(codes: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class weights [n_classes], N / C / (images of the class), so each class weighs the same in the loss
    (Iscen et al.'s class weights)."""
    counts = np.bincount(codes, minlength=n_classes).astype(np.float64)
    return (len(codes) / n_classes) / np.maximum(counts, 1.0)


class LabelPropagationProbe(PseudoLabelMixin, ClassifierMixin, BaseEstimator):
    """fit(X_lab [L, D], y [L], X_unlab [M, D]) or fit(X, y) with y = -1 on the unlabeled rows (scikit-learn's
    convention): a k-NN graph over all L + M embeddings, class scores diffused
    from the labelled images, each unlabeled image pseudo-labelled with its best class and weighted by its
    certainty (1 - entropy / log C) x its class's balancing weight (N / C / images of that class), then a
    `WeightedProbe` on labelled (weight 1 x class weight) + pseudo-labelled images.

    guard: "auto" drops unlabeled images outside the labelled classes' region (`guard.guard_mask`) before the graph is
    built; "none" keeps all. min_certainty: pseudo-labels below it are not used.
    After fit: pseudo_labels_ [M] (-1: not used), pseudo_weights_ [M], report_ (how many used, at what confidence).
    """

    def __init__(self, *, k: int = 10, gamma: float = 3.0, alpha: float = 0.8, max_iter: int = 20,
                 C: float = SEMI_C, guard: str = "auto", min_certainty: float = 0.0,
                 random_state: int | None = 0) -> None:  # fmt: skip
        self.k, self.gamma, self.alpha, self.max_iter = k, gamma, alpha, max_iter
        self.C, self.guard, self.min_certainty, self.random_state = C, guard, min_certainty, random_state

    def _check_params(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, numbers.Integral) or self.k < 1:
            raise ValueError(f"k must be a positive integer; got {self.k!r}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be strictly between 0 and 1; got {self.alpha!r}")
        if self.guard not in ("auto", "none"):
            raise ValueError(f"guard must be one of auto, none; got {self.guard!r}")

    def fit(self, X_lab: np.ndarray, y: np.ndarray, X_unlab: np.ndarray | None = None) -> LabelPropagationProbe:
        self._check_params()
        X_lab, X_unlab, classes, codes, y = check_inputs(self, X_lab, y, X_unlab)
        L, C = len(X_lab), len(classes)
        P, mass, keep = self._propagate(X_lab, codes, X_unlab, C)
        conf = certainty(P[L:])
        labels = P[L:].argmax(axis=1)
        used = (conf > self.min_certainty) & (mass[L:] > 0)
        rows = np.flatnonzero(keep)[used]  # rows of X_unlab that get a pseudo-label
        self.pseudo_labels_ = np.full(len(X_unlab), -1)
        self.pseudo_weights_ = np.zeros(len(X_unlab))
        self.pseudo_labels_[rows], self.pseudo_weights_[rows] = classes[labels[used]], conf[used]
        y_all = np.concatenate([codes, labels[used]])
        w = np.concatenate([np.ones(L), conf[used]]) * balancing(y_all, C)[y_all]
        probe = WeightedProbe(C=self.C, random_state=self.random_state)
        self._expose(probe.fit(np.concatenate([X_lab, X_unlab[rows]]), classes[y_all], sample_weight=w))
        self.n_iter_ = self.max_iter  # the conjugate-gradient cap of the diffusion, per class
        self.report_ = {"method": "label-propagation", **self._report(used, conf, len(X_unlab), (~keep).sum())}
        return self

    def _propagate(self, X_lab, codes, X_unlab, C) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(class distributions P [L + M', C], diffusion mass [L + M'], kept mask [M]) over the labelled images
        and the M' unlabeled ones the guard keeps (the graph is built without the others)."""
        L, opts = len(X_lab), {"alpha": self.alpha, "max_iter": self.max_iter}
        keep = np.ones(len(X_unlab), bool)
        if self.guard == "auto":
            keep = guard_mask(X_lab, codes, X_unlab, C, k=self.k, gamma=self.gamma, seed=self.random_state or 0, **opts)
        W = knn_graph(np.concatenate([X_lab, X_unlab[keep]]), k=self.k, gamma=self.gamma)
        Z = diffuse(W, np.arange(L), codes, C, **opts)
        mass = Z.sum(axis=1)
        P = np.where(mass[:, None] > 0, Z / np.where(mass > 0, mass, 1.0)[:, None], 1.0 / C)
        return P, mass, keep
