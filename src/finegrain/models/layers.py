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


class UnitL2(nn.Module):
    """x / max(||x||, 1e-12) per row: the frozen-feature `l2` normalizer (embed/normalize.py) as a layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1, eps=1e-12)


class CenterL2(nn.Module):
    """Subtract the training mean [D], then L2 (CL2N): embed/normalize.py's `cl2n` as a layer."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x - self.mean, dim=1, eps=1e-12)


class PCAWhiten(nn.Module):
    """L2, center, project on whitened principal axes [D, k], then L2: embed/normalize.py's `pca-whiten`."""

    def __init__(self, dim: int, out_dim: int, *, l2_after: bool = True) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("components", torch.zeros(dim, out_dim))
        self.l2_after = l2_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (F.normalize(x, dim=1, eps=1e-12) - self.mean) @ self.components
        return F.normalize(z, dim=1, eps=1e-12) if self.l2_after else z


NORMALIZERS = ("none", "l2", "unit-l2", "cl2n", "pca-whiten")


def build_normalizer(name: str, dim: int, out_dim: int | None = None) -> nn.Module:
    """The normalizer layer between pooling and head. "l2" is the fine-tuning FeatureNorm (L2 x sqrt(D)); "unit-l2",
    "cl2n" and "pca-whiten" carry frozen-feature normalizers fitted on training features (state in the weights)."""
    if name == "none":
        return nn.Identity()
    if name == "l2":
        return FeatureNorm()
    if name == "unit-l2":
        return UnitL2()
    if name == "cl2n":
        return CenterL2(dim)
    if name == "pca-whiten":
        return PCAWhiten(dim, out_dim or dim)
    raise ValueError(f"normalizer must be one of {', '.join(NORMALIZERS)}; got {name!r}")


class KNNHead(nn.Module):
    """k-NN vote over a gallery of training embeddings [N, D] (labels [N]) -> log class probabilities [B, C].

    The same vote as heads.KNNClassifier: metric cosine or l2; weights uniform, distance (1/d, an exact match takes
    all the weight) or temperature (softmax(sim / T) over the neighbours). The gallery is saved with the weights."""

    def __init__(
        self,
        n_gallery: int,
        dim: int,
        num_classes: int,
        *,
        k: int = 10,
        metric: str = "cosine",
        weights: str = "temperature",
        temperature: float = 0.07,
    ) -> None:
        super().__init__()
        self.register_buffer("gallery", torch.zeros(n_gallery, dim))
        self.register_buffer("labels", torch.zeros(n_gallery, dtype=torch.long))
        self.num_classes, self.k, self.metric = num_classes, k, metric
        self.weights, self.temperature = weights, temperature

    def _similarities(self, x: torch.Tensor) -> torch.Tensor:
        x, g = x.double(), self.gallery.double()
        if self.metric == "cosine":
            return F.normalize(x, dim=1) @ F.normalize(g, dim=1).T
        return 2 * x @ g.T - (x * x).sum(1, keepdim=True) - (g * g).sum(1)[None, :]  # -squared distance

    def _vote_weights(self, sims: torch.Tensor) -> torch.Tensor:
        if self.weights == "uniform":
            return torch.ones_like(sims)
        if self.weights == "temperature":
            return (sims / self.temperature).softmax(1)
        dist = (1.0 - sims if self.metric == "cosine" else (-sims).clamp(min=0).sqrt()).clamp(min=0)
        exact = dist == 0
        w = 1.0 / dist.clamp(min=1e-300)
        return torch.where(exact.any(1, keepdim=True), exact.double(), w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sims, idx = self._similarities(x).topk(min(self.k, len(self.gallery)), dim=1)
        votes = torch.zeros(len(x), self.num_classes, dtype=torch.float64, device=x.device)
        votes.scatter_add_(1, self.labels[idx], self._vote_weights(sims))
        return (votes / votes.sum(1, keepdim=True)).clamp(min=1e-12).log().float()

    def extra_repr(self) -> str:
        return f"gallery={tuple(self.gallery.shape)}, k={self.k}, metric={self.metric}, weights={self.weights}"
