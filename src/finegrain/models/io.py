"""Saved models: model.safetensors (weights only, no code runs on load) + model.json (the ModelSpec)."""

from __future__ import annotations

import json
import os

import torch

from finegrain.atomic import atomic_write, atomic_write_json
from finegrain.errors import FinegrainError
from finegrain.models.checkpoint import load_checkpoint
from finegrain.models.classifier import ImageClassifier
from finegrain.models.spec import FORMAT, ModelSpec, build_model

WEIGHTS = "model.safetensors"
SPEC = "model.json"


def save_weights(model: torch.nn.Module, path: str) -> None:
    """A module's state dict as safetensors, written atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda f: f.write(save(tensors)))


def save_model(model: ImageClassifier, folder: str, spec: ModelSpec) -> str:
    """Write a model folder (each file atomic): its weights and its spec; returns the folder."""
    os.makedirs(folder, exist_ok=True)
    save_weights(model, os.path.join(folder, WEIGHTS))
    atomic_write_json(os.path.join(folder, SPEC), spec.to_dict())
    return folder


def timm_state_dict(model: ImageClassifier) -> tuple[dict[str, torch.Tensor], bool]:
    """(state dict in the backbone's own key layout, whether it carries the classifier).

    The trunk's keys lose finegrain's `backbone.model.` prefix, so `timm.create_model(name, pretrained=True,
    pretrained_cfg_overlay=dict(file=...))` loads them. A plain linear head on GAP without a feature normalizer is
    exactly timm's classifier and is included as `classifier.*` (timm's `num_classes=C` then reproduces the logits);
    any other head is left out (use `num_classes=0`: the trunk's pooled features)."""
    prefix = "backbone.model."
    state = {k[len(prefix) :]: v.detach().cpu() for k, v in model.state_dict().items() if k.startswith(prefix)}
    plain = (
        model.head_kind == "linear"
        and model.pooling_name in ("gap", "avg")
        and model.normalizer_name == "none"
        and not getattr(model, "flip", False)
    )
    name = model.backbone.model.default_cfg.get("classifier", "classifier") if plain else None
    if plain and isinstance(name, str):
        state[f"{name}.weight"] = model.head.weight.detach().cpu()
        state[f"{name}.bias"] = model.head.bias.detach().cpu()
    return {k: v.contiguous() for k, v in state.items()}, plain and isinstance(name, str)


def save_timm_weights(model: ImageClassifier, path: str) -> bool:
    """`timm_state_dict` as a safetensors file (atomic); returns whether the classifier is in it."""
    from safetensors.torch import save

    state, with_head = timm_state_dict(model)
    atomic_write(path, lambda f: f.write(save(state)))
    return with_head


def read_state(path: str) -> dict[str, torch.Tensor]:
    """Weights from a .safetensors file or a training checkpoint (.pt, read with weights_only=True)."""
    from safetensors.torch import load_file

    if path.endswith(".safetensors"):
        return load_file(path)
    return load_checkpoint(path)["model"]


def find_model_folder(path: str) -> tuple[str, str | None]:
    """(model folder, weights file or None) for a run folder, its model/ folder or one of the run's weight files
    (`best.safetensors`, `checkpoint-last.pt`: the same architecture with that checkpoint's weights)."""
    weights = None
    if os.path.isfile(path) and path.endswith((".safetensors", ".pt", ".pth")):
        weights, path = path, os.path.dirname(os.path.abspath(path))
    folder = path if os.path.exists(os.path.join(path, SPEC)) else os.path.join(path, "model")
    if not os.path.exists(os.path.join(folder, SPEC)):
        raise FinegrainError(f"no saved model in {path}: expected {SPEC} and {WEIGHTS} (finegrain train)")
    return folder, weights


def load_model(path: str) -> tuple[ImageClassifier, ModelSpec]:
    """Rebuild a saved model (eval mode, CPU) and its spec; see `find_model_folder` for what `path` may be."""
    folder, weights = find_model_folder(path)
    spec_path = os.path.join(folder, SPEC)
    try:
        with open(spec_path, encoding="utf-8") as f:
            spec = ModelSpec.from_dict(json.load(f))
    except (OSError, ValueError) as e:
        raise FinegrainError(f"{spec_path} is not a {FORMAT} file: {e}") from None
    model = build_model(spec, pretrained=False)
    weights = weights or os.path.join(folder, WEIGHTS)
    try:
        model.load_state_dict(read_state(weights))
    except (OSError, RuntimeError, KeyError) as e:
        raise FinegrainError(f"cannot load {weights}: {str(e).splitlines()[0]}") from None
    if weights != os.path.join(folder, WEIGHTS):
        spec = spec.replace(extra={**spec.extra, "weights": os.path.basename(weights)})
    return model.eval(), spec
