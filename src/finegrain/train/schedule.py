"""Learning-rate schedules as pure functions of the optimizer step: resuming a run is just setting the step."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch

SCHEDULE_KINDS = ("constant", "cosine", "step")


@dataclass(frozen=True)
class LRSchedule:
    """Linear warm-up from `warmup_start` × lr to lr over `warmup_steps`, then `kind` until `total_steps`.

    cosine: down to `min_lr_ratio` × lr at `total_steps`; step: × `step_gamma` at each of `step_milestones`
    (fractions of `total_steps`), floored at `min_lr_ratio`; constant: lr. Steps count optimizer updates from 0.
    """

    kind: str = "cosine"
    total_steps: int = 1
    warmup_steps: int = 0
    warmup_start: float = 0.1
    min_lr_ratio: float = 0.0
    step_milestones: tuple[float, ...] = (0.6, 0.85)
    step_gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"kind must be one of {list(SCHEDULE_KINDS)}, got {self.kind!r}")
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, got {self}")
        for name in ("warmup_start", "min_lr_ratio", "step_gamma"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        ms = tuple(float(m) for m in self.step_milestones)
        if any(not 0 < m <= 1 for m in ms) or list(ms) != sorted(ms):
            raise ValueError(f"step_milestones must be increasing fractions in (0, 1], got {self.step_milestones}")
        object.__setattr__(self, "step_milestones", ms)

    def lr_factor(self, step: int) -> float:
        """Multiplier of each group's base lr at optimizer step `step` (>= 0; past total_steps the end value)."""
        if step < self.warmup_steps:
            return self.warmup_start + (1.0 - self.warmup_start) * step / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        if self.kind == "step":
            passed = bisect.bisect_right([m * self.total_steps for m in self.step_milestones], step)
            return max(self.step_gamma**passed, self.min_lr_ratio)
        t = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's lr to its `initial_lr` (its lr the first time it is seen) × lr_factor(step)."""
        factor = self.lr_factor(step)
        for group in optimizer.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor
        return factor
