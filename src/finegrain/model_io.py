"""Saved models: model.safetensors (weights only, no code runs on load) + model.json (how to rebuild and feed it)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import torch

from finegrain.atomic import atomic_write, atomic_write_json
from finegrain.errors import FinegrainError

FORMAT = "finegrain-classifier/1"


def save_weights(model: torch.nn.Module, path: str) -> None:
    """A module's state dict as safetensors, written atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda f: f.write(save(tensors)))


def export_model(model, folder: str, *, classes: Sequence[str], extra: dict | None = None) -> str:
    """Write an ImageClassifier to `folder` (atomic per file); returns the folder."""
    save_weights(model, os.path.join(folder, "model.safetensors"))
    meta = {
        "format": FORMAT,
        "backbone": model.backbone.name,
        "source": model.backbone.source,
        "preprocess": model.preprocess.to_dict(),
        "pooling": model.pooling_name,
        "feature_norm": bool(getattr(model, "feature_norm", False)),
        "head": "normed" if type(model.head).__name__ == "NormedLinear" else "linear",
        "num_classes": len(classes),
        "classes": list(classes),
        **(extra or {}),
    }
    atomic_write_json(os.path.join(folder, "model.json"), meta)
    return folder


class Predictor:
    """A loaded model, ready to predict: `predict(paths)` -> [(class name, probability)], `predict_proba(paths)`."""

    def __init__(self, model, classes: list[str], meta: dict, device: str = "cpu") -> None:
        self.model = model.eval().to(device)
        self.classes = classes
        self.meta = meta
        self.device = torch.device(device)

    @property
    def preprocess(self):
        return self.model.preprocess

    @torch.no_grad()
    def predict_proba(self, images: Sequence, *, batch_size: int = 32, tta=None) -> np.ndarray:
        """Paths or PIL images -> probabilities [N, C]. Undecodable files raise ImageDecodeError.

        tta: a `finegrain.evaluate.TTA` (or its text, e.g. "flip+5crop"): probabilities averaged over the views."""
        from PIL import Image

        from finegrain.data import load_image
        from finegrain.evaluate.inference import run_views
        from finegrain.evaluate.tta import TTA, image_views

        tta = TTA.parse(tta) if isinstance(tta, str) or tta is None else tta
        pres = tta.preprocesses(self.preprocess)
        out = []
        for i in range(0, len(images), batch_size):
            batch = [im if isinstance(im, Image.Image) else load_image(im) for im in images[i : i + batch_size]]
            batch = [im.convert("RGB") for im in batch]
            p = sum(
                run_views(
                    self.model, torch.stack([image_views(im, pre, tta) for im in batch]), pre, channels_last=False
                )
                for pre in pres
            )
            out.append((p / len(pres)).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def predict(self, images: Sequence, *, k: int = 1, tta=None) -> list[list[tuple[str, float]]]:
        proba = self.predict_proba(images, tta=tta)
        top = np.argsort(-proba, axis=1)[:, :k]
        return [[(self.classes[j], float(p[j])) for j in row] for p, row in zip(proba, top)]


def load(path: str, *, device: str = "cpu") -> Predictor:
    """Load a model saved by `finegrain train`: its run folder, its model/ folder, or one of the run's weight files
    (`best.safetensors`, `checkpoint-last.pt`: the same architecture with that checkpoint's weights, e.g. to
    ensemble checkpoints)."""
    from safetensors.torch import load_file

    from finegrain.backbones import Preprocess, create_backbone
    from finegrain.train.model import ImageClassifier

    weights = None
    if os.path.isfile(path) and path.endswith((".safetensors", ".pt", ".pth")):
        weights, path = path, os.path.dirname(os.path.abspath(path))
    folder = path if os.path.exists(os.path.join(path, "model.json")) else os.path.join(path, "model")
    meta_path = os.path.join(folder, "model.json")
    if not os.path.exists(meta_path):
        raise FinegrainError(f"no saved model in {path}: expected model.json and model.safetensors (finegrain train)")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise FinegrainError(f"{meta_path} is not a {FORMAT} file")
    backbone = create_backbone(meta["backbone"], pretrained=False)
    backbone.preprocess = Preprocess.from_dict(meta["preprocess"])
    model = ImageClassifier(
        backbone, meta["num_classes"], pooling=meta["pooling"], feature_norm=bool(meta.get("feature_norm", False))
    )
    if meta.get("head") == "normed":
        from finegrain.heads.normed_linear import NormedLinear

        model.head = NormedLinear(backbone.num_features, meta["num_classes"])
    weights = weights or os.path.join(folder, "model.safetensors")
    try:
        if weights.endswith(".safetensors"):
            state = load_file(weights)
        else:
            from finegrain.train.checkpoint import load_checkpoint

            state = load_checkpoint(weights)["model"]
        model.load_state_dict(state)
    except (OSError, RuntimeError) as e:
        raise FinegrainError(f"cannot load {weights}: {str(e).splitlines()[0]}") from None
    if weights != os.path.join(folder, "model.safetensors"):
        meta = {**meta, "weights": os.path.basename(weights)}
    return Predictor(model, meta["classes"], meta, device)
