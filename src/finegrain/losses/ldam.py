"""LDAM loss with deferred re-weighting (Cao et al., NeurIPS 2019, LDAM-DRW).

LDAM expects cosine logits in [-1, 1], from `finegrain.models.NormedLinear` (both features and class
weights L2-normalised, as in the reference code), and scales them by `s` itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from finegrain.losses.class_balanced import class_counts_tensor, effective_number_weights
from finegrain.losses.focal import as_soft_targets, check_label_smoothing, focal_terms


def ldam_margins(class_counts: Sequence[int], max_margin: float) -> torch.Tensor:
    """Per-class margins [C] float32: ∝ n_c^(-1/4), scaled so the rarest class gets `max_margin`."""
    m = class_counts_tensor(class_counts, loss="LDAM").pow(-0.25)
    return (m * (max_margin / m.max())).float()


class LDAMLoss(nn.Module):
    """Label-distribution-aware margin loss. logits [B, C] (cosine, in [-1, 1]); target int [B] or soft [B, C].

    Loss = CE(s · (z - t ⊙ m), t): the true class's logit loses its margin m_y before scaling (a soft row t
    subtracts t_c m_c from every class c, so a mixup of two labels shares their margins). `max_margin` = 0 and
    `s` = 1 is plain cross-entropy.

    Deferred re-weighting: with `drw_start` (a fraction of the run, e.g. 0.8), epochs from ⌈drw_start · total⌉
    (0-based, set through `set_epoch(epoch, total_epochs)`) weight each row by the class-balanced weight of its
    class (effective number with β = `drw_beta`; Σ_c t_c w_c for a soft row), reduced as torch's weighted mean
    Σ w_i ℓ_i / Σ w_i like the reference code. Before that, and when `set_epoch` is never called, no weights.
    """

    def __init__(
        self,
        max_margin: float = 0.5,
        s: float = 30.0,
        drw_start: float | None = None,
        drw_beta: float = 0.9999,
        *,
        label_smoothing: float = 0.0,
        class_counts: Sequence[int] | None,
    ) -> None:
        super().__init__()
        if max_margin < 0:
            raise ValueError(f"max_margin must be >= 0, got {max_margin}")
        if s <= 0:
            raise ValueError(f"s must be > 0, got {s}")
        if drw_start is not None and not 0 <= drw_start <= 1:
            raise ValueError(f"drw_start must be a fraction of the epochs in [0, 1] or None, got {drw_start}")
        self.max_margin, self.s, self.drw_start, self.drw_beta = float(max_margin), float(s), drw_start, drw_beta
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.register_buffer("margins", ldam_margins(class_counts, self.max_margin), persistent=False)
        self.register_buffer("drw_weights", effective_number_weights(class_counts, drw_beta), persistent=False)
        self.reweighting = False

    def drw_first_epoch(self, total_epochs: int) -> int | None:
        """The first re-weighted epoch (0-based) of a run of `total_epochs`, or None without DRW."""
        if self.drw_start is None:
            return None
        return math.ceil(round(self.drw_start * total_epochs, 6))  # round: 0.7 * 10 is 7.000000000000001

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        """Called by the engine before each epoch; switches re-weighting on from `drw_first_epoch(total_epochs)`."""
        first = self.drw_first_epoch(total_epochs)
        self.reweighting = first is not None and epoch >= first

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        soft = as_soft_targets(logits, target, label_smoothing=self.label_smoothing)
        if soft.shape[1] != self.margins.numel():
            raise ValueError(f"class_counts has {self.margins.numel()} classes, logits have {soft.shape[1]}")
        adjusted = self.s * (logits.float() - soft * self.margins.to(soft.device))
        per_row = focal_terms(adjusted, soft)
        if not self.reweighting:
            return per_row.mean()
        w = soft @ self.drw_weights.to(soft.device)
        return (w * per_row).sum() / w.sum()

    def extra_repr(self) -> str:
        return (
            f"max_margin={self.max_margin}, s={self.s}, drw_start={self.drw_start}, drw_beta={self.drw_beta}, "
            f"label_smoothing={self.label_smoothing}"
        )
