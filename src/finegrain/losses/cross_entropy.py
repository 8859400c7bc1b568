"""Cross-entropy on int labels or soft (mixup / CutMix) targets."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class CrossEntropy(nn.Module):
    """Cross-entropy, mean over the batch. logits [B, C]; target int [B] or soft [B, C] with rows summing to 1.

    `label_smoothing` applies to int targets only (same as torch's); soft targets are used as given, since
    `mix_batch` has already smoothed them. `class_counts` is part of every loss's signature and unused here.
    """

    def __init__(self, label_smoothing: float = 0.0, *, class_counts: Sequence[int] | None = None) -> None:
        super().__init__()
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # log-softmax in fp32 even under autocast
        if target.ndim == 2:
            if target.shape != logits.shape:
                raise ValueError(f"soft targets {tuple(target.shape)} do not match logits {tuple(logits.shape)}")
            return -(target.float() * logits.log_softmax(dim=-1)).sum(dim=-1).mean()
        if target.ndim != 1 or target.is_floating_point():
            raise ValueError(f"target must be int [B] or soft [B, C], got {target.dtype} {tuple(target.shape)}")
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}"
