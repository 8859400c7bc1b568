"""Knowing when not to answer: split-conformal prediction sets and an unknown-class score.

`Conformal` (split conformal prediction; Vovk et al. 2005, Angelopoulos & Bates 2021 "A Gentle Introduction to
Conformal Prediction", section 1 and 2.1): non-conformity scores of held-out labelled images (`fit`'s out-of-fold
probabilities: every training image, a calibration set for free) give, for a coverage 1 - alpha, the threshold
q = the ceil((n + 1)(1 - alpha)) / n empirical quantile; the set of a new image holds every class whose score is
<= q, and it contains the true class with probability >= 1 - alpha when calibration and test images are
exchangeable. Scores: `lac` (1 - p_y, the smallest sets, coverage close to the nominal: the default; Sadinle et al.
2019) and `aps` (the probability mass of the classes ranked at or above y, adaptive sets; Romano et al. 2020,
non-randomized, so it over-covers: 0.943 for 0.90 on tests/unit/test_conformal.py's synthetic problem).
`classwise=True` calibrates each class on its own images (Mondrian conformal; Vovk 2012): coverage then holds for
every class with the images that needs, at the price of larger sets. `groups` calibrates groups of classes fixed
before any score is seen (a Mondrian taxonomy): `count_bands` puts classes whose training counts lie within a factor
of 2 in one group, so the few-shot classes of a long-tailed set are calibrated together, on enough images to certify
the coverage (15 calibration images a class certify it only in steps of 1/16: 90% became 94% class by class on
cub100-LT, bench/abstain.py). The few lines are ours: MAPIE and crepes wrap
scikit-learn estimators, and here the probabilities already exist (out-of-fold), so only the quantile is needed.

`energy` (Liu et al., NeurIPS 2020, "Energy-based out-of-distribution detection"): -logsumexp of a classifier's
logits, higher for images unlike every class; `UnknownScore` (Sun et al., ICML 2022, "Out-of-distribution detection
with deep nearest neighbors"): the distance of an image's L2-normalised feature to its k-th nearest training feature;
images farther than the distance that `accept` of the training images (each scored against the others) stay under
are "not one of the classes I know". Measured (bench/abstain.py, cub100 probe on 50 species): energy separates the
other 50 bird species at AUROC 0.92, the k-NN distance at 0.71 (0.83 with k = 1 on centred features).

The flag a saved model raises (`Conformal.is_unknown`) reads its probabilities only, so it works for every model
fit can choose (an ensemble's averaged probabilities have no logits to take the energy of): the top probability
(Hendrycks & Gimpel, ICLR 2017, "A baseline for detecting misclassified and out-of-distribution examples") under the
level that `accept` (95%) of the held-out known images reach. bench/abstain.py measures it beside energy.
"""

from __future__ import annotations

import math

import numpy as np

METHODS = ("lac", "aps")
ACCEPT = 0.95  # the share of known images the unknown flag lets through (its threshold is set on held-out images)


def check_coverage(coverage: float) -> float:
    """A coverage must be a number in (0, 1): 0.9 asks for sets that hold the true class 90% of the time."""
    if isinstance(coverage, bool) or not isinstance(coverage, int | float) or not 0 < coverage < 1:
        raise ValueError(f"coverage must be a number between 0 and 1 (e.g. 0.9), got {coverage!r}")
    return float(coverage)


def _scores(proba: np.ndarray, method: str) -> np.ndarray:
    """Non-conformity of every class for every image [N, C]: lower = more plausible."""
    if method == "lac":
        return 1.0 - proba
    order = np.argsort(-proba, axis=1, kind="stable")
    ranked = np.take_along_axis(proba, order, axis=1)
    mass = np.cumsum(ranked, axis=1)  # the mass of the classes ranked at or above each one
    out = np.empty_like(proba)
    np.put_along_axis(out, order, mass, axis=1)
    return out


def _quantile(scores: np.ndarray, coverage: float) -> float:
    """The finite-sample conformal threshold: the ceil((n + 1) * coverage)-th smallest score (inf when n is too
    small for that coverage: the set is then every class)."""
    n = len(scores)
    rank = math.ceil((n + 1) * coverage)
    return float(np.sort(scores)[rank - 1]) if 0 < rank <= n else math.inf


def count_bands(train_counts) -> np.ndarray:
    """The group of each class [C] by its training images: band k holds the counts in [2^k, 2^(k+1)) (0 and 1 in
    band 0), so a long tail's rare classes share a band and its head classes another."""
    return np.floor(np.log2(np.maximum(np.asarray(train_counts, np.float64), 1))).astype(np.int64)


class Conformal:
    """Split-conformal prediction sets over C classes, calibrated on probabilities [N, C] of held-out images;
    `classwise` or `groups` ([C] group ids) make the calibration class-conditional (Mondrian)."""

    def __init__(self, method: str = "lac", *, classwise: bool = False, groups=None) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
        if classwise and groups is not None:
            raise ValueError("give classwise=True or groups, not both")
        self.method, self.classwise = method, classwise
        self.groups = None if groups is None else np.asarray(groups, np.int64)

    def fit(self, proba: np.ndarray, y: np.ndarray) -> Conformal:
        """proba [N, C] of calibration images (never trained on: out-of-fold or held out), their labels y [N]."""
        proba, y = np.asarray(proba, np.float64), np.asarray(y, np.int64)
        if proba.ndim != 2 or len(proba) != len(y) or len(y) == 0:
            raise ValueError(f"calibration needs probabilities [N, C] and N labels; got {proba.shape} and {y.shape}")
        self.n_classes_ = proba.shape[1]
        if self.groups is not None and len(self.groups) != self.n_classes_:
            raise ValueError(f"groups must give one group a class ({self.n_classes_}); got {len(self.groups)}")
        self.groups_ = np.arange(self.n_classes_) if self.classwise else self.groups
        self.scores_ = _scores(proba, self.method)[np.arange(len(y)), y]  # the true class's score, each image
        self.labels_ = y
        self.top_proba_ = proba.max(1)  # what the unknown flag's threshold is read from
        return self

    def thresholds(self, coverage: float) -> np.ndarray:
        """The score threshold of each class [C]: one value repeated, or (classwise, groups) the one of the class's
        group, calibrated on the images whose true class is in it, where the group has the ceil((n + 1) * coverage)
        images that needs, the marginal one where it has fewer (a class of 15 images cannot certify 95%: its set
        would be every class; measured on cub100-LT, bench/abstain.py)."""
        coverage = check_coverage(coverage)
        marginal = _quantile(self.scores_, coverage)
        if self.groups_ is None:
            return np.full(self.n_classes_, marginal)
        of_image = self.groups_[self.labels_]
        level = {g: _quantile(self.scores_[of_image == g], coverage) for g in np.unique(self.groups_)}
        own = np.array([level[g] for g in self.groups_])
        return np.where(np.isinf(own), marginal, own)

    def predict_set(self, proba: np.ndarray, coverage: float) -> np.ndarray:
        """Membership [M, C] (bool) of the set of each image; the top-1 class is always in it."""
        proba = np.asarray(proba, np.float64)
        members = _scores(proba, self.method) <= self.thresholds(coverage)[None, :]
        members[np.arange(len(proba)), proba.argmax(1)] = True
        return members

    def unknown_threshold(self, accept: float = ACCEPT) -> float | None:
        """The top probability under which an image is "not one of the classes I know": the level that `accept` of
        the calibration images reach (None for a calibration saved before the flag existed)."""
        if getattr(self, "top_proba_", None) is None:
            return None
        return float(np.quantile(self.top_proba_, 1 - check_coverage(accept)))

    def is_unknown(self, proba: np.ndarray, accept: float = ACCEPT) -> np.ndarray | None:
        """[M] bool: the image's top probability is under `unknown_threshold` (None when there is none)."""
        threshold = self.unknown_threshold(accept)
        return None if threshold is None else np.asarray(proba, np.float64).max(1) < threshold

    def to_dict(self) -> dict:
        groups = None if self.groups is None else self.groups.tolist()
        return {"method": self.method, "classwise": self.classwise, "groups": groups,
                "n_classes": int(self.n_classes_), "scores": self.scores_.tolist(), "labels": self.labels_.tolist(),
                "top_proba": self.top_proba_.tolist(), "unknown_accept": ACCEPT}  # fmt: skip

    @property
    def calibration(self) -> str:
        """In words: how the thresholds are set."""
        if self.classwise:
            return "class by class"
        return "marginal" if self.groups is None else f"by {len(np.unique(self.groups))} groups of classes"

    @classmethod
    def from_dict(cls, d: dict) -> Conformal:
        out = cls(d["method"], classwise=d["classwise"], groups=d.get("groups"))
        out.n_classes_, out.scores_, out.labels_ = d["n_classes"], np.asarray(d["scores"]), np.asarray(d["labels"])
        out.groups_ = np.arange(out.n_classes_) if out.classwise else out.groups
        out.top_proba_ = np.asarray(d["top_proba"]) if "top_proba" in d else None
        return out


def coverage_report(members: np.ndarray, y: np.ndarray) -> dict:
    """Empirical coverage, mean set size and per-class coverage of sets [M, C] against labels [M]."""
    hit = members[np.arange(len(y)), y]
    per_class = {int(c): float(hit[y == c].mean()) for c in np.unique(y)}
    return {"coverage": float(hit.mean()), "mean_set_size": float(members.sum(1).mean()), "per_class": per_class}


def energy(logits: np.ndarray) -> np.ndarray:
    """[M] -logsumexp of logits [M, C]: higher = less like any class the classifier knows."""
    from scipy.special import logsumexp

    return -logsumexp(np.asarray(logits, np.float64), axis=1)


class UnknownScore:
    """Distance to the k-th nearest training feature (cosine distance of L2-normalised features); `threshold_` is
    the distance under which `accept` of the training images fall, each measured against the others."""

    def __init__(self, k: int = 10, *, accept: float = 0.95) -> None:
        self.k, self.accept = k, check_coverage(accept)

    def fit(self, X: np.ndarray) -> UnknownScore:
        X = _unit(X)
        self.gallery_ = X
        self.threshold_ = float(np.quantile(self._distance(X, skip_self=True), self.accept))
        return self

    def _distance(self, X: np.ndarray, *, skip_self: bool = False) -> np.ndarray:
        k = min(self.k + int(skip_self), len(self.gallery_))
        out = np.empty(len(X))
        for start in range(0, len(X), 2048):
            sims = X[start : start + 2048] @ self.gallery_.T
            kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1]  # the k-th largest similarity
            out[start : start + 2048] = 1.0 - kth
        return out

    def score(self, X: np.ndarray) -> np.ndarray:
        """[M] distances: higher = less like any training image."""
        return self._distance(_unit(X))

    def is_unknown(self, X: np.ndarray) -> np.ndarray:
        return self.score(X) > self.threshold_


def _unit(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
