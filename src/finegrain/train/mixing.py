"""Mixup and CutMix on a batch, paired with the flipped batch as timm does (one lambda per batch); manifold mixup
(Verma et al., ICML 2019) mixes hidden features the same way.

timm's `Mixup` draws from numpy's global RNG; here every draw comes from the caller's `torch.Generator`, so a run
that checkpoints the generator state resumes with exactly the same mixes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MixConfig:
    """`mixup_alpha` / `cutmix_alpha`: Beta(α, α) concentration, 0 disables; `prob`: chance a batch is mixed;
    `switch_prob`: chance of CutMix rather than mixup when both are enabled."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5

    def __post_init__(self) -> None:
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {self.mixup_alpha}, {self.cutmix_alpha}")
        for name in ("prob", "switch_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def enabled(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0


def smooth_one_hot(y: torch.Tensor, num_classes: int, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """[B] int -> [B, C] float32 targets: 1 - ε + ε/C on the label, ε/C elsewhere (torch's label smoothing)."""
    off = label_smoothing / num_classes
    return F.one_hot(y.long(), num_classes).float() * (1.0 - label_smoothing) + off


def _cutmix_box(lam: float, h: int, w: int, cy: float, cx: float) -> tuple[int, int, int, int]:
    """Box of area ≈ (1 - lam)·H·W centred at (cy, cx) ∈ [0, 1)², clipped to the image: (y0, y1, x0, x1)."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    y, x = min(int(cy * h), h - 1), min(int(cx * w), w - 1)
    y0, y1 = max(y - ch // 2, 0), min(y + ch // 2, h)
    x0, x1 = max(x - cw // 2, 0), min(x + cw // 2, w)
    return y0, y1, x0, x1


def mix_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    cfg: MixConfig,
    *,
    label_smoothing: float = 0.0,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix x [B, 3, H, W] float with x.flip(0); returns (x_mixed [B, 3, H, W], soft targets [B, C] float32).

    Targets rows sum to 1 and already carry `label_smoothing`; with mixing disabled (or skipped by `prob`) they are
    the smoothed one-hot labels and x is returned as is. CutMix's lambda is corrected to the clipped box's area.
    """
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a float [B, C, H, W] batch, got {x.dtype} {tuple(x.shape)}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must be [B] labels matching x, got {tuple(y.shape)} for batch {x.shape[0]}")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    targets = smooth_one_hot(y, num_classes, label_smoothing=label_smoothing).to(x.device)
    if not cfg.enabled:
        return x, targets

    # A fixed number of draws per call: the generator advances the same way whichever branch is taken.
    u = torch.rand(4, generator=generator, device=generator.device).tolist()
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device).item())
    if u[0] >= cfg.prob:
        return x, targets
    use_cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha == 0 or u[1] < cfg.switch_prob)
    alpha = cfg.cutmix_alpha if use_cutmix else cfg.mixup_alpha
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))  # torch has no seeded public Beta sampler

    flipped = x.flip(0)
    if use_cutmix:
        h, w = x.shape[-2:]
        y0, y1, x0, x1 = _cutmix_box(lam, h, w, u[2], u[3])
        mixed = x.clone()
        mixed[:, :, y0:y1, x0:x1] = flipped[:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
    else:
        mixed = x * lam + flipped * (1.0 - lam)
    return mixed, targets * lam + targets.flip(0) * (1.0 - lam)


def mix_features(
    h: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    alpha: float,
    label_smoothing: float = 0.0,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Manifold mixup: hidden features h [B, ...] float (the cached trunk output at the cut) mixed with h.flip(0).

    Returns (λ·h + (1 - λ)·h.flip(0), the same mix of the smoothed one-hot targets [B, C] float32, λ), with
    λ ~ Beta(alpha, alpha) drawn from `generator` (one λ per batch); alpha = 0 returns h, the targets unmixed and 1.0.
    """
    if not h.is_floating_point() or h.ndim < 2:
        raise ValueError(f"h must be a float [B, ...] batch of features, got {h.dtype} {tuple(h.shape)}")
    if y.ndim != 1 or y.shape[0] != h.shape[0]:
        raise ValueError(f"y must be [B] labels matching h, got {tuple(y.shape)} for batch {h.shape[0]}")
    if alpha < 0 or not 0 <= label_smoothing < 1:
        raise ValueError(f"alpha must be >= 0 and label_smoothing in [0, 1), got {alpha}, {label_smoothing}")
    targets = smooth_one_hot(y, num_classes, label_smoothing=label_smoothing).to(h.device)
    if alpha == 0:
        return h, targets, 1.0
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device).item())
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))  # torch has no seeded public Beta sampler
    return h * lam + h.flip(0) * (1.0 - lam), targets * lam + targets.flip(0) * (1.0 - lam), lam
