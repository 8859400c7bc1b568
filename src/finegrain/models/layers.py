"""Layers the models are made of besides the backbone: the cosine head, the feature normalization, MSRA init."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class NormedLinear(nn.Module):
    """features [B, in_features] -> cosine logits [B, out_features] in [-1, 1], no bias.

    Pair it with a loss that scales the logits itself (LDAM's `s`); plain CE on cosines barely trains. The weight is
    stored [out_features, in_features] like nn.Linear's, so code that reads or resets a Linear head also works here.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The reference draws U(-1, 1) and renormalises each class vector to unit length.
        with torch.no_grad():
            self.weight.uniform_(-1.0, 1.0)
            self.weight.copy_(F.normalize(self.weight, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def msra_init_(module: nn.Module) -> None:
    """Kaiming/MSRA initialisation (He et al., 2015) of conv and linear layers; norms to identity."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="linear")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm | nn.LayerNorm) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class FeatureNorm(nn.Module):
    """L2-normalize each feature vector and scale it to norm sqrt(D) (unit size per dimension, so an MSRA head
    starts with ordinary logits): the probe's best normalization, kept inside the fine-tuned model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, dim=1) * math.sqrt(x.shape[1])
