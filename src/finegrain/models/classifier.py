"""THE model: backbone trunk -> pooling -> [feature norm] -> dropout -> head (linear, MSRA-initialised, or cosine).

The trunk is seen as stem -> stages -> post, so a regime can freeze a prefix (`last:K` trains the last K stages)
and the frozen prefix can be run once and cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from finegrain.backbones import Backbone
from finegrain.errors import FinegrainError
from finegrain.models.layers import FeatureNorm, KNNHead, NormedLinear, build_normalizer, msra_init_
from finegrain.models.pooling import create_pooling

HEADS = ("linear", "normed", "knn")


@dataclass
class StageView:
    stem: list[nn.Module]
    stages: list[nn.Module]
    post: list[nn.Module]
    stage_names: list[str]  # parameter-name prefixes of the stages, in order


def stage_view(model: nn.Module) -> StageView:
    """Stem, stages and post-stage modules of a timm model whose forward_features is stem -> stages -> post."""
    if hasattr(model, "conv_stem") and hasattr(model, "blocks"):  # EfficientNet, MobileNetV2/V3, MixNet...
        post = [m for m in (getattr(model, "conv_head", None), getattr(model, "bn2", None)) if m is not None]
        n = len(model.blocks)
        return StageView([model.conv_stem, model.bn1], list(model.blocks), post, [f"blocks.{i}." for i in range(n)])
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)) and hasattr(model, "conv1"):  # ResNet family
        stem = [model.conv1, model.bn1, model.act1, model.maxpool]
        return StageView(
            stem, [getattr(model, f"layer{i}") for i in range(1, 5)], [], [f"layer{i}." for i in range(1, 5)]
        )
    if hasattr(model, "stem") and hasattr(model, "stages"):  # ConvNeXt, RegNet, NFNet...
        post = [m for m in (getattr(model, "norm_pre", None), getattr(model, "final_conv", None)) if m is not None]
        n = len(model.stages)
        return StageView([model.stem], list(model.stages), post, [f"stages.{i}." for i in range(n)])
    raise FinegrainError(
        f"{type(model).__name__} has no known stage layout: use --regime head or full "
        "(last:K works with EfficientNet, MobileNet, ResNet and ConvNeXt-style backbones)"
    )


class ImageClassifier(nn.Module):
    """backbone.forward_features -> pooling -> [normalizer] -> dropout -> head [B, num_classes].

    head: "linear" (nn.Linear, MSRA init), "normed" (NormedLinear: cosine logits, for LDAM) or "knn" (a vote over a
    saved gallery of training embeddings; head_options: n_gallery, k, metric, weights, temperature).
    normalizer: see `build_normalizer` ("l2" = feature_norm=True); embed_dim: the dimension it outputs (PCA).
    flip: average the pooled features of the image and its mirror (the flip-averaged frozen descriptor)."""

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        *,
        pooling: str = "gap",
        drop_rate: float = 0.0,
        feature_norm: bool = False,
        head: str = "linear",
        normalizer: str | None = None,
        embed_dim: int | None = None,
        flip: bool = False,
        head_options: dict | None = None,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise FinegrainError(f"head must be one of {', '.join(HEADS)}; got {head!r}")
        backbone.reset_classifier(0)
        self.backbone = backbone
        self.pooling_name = pooling
        self.pool = create_pooling(pooling, channels=backbone.num_features)
        self.normalizer_name = normalizer or ("l2" if feature_norm else "none")
        dim = embed_dim or backbone.num_features
        self.norm = build_normalizer(self.normalizer_name, backbone.num_features, dim)
        self.flip = flip
        self.dropout = nn.Dropout(drop_rate)
        if head == "knn":
            self.head = KNNHead(dim=dim, num_classes=num_classes, **(head_options or {}))
        elif head == "normed":
            self.head = NormedLinear(dim, num_classes)
        else:
            self.head = nn.Linear(dim, num_classes)
            msra_init_(self.head)

    @property
    def preprocess(self):
        return self.backbone.preprocess

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    @property
    def feature_norm(self) -> bool:
        return isinstance(self.norm, FeatureNorm)

    @property
    def head_kind(self) -> str:
        return {NormedLinear: "normed", KNNHead: "knn"}.get(type(self.head), "linear")

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B, 3, S, S] -> (the vector the head sees [B, D], logits [B, C]) in one pass (the inference path:
        the normalizer and head run in float32 even under autocast, as the frozen heads were fitted)."""
        n = x.shape[0]
        pooled = self.pool(self.forward_features(torch.cat([x, x.flip(3)]) if self.flip else x))
        if self.flip:
            pooled = (pooled[:n] + pooled[n:]) / 2
        with torch.autocast(x.device.type, enabled=False):
            feats = self.norm(pooled.float())
            return feats, self.head(self.dropout(feats))

    def embed(self, fmap: torch.Tensor) -> torch.Tensor:
        """Feature map -> the vector the head sees (pooled, then normalized)."""
        return self.norm(self.pool(fmap))

    def forward_head(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.embed(fmap).to(self.head.weight.dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flip or not isinstance(self.head, nn.Linear | NormedLinear):
            return self.forward_all(x)[1]
        return self.forward_head(self.forward_features(x))

    # ---- split at stage boundary: trunk (frozen, cacheable) and tail (trained) --------------------------------------
    def trunk(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Stem and all stages but the last k: the input of the first trained stage."""
        view = stage_view(self.backbone.model)
        for m in view.stem + view.stages[: len(view.stages) - k]:
            x = m(x)
        return x

    def tail(self, h: torch.Tensor, k: int) -> torch.Tensor:
        """Last k stages, post-stage layers, pooling and head: trunk output -> logits."""
        view = stage_view(self.backbone.model)
        for m in view.stages[len(view.stages) - k :] + view.post:
            h = m(h)
        return self.forward_head(h)
