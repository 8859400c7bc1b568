"""Logit-adjusted loss (Menon et al., ICLR 2021) and balanced softmax (Ren et al., NeurIPS 2020).

Training adds τ · log π_c (π the training label prior) to the logits; at test time the raw logits are used, so the
classifier learns to predict as if the classes were balanced. Balanced softmax is the τ = 1 case (log n_c and
log π_c differ by a constant, which softmax ignores).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from finegrain.losses.class_balanced import class_counts_tensor
from finegrain.losses.focal import as_soft_targets, check_label_smoothing, focal_terms


class LogitAdjustedLoss(nn.Module):
    """CE(z + τ log π, t), mean over the batch. logits [B, C]; target int [B] or soft [B, C]. τ = 0 is plain CE.

    π_c = n_c / Σ n from `class_counts` (a class with no training image counted as one).
    """

    def __init__(self, tau: float = 1.0, *, label_smoothing: float = 0.0, class_counts: Sequence[int] | None) -> None:
        super().__init__()
        self.tau = float(tau)
        self.label_smoothing = check_label_smoothing(label_smoothing)
        counts = class_counts_tensor(class_counts, loss=type(self).__name__)
        self.register_buffer("log_prior", (counts / counts.sum()).log().float(), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        soft = as_soft_targets(logits, target, label_smoothing=self.label_smoothing)
        if soft.shape[1] != self.log_prior.numel():
            raise ValueError(f"class_counts has {self.log_prior.numel()} classes, logits have {soft.shape[1]}")
        adjusted = logits.float() + self.tau * self.log_prior.to(soft.device)
        return focal_terms(adjusted, soft).mean()

    def extra_repr(self) -> str:
        return f"tau={self.tau}, label_smoothing={self.label_smoothing}"


class BalancedSoftmaxLoss(LogitAdjustedLoss):
    """Balanced softmax: the logit-adjusted loss with τ fixed to 1. logits [B, C]; target int [B] or soft [B, C]."""

    def __init__(self, *, label_smoothing: float = 0.0, class_counts: Sequence[int] | None) -> None:
        super().__init__(1.0, label_smoothing=label_smoothing, class_counts=class_counts)
