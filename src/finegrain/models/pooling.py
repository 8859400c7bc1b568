"""Global pooling of a feature map [B, C, H, W] -> [B, C]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finegrain.errors import FinegrainError
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


@POOLINGS.register("attn")
class AttentionPool(nn.Module):
    """Learned spatial attention before pooling: a small conv net scores each position, softmax over positions,
    the features are averaged with those weights.

    The last conv starts at zero, so the weights start uniform and the layer starts as exactly GAP; fine-tuning
    then learns where to look. `attention_map(x)` gives the weights [B, H, W] (shown like a CAM).
    """

    learned = True

    def __init__(self, channels: int | None = None, *, hidden: int = 128) -> None:
        super().__init__()
        if not channels:
            raise FinegrainError(
                "attn pooling is learned: use it when fine-tuning (finegrain train pooling=attn), "
                "not for frozen feature extraction (use gap or gem)"
            )
        self.score = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, 1, 1))
        nn.init.kaiming_normal_(self.score[0].weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.score[0].bias)
        nn.init.zeros_(self.score[2].weight)
        nn.init.zeros_(self.score[2].bias)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> attention weights [B, H, W], summing to 1 over positions."""
        logits = self.score(x.float()).flatten(1)
        return logits.softmax(dim=1).view(x.shape[0], *x.shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.attention_map(x)
        return torch.einsum("bchw,bhw->bc", x.float(), w)


def create_pooling(name: str, *, channels: int | None = None, **kwargs) -> nn.Module:
    """`gap`, `max`, `gem`, `gem:P` (e.g. `gem:4`) or `attn` (learned, needs `channels`); None kwargs are ignored."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if name.startswith("gem:"):
        name, kwargs["p"] = "gem", float(name.split(":", 1)[1])
    if name == "attn":
        kwargs["channels"] = channels
    return POOLINGS.get(name)(**kwargs)


def has_learned_pooling(pool: nn.Module) -> bool:
    """Whether the pooling has parameters that training changes (attention, learnable GeM p)."""
    return any(p.requires_grad for p in pool.parameters())
