"""Global pooling of a feature map [B, C, H, W] -> [B, C]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finegrain.registry import Registry

POOLINGS: Registry[type[nn.Module]] = Registry("pooling")


@POOLINGS.register("gap")
class GlobalAvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean(dim=(2, 3))


@POOLINGS.register("max")
class GlobalMaxPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().amax(dim=(2, 3))


@POOLINGS.register("gem")
class GeM(nn.Module):
    """Generalized mean pooling (Radenović et al., 2018): (mean x^p)^(1/p); p=1 is GAP, p→∞ is max.

    `learnable=True` makes p a parameter (for fine-tuning); features are clamped at `eps` since p-th powers of
    negative activations are undefined (the lite backbones end in ReLU6, so nothing is lost there).
    """

    def __init__(self, p: float = 3.0, *, learnable: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"GeM p must be > 0, got {p}")
        t = torch.tensor(float(p))
        if learnable:
            self.p = nn.Parameter(t)
        else:
            self.register_buffer("p", t)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p
        return F.adaptive_avg_pool2d(x.float().clamp(min=self.eps).pow(p), 1).pow(1.0 / p).flatten(1)


def create_pooling(name: str, **kwargs) -> nn.Module:
    """`gap`, `max`, `gem` or `gem:P` (e.g. `gem:4`); kwargs set to None are ignored."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if name.startswith("gem:"):
        name, kwargs["p"] = "gem", float(name.split(":", 1)[1])
    return POOLINGS.get(name)(**kwargs)
