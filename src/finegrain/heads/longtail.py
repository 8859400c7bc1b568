"""Long-tail heads on frozen features, each with its hyperparameter chosen the same way on the same split.

`fit_long_tail_heads(X, y, X_val, y_val)` fits the methods that bench.longtail compares — CE probe, NCM, τ-norm,
post-hoc logit adjustment, cRT and LWS — and chooses every hyperparameter (the probe's C, τ, cRT's weight decay)
with `select_on_validation` on the one validation split it is given (for long-tailed data: a class-balanced one).
The CE probe is therefore chosen on the same balanced split as the post-hoc methods built on it, not on a split of
the long-tailed training set (which favours the head classes and made the post-hoc gain look larger).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from finegrain.heads.decoupled import LinearHead, LogitAdjusted, TauNormalized
from finegrain.heads.ncm import NearestClassMean
from finegrain.heads.probe import DEFAULT_CS, LogisticProbe
from finegrain.heads.select import Selection, select_on_validation

TAUS = tuple(round(float(t), 2) for t in np.linspace(0.0, 2.0, 11))
CRT_WEIGHT_DECAYS = (2e-3, 2e-2, 2e-1)


def fit_long_tail_heads(
    X: np.ndarray,
    y: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    *,
    Cs: Sequence[float] = DEFAULT_CS,
    taus: Sequence[float] = TAUS,
    crt_weight_decays: Sequence[float] = CRT_WEIGHT_DECAYS,
    seed: int = 0,
) -> dict[str, Selection]:
    """{method: Selection} for every long-tail head, fitted on (X, y), chosen on (X_val, y_val).

    Class counts for logit adjustment are those of y (the training labels, in np.unique order)."""
    counts = np.unique(np.asarray(y), return_counts=True)[1]

    def probe(C):
        return LogisticProbe(Cs=[C], random_state=seed).fit(X, y)

    def crt(wd):
        return LinearHead(sampler="class-balanced", weight_decay=wd, random_state=seed).fit(X, y)

    out = {"CE probe": select_on_validation(probe, list(Cs), X_val, y_val)}
    ce = out["CE probe"].estimator
    out["NCM"] = select_on_validation(lambda _: NearestClassMean().fit(X, y), [None], X_val, y_val)
    out["tau-norm"] = select_on_validation(lambda t: TauNormalized(ce, tau=t).fit(), list(taus), X_val, y_val)
    out["logit adjustment (post-hoc)"] = select_on_validation(
        lambda t: LogitAdjusted(ce, tau=t, class_counts=counts).fit(), list(taus), X_val, y_val
    )
    out["cRT (class-balanced re-training)"] = select_on_validation(crt, list(crt_weight_decays), X_val, y_val)
    out["LWS (learnable weight scaling)"] = select_on_validation(
        lambda _: LinearHead(scales_only=True, init=ce, random_state=seed).fit(X, y), [None], X_val, y_val
    )
    return out
