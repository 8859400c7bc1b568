"""Classification losses, one strict registry: logits [B, C] and int [B] or soft [B, C] targets -> scalar.

Every loss is constructed as `cls(**params, class_counts=...)`: long-tail losses (focal, class-balanced, LDAM,
balanced softmax) need the training set's per-class counts; the others accept and ignore them. A new loss lives in
its own module and is registered below, so this file is the table of contents.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from finegrain.losses.class_balanced import ClassBalancedLoss
from finegrain.losses.cross_entropy import CrossEntropy
from finegrain.losses.focal import FocalLoss
from finegrain.losses.ldam import LDAMLoss
from finegrain.losses.logit_adjusted import BalancedSoftmaxLoss, LogitAdjustedLoss
from finegrain.registry import Registry

LOSSES: Registry[type[nn.Module]] = Registry("loss")
LOSSES.register("ce")(CrossEntropy)
LOSSES.register("focal")(FocalLoss)
LOSSES.register("cb")(ClassBalancedLoss)
LOSSES.register("ldam")(LDAMLoss)
LOSSES.register("logit-adjusted")(LogitAdjustedLoss)
LOSSES.register("balanced-softmax")(BalancedSoftmaxLoss)


def create_loss(name: str, *, class_counts: Sequence[int] | None = None, **kwargs) -> nn.Module:
    """Loss `name` (see LOSSES); kwargs set to None are ignored, so unset options keep the loss's defaults."""
    return LOSSES.create(name, class_counts=class_counts, **kwargs)


__all__ = [
    "LOSSES",
    "BalancedSoftmaxLoss",
    "ClassBalancedLoss",
    "CrossEntropy",
    "FocalLoss",
    "LDAMLoss",
    "LogitAdjustedLoss",
    "create_loss",
]
