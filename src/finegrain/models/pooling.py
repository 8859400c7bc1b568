"""Global pooling of a feature map [B, C, H, W] -> [B, C]; a stage pooling also reads the backbone's stage maps.

A pooling whose `stage_maps` is k > 0 is called `pool(fmap, stages)` with the outputs of the backbone's last k
stages (models.classifier.forward_stages, one pass with the final map); every other pooling `pool(fmap)`.
`apply_pooling` makes that call for the models and the extraction alike.
"""

from __future__ import annotations

from collections.abc import Sequence

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


@POOLINGS.register("stages")
class StagePool(nn.Module):
    """Mid-level descriptor for domains far from ImageNet: GAP of each of the backbone's last `n` stage outputs
    [B, C_i, H_i, W_i] (and of the final feature map when `final`), each L2-normalized, concatenated -> [B, sum C_i].
    Every block has unit norm, so a wide block does not drown a narrow one.

    Parameter-free, for frozen features: `stages` (n=3) or `stages:N`. On efficientnet_lite0 the last 3 stages are
    blocks 4-6: 112 + 192 + 320 = 624 values (half of GAP's 1280), from the same forward pass as GAP. The final map is
    left out by default: on aerial scenes (rsscn7, bench/stages.py) finegrain's probe scores 0.839 without it and
    0.821 with it (its standardization lets the 1280 final values outweigh the 624 mid-level ones), plain logistic
    regression within 2 images either way; it also keeps the descriptor a view GAP does not already give.
    """

    frozen_only = True  # fine-tuning caches and trains on the final map alone (ImageClassifier.embed)

    def __init__(self, n: int = 3, *, final: bool = False) -> None:
        super().__init__()
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise ValueError(f"stages pooling needs n >= 1 stages, got {n!r}")
        self.n, self.final = int(n), bool(final)

    @property
    def stage_maps(self) -> int:
        """How many of the last stage outputs the caller passes."""
        return self.n

    def forward(self, x: torch.Tensor, stages: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """x: the final feature map [B, C, H, W]; stages: the last n stage outputs, in order."""
        if stages is None or len(stages) != self.n:
            got = "none" if stages is None else len(stages)
            raise FinegrainError(f"stages pooling needs the last {self.n} stage maps of the backbone, got {got}")
        maps = [*stages, x] if self.final else list(stages)
        return torch.cat([F.normalize(m.float().mean(dim=(2, 3)), dim=1, eps=1e-12) for m in maps], dim=1)

    def extra_repr(self) -> str:
        return f"n={self.n}, final={self.final}"


def stage_maps_needed(pool: nn.Module) -> int:
    """How many stage outputs a pooling reads besides the final map (0: a plain pooling)."""
    return int(getattr(pool, "stage_maps", 0))


def apply_pooling(pool: nn.Module, fmap: torch.Tensor, stages: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """pool(final map [B, C, H, W]) -> [B, D]; a stage pooling also gets the last of `stages` it needs."""
    k = stage_maps_needed(pool)
    if not k:
        return pool(fmap)
    return pool(fmap, list(stages)[len(stages) - k :] if len(stages) >= k else None)


def create_pooling(name: str, *, channels: int | None = None, **kwargs) -> nn.Module:
    """`gap`, `max`, `gem`, `gem:P` (e.g. `gem:4`), `attn` (learned, needs `channels`), `stages` or `stages:N`
    (the last N stage maps, L2 each, concatenated); None kwargs are ignored."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if name.startswith("gem:"):
        name, kwargs["p"] = "gem", float(name.split(":", 1)[1])
    if name.startswith("stages:"):
        name, n = "stages", name.split(":", 1)[1]
        if not n.isdigit():
            raise FinegrainError(f"stages:N takes a whole number of stages, got {n!r}")
        kwargs["n"] = int(n)
    if name == "attn":
        kwargs["channels"] = channels
    return POOLINGS.get(name)(**kwargs)


def has_learned_pooling(pool: nn.Module) -> bool:
    """Whether the pooling has parameters that training changes (attention, learnable GeM p)."""
    return any(p.requires_grad for p in pool.parameters())
