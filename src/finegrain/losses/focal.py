"""Focal loss (Lin et al., ICCV 2017), softmax form, and the soft-target core the long-tail losses share.

`as_soft_targets` and `focal_terms` are the one path every long-tail loss takes: int labels become (optionally
smoothed) one-hot rows, and the per-row loss is -Σ_c t_c (1 - p_c)^γ log p_c, which is soft-target cross-entropy at
γ = 0. One-hot targets therefore give exactly the int-label loss, and mixup / CutMix targets need no special case.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def as_soft_targets(logits: torch.Tensor, target: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """logits [B, C], target int [B] or soft [B, C] -> float32 targets [B, C].

    Int labels get torch's label smoothing (1 - ε + ε/C on the label, ε/C elsewhere); soft targets are used as
    given, since `mix_batch` has already smoothed them.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [B, C], got {tuple(logits.shape)}")
    n_classes = logits.shape[1]
    if target.ndim == 2:
        if target.shape != logits.shape:
            raise ValueError(f"soft targets {tuple(target.shape)} do not match logits {tuple(logits.shape)}")
        return target.float()
    if target.ndim != 1 or target.is_floating_point() or target.shape[0] != logits.shape[0]:
        raise ValueError(f"target must be int [B] or soft [B, C], got {target.dtype} {tuple(target.shape)}")
    one_hot = torch.nn.functional.one_hot(target.long(), n_classes).float()
    return one_hot * (1.0 - label_smoothing) + label_smoothing / n_classes


def focal_terms(logits: torch.Tensor, soft: torch.Tensor, gamma: float = 0.0) -> torch.Tensor:
    """logits [B, C], soft targets [B, C] -> per-row loss [B]: -Σ_c t_c (1 - p_c)^γ log p_c (γ = 0: cross-entropy)."""
    log_p = logits.float().log_softmax(dim=-1)
    if gamma == 0:
        return -(soft * log_p).sum(dim=-1)
    # 1 - p is clamped away from 0: for γ < 1 the derivative of (1 - p)^γ is infinite at p = 1.
    modulating = (1.0 - log_p.exp()).clamp_min(1e-6).pow(gamma)
    return -(soft * modulating * log_p).sum(dim=-1)


def check_label_smoothing(label_smoothing: float) -> float:
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    return float(label_smoothing)


class FocalLoss(nn.Module):
    """Softmax focal loss, mean over the batch: -w_y (1 - p_y)^γ log p_y. logits [B, C]; target int [B] or soft [B, C].

    `gamma` = 0 and no `weight` is plain cross-entropy. `weight` [C] is an optional per-class factor (the α of Lin et
    al.); a soft row is weighted by Σ_c t_c w_c. `class_counts` is part of every loss's signature and unused here
    (use the "cb" loss with base="focal" for count-derived weights).
    """

    def __init__(
        self,
        gamma: float = 1.0,
        weight: Sequence[float] | torch.Tensor | None = None,
        *,
        label_smoothing: float = 0.0,
        class_counts: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.label_smoothing = check_label_smoothing(label_smoothing)
        w = None if weight is None else torch.as_tensor(weight, dtype=torch.float32).flatten()
        if w is not None and (not torch.isfinite(w).all() or (w < 0).any()):
            raise ValueError("weight must be finite and non-negative")
        self.register_buffer("weight", w, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        soft = as_soft_targets(logits, target, label_smoothing=self.label_smoothing)
        per_row = focal_terms(logits, soft, self.gamma)
        if self.weight is None:
            return per_row.mean()
        if self.weight.numel() != soft.shape[1]:
            raise ValueError(f"weight has {self.weight.numel()} classes, logits have {soft.shape[1]}")
        return (per_row * (soft @ self.weight.to(soft.device))).mean()

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, weighted={self.weight is not None}, label_smoothing={self.label_smoothing}"
