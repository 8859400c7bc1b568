"""THE model: backbone trunk -> pooling -> [feature norm] -> dropout -> head (linear, MSRA-initialised, or cosine).

The trunk is seen as stem -> stages -> post, so a regime can freeze a prefix (`last:K` trains the last K stages)
and the frozen prefix can be run once and cached. The same view feeds a stage pooling (`stages`): the last stages'
outputs come out of the one pass that makes the final map (`forward_stages`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from finegrain.backbones import Backbone
from finegrain.errors import FinegrainError
from finegrain.models.layers import FeatureNorm, KNNHead, NormedLinear, build_normalizer, msra_init_
from finegrain.models.pooling import apply_pooling, create_pooling, stage_maps_needed
from finegrain.models.zoom import zoom_maps

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


def forward_stages(model: nn.Module, x: torch.Tensor, n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Images [B, 3, S, S] -> (forward_features' final map [B, C, H, W], outputs of the last n stages), one pass
    through `stage_view(model)`'s stem -> stages -> post."""
    try:
        view = stage_view(model)
    except FinegrainError:
        raise FinegrainError(
            f"{type(model).__name__} has no known stage layout: the stages pooling works with EfficientNet, "
            "MobileNet, ResNet and ConvNeXt-style backbones; use gap or gem"
        ) from None
    if n > len(view.stages):
        raise FinegrainError(f"{type(model).__name__} has {len(view.stages)} stages; the pooling asks for {n}")
    for m in view.stem:
        x = m(x)
    maps = []
    for i, m in enumerate(view.stages):
        x = m(x)
        if i >= len(view.stages) - n:
            maps.append(x)
    for m in view.post:
        x = m(x)
    return x, maps


def backbone_maps(backbone: Backbone, x: torch.Tensor, n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(final feature map, last n stage maps); with n = 0 just `backbone.forward_features(x)` and no stage maps."""
    return forward_stages(backbone.model, x, n) if n else (backbone.forward_features(x), [])


def pooled_views(backbone: Backbone, x: torch.Tensor, pools, *, flip: bool = False, zoom: bool = False,
                 zoom_head: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[torch.Tensor]:  # fmt: skip
    """Each pooling's descriptor of images x [B, 3, S, S] from one trunk pass: [B, D], or with `zoom` (x decoded at
    twice the side, models/zoom.py) the full view's and the zoomed region's concatenated [B, 2D]; with `flip`, the
    image's and its mirror's averaged. `zoom_head`: (weights, bias) of a linear head whose predicted class's CAM places
    the box (else the class-agnostic map). The one place frozen descriptors are computed: extraction
    (embed/extract.py), a frozen model and a shared-trunk ensemble run this."""
    n = x.shape[0]
    both = torch.cat([x, x.flip(3)]) if flip else x
    need = max((stage_maps_needed(p) for p in pools), default=0)

    def maps(t: torch.Tensor):
        return backbone_maps(backbone, t, need)

    if zoom or zoom_head is not None:
        full, zoomed, _ = zoom_maps(maps, both, **dict(zip(("weights", "bias"), zoom_head or ())))
        out = [torch.cat([apply_pooling(p, *full), apply_pooling(p, *zoomed)], 1) for p in pools]
    else:
        fmap, stages = maps(both)
        out = [apply_pooling(p, fmap, stages) for p in pools]
    return [(o[:n] + o[n:]) / 2 for o in out] if flip else out


@torch.no_grad()
def pooled_dim(backbone: Backbone, pool: nn.Module) -> int:
    """Width D of what `pool` makes of the backbone's maps: num_features for a plain pooling; for a stage pooling
    the sum of the stage widths, read from one small dummy image (eval mode; the backbone's mode is restored)."""
    n = stage_maps_needed(pool)
    if not n:
        return backbone.num_features
    size = min(backbone.preprocess.input_size, 64)
    param = next(backbone.parameters(), None)
    x = torch.zeros(1, 3, size, size, device=None if param is None else param.device)
    was_training = backbone.training
    backbone.eval()
    try:
        return int(apply_pooling(pool, *backbone_maps(backbone, x, n)).shape[1])
    finally:
        backbone.train(was_training)


class ImageClassifier(nn.Module):
    """backbone.forward_features -> pooling -> [normalizer] -> dropout -> head [B, num_classes].

    head: "linear" (nn.Linear, MSRA init), "normed" (NormedLinear: cosine logits, for LDAM) or "knn" (a vote over a
    saved gallery of training embeddings; head_options: n_gallery, k, metric, weights, temperature).
    normalizer: see `build_normalizer` ("l2" = feature_norm=True); embed_dim: the dimension it outputs (PCA).
    flip: average the pooled features of the image and its mirror (the flip-averaged frozen descriptor).
    zoom: look closer (models/zoom.py): the input is decoded at twice the trunk's side; the head sees the full view's
    descriptor and the attention box's, concatenated (frozen models only)."""

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
        zoom: bool = False,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise FinegrainError(f"head must be one of {', '.join(HEADS)}; got {head!r}")
        backbone.reset_classifier(0)
        self.backbone = backbone
        self.pooling_name = pooling
        self.pool = create_pooling(pooling, channels=backbone.num_features)
        self.stage_maps = stage_maps_needed(self.pool)  # > 0: the pooling reads the last stages' maps too
        self.zoom = zoom
        # what the normalizer takes: num_features but for stages, twice that with zoom (full | zoomed region)
        self.pool_dim = pooled_dim(backbone, self.pool) * (2 if zoom else 1)
        self.normalizer_name = normalizer or ("l2" if feature_norm else "none")
        dim = embed_dim or self.pool_dim
        self.norm = build_normalizer(self.normalizer_name, self.pool_dim, dim)
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
        (pooled,) = pooled_views(self.backbone, x, [self.pool], flip=self.flip, zoom=self.zoom)
        with torch.autocast(x.device.type, enabled=False):
            feats = self.norm(pooled.float())
            return feats, self.head(self.dropout(feats))

    @torch.no_grad()
    def zoom_boxes(self, x: torch.Tensor) -> torch.Tensor:
        """A zoom model's attention boxes [B, 4] (fractions of the view) for images x decoded at its input size."""
        from finegrain.models.zoom import first_pass

        return first_pass(lambda t: backbone_maps(self.backbone, t, 0), x)[1]

    def embed(self, fmap: torch.Tensor) -> torch.Tensor:
        """Feature map -> the vector the head sees (pooled, then normalized)."""
        if self.zoom:
            raise FinegrainError("a look-closer (zoom) model runs two passes of its trunk: it is not fine-tuned")
        if self.stage_maps:
            raise FinegrainError(
                f"pooling {self.pooling_name!r} reads the backbone's stage maps, not the final map alone: "
                "it serves frozen models (extract, probe, fit), not fine-tuning"
            )
        return self.norm(self.pool(fmap))

    def forward_head(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.embed(fmap).to(self.head.weight.dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flip or self.zoom or self.stage_maps or not isinstance(self.head, nn.Linear | NormedLinear):
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
