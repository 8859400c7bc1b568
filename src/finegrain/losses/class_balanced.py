"""Class-balanced loss (Cui et al., CVPR 2019): re-weight each class by the inverse of its effective number.

Four bases, as in the paper and its reference code (github.com/richardaecn/class-balanced-loss, src/cifar_main.py):
  ce             softmax cross-entropy
  focal          softmax focal loss
  sigmoid        one-vs-all sigmoid cross-entropy, summed over classes, divided by the number of positives
  sigmoid-focal  the paper's "class-balanced focal loss": sigmoid cross-entropy times (1 - p_t)^γ, likewise
The sigmoid forms need the classifier's bias initialised to -log(C - 1) (the reference's prior π = 1/C, so that the
C - 1 negatives do not swamp the first steps): `head_bias_init(C)` gives that value, and training applies it to a
new head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from finegrain.losses.focal import as_soft_targets, check_label_smoothing, focal_terms

BASES = ("ce", "focal", "sigmoid", "sigmoid-focal")


def class_counts_tensor(class_counts: Sequence[int] | None, *, loss: str) -> torch.Tensor:
    """Training images per class [C] -> float64 counts [C], a class with no image counted as one.

    A class without training images never occurs as a target; counting it as one keeps its weight, margin or
    log-prior finite.
    """
    if class_counts is None:
        raise ValueError(f"the {loss} loss needs class_counts (training images per class)")
    counts = torch.as_tensor(list(class_counts), dtype=torch.float64)
    if counts.ndim != 1 or counts.numel() == 0 or (counts < 0).any() or not torch.isfinite(counts).all():
        raise ValueError(f"class_counts must be a non-empty sequence of counts >= 0, got {list(class_counts)}")
    return counts.clamp_min(1.0)


def effective_number_weights(class_counts: Sequence[int], beta: float) -> torch.Tensor:
    """Per-class weights [C] float32: (1 - β) / (1 - β^n_c), normalised to sum to C. β = 0 gives all ones."""
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    counts = class_counts_tensor(class_counts, loss="class-balanced")
    w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts))
    return (w / w.sum() * len(counts)).float()


class ClassBalancedLoss(nn.Module):
    """Class-balanced cross-entropy or softmax focal loss. logits [B, C]; target int [B] or soft [B, C].

    Loss = mean over the batch of w_y · ℓ, with w from `effective_number_weights` (a soft row gets Σ_c t_c w_c),
    as in Cui et al.'s reference code: a plain batch mean, the weights (summing to C) setting the scale.
    β = 0 is plain cross-entropy (or focal loss); β → 1 approaches inverse-frequency weighting.
    """

    def __init__(
        self,
        beta: float = 0.9999,
        base: str = "ce",
        gamma: float = 1.0,
        *,
        label_smoothing: float = 0.0,
        class_counts: Sequence[int] | None,
    ) -> None:
        super().__init__()
        if base not in BASES:
            raise ValueError(f"unknown base {base!r}; valid bases: {', '.join(BASES)}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.beta, self.base, self.gamma = float(beta), base, float(gamma)
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.register_buffer("weight", effective_number_weights(class_counts, self.beta), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        soft = as_soft_targets(logits, target, label_smoothing=self.label_smoothing)
        if soft.shape[1] != self.weight.numel():
            raise ValueError(f"class_counts has {self.weight.numel()} classes, logits have {soft.shape[1]}")
        row_weight = soft @ self.weight.to(soft.device)
        if self.base.startswith("sigmoid"):
            per_row = sigmoid_focal_terms(logits, soft, self.gamma if self.base == "sigmoid-focal" else 0.0)
            return (per_row * row_weight).sum() / soft.sum().clamp_min(1e-12)
        per_row = focal_terms(logits, soft, self.gamma if self.base == "focal" else 0.0)
        return (per_row * row_weight).mean()

    def head_bias_init(self, n_classes: int) -> float | None:
        """The bias a new linear head should start from: -log(C - 1) for the sigmoid bases, None otherwise."""
        return -math.log(max(n_classes - 1, 1)) if self.base.startswith("sigmoid") else None

    def extra_repr(self) -> str:
        focal = f", gamma={self.gamma}" if self.base.endswith("focal") else ""
        return f"beta={self.beta}, base={self.base!r}{focal}, label_smoothing={self.label_smoothing}"


def sigmoid_focal_terms(logits: torch.Tensor, soft: torch.Tensor, gamma: float = 0.0) -> torch.Tensor:
    """logits [B, C], targets [B, C] -> per-row loss [B]: Σ_c (1 - p_t)^γ BCE(z_c, t_c), p = sigmoid(z).

    The modulator is computed as exp(-γ t z - γ log(1 + e^-z)) = (1 - p_t)^γ for t in {0, 1}, the reference code's
    numerically stable form (no pow of a number near 0).
    """
    z = logits.float()
    bce = F.binary_cross_entropy_with_logits(z, soft, reduction="none")
    if gamma == 0:
        return bce.sum(dim=-1)
    modulator = torch.exp(-gamma * soft * z - gamma * F.softplus(-z))
    return (modulator * bce).sum(dim=-1)
