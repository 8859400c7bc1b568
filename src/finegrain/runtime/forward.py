"""One forward pass for every inference: uint8 images (or views of them) -> features and probabilities."""

from __future__ import annotations

from typing import NamedTuple

import torch

from finegrain.backbones import Preprocess
from finegrain.runtime.settings import Runtime


class Output(NamedTuple):
    """features: float32 [B, D] (a dict of them for a model with several poolings), the vector a head sees;
    proba: float32 [B, C] softmax probabilities, None for a feature model. Both are averaged over the views."""

    features: torch.Tensor | dict[str, torch.Tensor]
    proba: torch.Tensor | None


def _mean_views(t: torch.Tensor, b: int) -> torch.Tensor:
    return t.view(b, -1, *t.shape[1:]).mean(1)


@torch.no_grad()
def forward(model: torch.nn.Module, images: torch.Tensor, preprocess: Preprocess, runtime: Runtime) -> Output:
    """images: uint8 [B, 3, S, S], or [B, V, 3, S, S] for V views of each image (TTA), averaged.

    A classifier (`forward_all(x) -> (features, logits)`) gives both; any other module's output is its features.
    The model must already be on the runtime's device (`runtime.prepare(model)`)."""
    b = images.shape[0]
    x = runtime.to_input(images.flatten(0, 1) if images.dim() == 5 else images, preprocess)
    with runtime.autocast():
        if hasattr(model, "forward_all"):
            feats, logits = model.forward_all(x)
        else:
            feats, logits = model(x), None
    if isinstance(feats, dict):
        feats = {k: _mean_views(v.float(), b) for k, v in feats.items()}
    else:
        feats = _mean_views(feats.float(), b)
    proba = None if logits is None else _mean_views(logits.float().softmax(-1), b)
    return Output(feats, proba)
