"""Class-balanced loss (Cui et al., CVPR 2019): re-weight each class by the inverse of its effective number."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from finegrain.losses.focal import as_soft_targets, check_label_smoothing, focal_terms

BASES = ("ce", "focal")


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
        per_row = focal_terms(logits, soft, self.gamma if self.base == "focal" else 0.0)
        return (per_row * (soft @ self.weight.to(soft.device))).mean()

    def extra_repr(self) -> str:
        focal = f", gamma={self.gamma}" if self.base == "focal" else ""
        return f"beta={self.beta}, base={self.base!r}{focal}, label_smoothing={self.label_smoothing}"
