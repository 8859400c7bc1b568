"""Decoupled and post-hoc classifiers for long-tailed data, on frozen representations (Kang et al., ICLR 2020;
Menon et al., ICLR 2021). scikit-learn style: `fit` returns self, learned state ends in `_`.

  LinearHead(sampler="class-balanced")          cRT: a linear classifier re-trained with class-balanced sampling
  LinearHead(scales_only=True, init=probe)      LWS: only a per-class scale of a trained classifier is learnt
  TauNormalized(probe, tau)                     τ-normalisation: w_c / ||w_c||^τ
  LogitAdjusted(probe, tau, class_counts)       post-hoc logit adjustment: logits - τ log π_c
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from finegrain.heads.checks import fit_data, predict_data
from finegrain.heads.select import select_on_validation

SAMPLING = ("instance", "class-balanced", "sqrt")


def class_weights_for_sampling(codes: np.ndarray, sampler: str) -> np.ndarray:
    """Per-sample draw probabilities [N]: instance (uniform), class-balanced (1/n_c), sqrt (n_c^-1/2)."""
    if sampler not in SAMPLING:
        raise ValueError(f"sampler must be one of {SAMPLING}, got {sampler!r}")
    counts = np.bincount(codes).astype(np.float64)
    power = {"instance": 0.0, "class-balanced": 1.0, "sqrt": 0.5}[sampler]
    w = counts[codes] ** -power
    return w / w.sum()


class _Linear(ClassifierMixin, BaseEstimator):
    """logits = X coef_^T + intercept_ over classes_ (coef_ [C, D], two rows for two classes); inputs checked by
    scikit-learn (heads/checks.py)."""

    def _logits(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "coef_")
        return predict_data(self, X) @ self.coef_.T + self.intercept_

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """[M, C] logits; with two classes scikit-learn's one score a row, > 0 for classes_[1]."""
        d = self._logits(X)
        return d[:, 1] - d[:, 0] if d.shape[1] == 2 else d

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return softmax(self._logits(X), axis=1)

    def predict(self, X: np.ndarray) -> np.ndarray:
        logits = self._logits(X)
        return self.classes_[np.argmax(logits, axis=1)]


class LinearHead(_Linear):
    """Softmax regression on features trained with SGD (momentum 0.9, cosine decay) and a chosen sampler.

    `init`: a fitted linear classifier (coef_, intercept_, classes_) to start from; with `scales_only=True`
    (LWS) its weights stay fixed and only a per-class scale f_c (logit_c = f_c (w_c·x + b_c)) is learnt.
    Trained from scratch (cRT), features are standardised first (statistics of the training features), which
    makes one learning rate fit raw and L2-normalised features alike; coef_ is folded back to raw features.
    """

    def __init__(
        self,
        *,
        sampler: str = "class-balanced",
        epochs: int = 30,
        lr: float = 0.05,
        weight_decay: float = 5e-4,
        batch_size: int = 256,
        scales_only: bool = False,
        init=None,
        random_state: int = 0,
    ) -> None:
        self.sampler = sampler
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.scales_only = scales_only
        self.init = init
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: np.ndarray) -> LinearHead:
        """X [N, D] features, y [N] labels."""
        if self.scales_only and self.init is None:
            raise ValueError("scales_only (LWS) needs init= a fitted linear classifier")
        X, y = fit_data(self, X, y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"a linear head needs at least 2 classes; y has {len(self.classes_)} class")
        p = torch.as_tensor(class_weights_for_sampling(codes, self.sampler))
        g = torch.Generator().manual_seed(self.random_state)
        mean, std = (X.mean(0), X.std(0) + 1e-6) if self.init is None else (np.zeros(X.shape[1]), np.ones(X.shape[1]))
        Xt, yt = torch.as_tensor((X - mean) / std, dtype=torch.float32), torch.as_tensor(codes)
        c, d = len(self.classes_), Xt.shape[1]
        if self.init is not None:
            W0 = torch.as_tensor(np.asarray(self.init.coef_, np.float32)).clone()
            b0 = torch.as_tensor(np.asarray(self.init.intercept_, np.float32)).clone()
        else:
            W0 = torch.randn(c, d, generator=g) * (1.0 / d) ** 0.5
            b0 = torch.zeros(c)
        scale = torch.ones(c, requires_grad=self.scales_only)
        W, b = W0.requires_grad_(not self.scales_only), b0.requires_grad_(not self.scales_only)
        params = [scale] if self.scales_only else [W, b]
        opt = torch.optim.SGD(
            params, lr=self.lr, momentum=0.9, weight_decay=0.0 if self.scales_only else self.weight_decay
        )
        steps = self.epochs * max(1, -(-len(Xt) // self.batch_size))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        for _ in range(steps):
            idx = torch.multinomial(p, self.batch_size, replacement=True, generator=g)
            logits = scale * (Xt[idx] @ W.T + b)
            loss = torch.nn.functional.cross_entropy(logits, yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            coef = (scale[:, None] * W).numpy() / std.astype(np.float32)
            self.coef_ = coef.astype(np.float32)
            self.intercept_ = ((scale * b).numpy() - coef @ mean.astype(np.float32)).astype(np.float32)
            self.scales_ = scale.detach().numpy()
        self.n_features_in_ = d
        return self


class TauNormalized(_Linear):
    """w_c / ||w_c||^τ (and the bias alike) of a fitted linear classifier; τ = 0 leaves it unchanged."""

    def __init__(self, base, *, tau: float = 1.0) -> None:
        self.base = base
        self.tau = tau

    def fit(self, X: np.ndarray | None = None, y: np.ndarray | None = None) -> TauNormalized:
        norms = np.linalg.norm(self.base.coef_, axis=1) ** self.tau
        self.coef_ = self.base.coef_ / norms[:, None]
        self.intercept_ = self.base.intercept_ / norms
        self.classes_ = self.base.classes_
        return self


class LogitAdjusted(_Linear):
    """Post-hoc logit adjustment: decision_c - τ log π_c with π the training class prior."""

    def __init__(self, base, *, tau: float = 1.0, class_counts: Sequence[int] | None = None) -> None:
        self.base = base
        self.tau = tau
        self.class_counts = class_counts

    def fit(self, X: np.ndarray | None = None, y: np.ndarray | None = None) -> LogitAdjusted:
        if self.class_counts is None:
            raise ValueError("LogitAdjusted needs class_counts (training images per class, in classes_ order)")
        prior = np.asarray(self.class_counts, np.float64)
        prior = prior / prior.sum()
        self.coef_ = self.base.coef_
        self.intercept_ = self.base.intercept_ - self.tau * np.log(np.maximum(prior, 1e-12)).astype(np.float32)
        self.classes_ = self.base.classes_
        return self


def choose_tau(make, taus: Sequence[float], X_val: np.ndarray, y_val: np.ndarray) -> tuple[float, dict]:
    """The τ whose fitted `make(tau)` has the best balanced (mean per-class) accuracy on a validation split
    (`select_on_validation`, the one selection routine; ties go to the smaller τ when `taus` ascend)."""
    chosen = select_on_validation(lambda t: make(t).fit(), [float(t) for t in taus], X_val, y_val)
    return chosen.value, chosen.scores
