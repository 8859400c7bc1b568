"""A loaded model, ready to predict on image files or PIL images: what `finegrain.load` returns."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from finegrain.data import load_image
from finegrain.evaluate.tta import TTA, TTAViews
from finegrain.models import ImageClassifier, ModelSpec, load_model
from finegrain.runtime import Runtime, forward


class Predictor:
    """`predict(images)` -> [(class name, probability)] per image, `predict_proba(images)` -> [N, C]."""

    def __init__(self, model: ImageClassifier, spec: ModelSpec, device: str = "cpu") -> None:
        self.model = model.eval().to(device)
        self.spec = spec
        self.device = torch.device(device)

    @property
    def classes(self) -> list[str]:
        return list(self.spec.classes)

    @property
    def meta(self) -> dict:
        """The model's description as saved in model.json."""
        return self.spec.to_dict()

    @property
    def preprocess(self):
        return self.model.preprocess

    @torch.no_grad()
    def predict_proba(self, images: Sequence, *, batch_size: int = 32, tta=None, runtime=None) -> np.ndarray:
        """Paths or PIL images -> probabilities [N, C]. Undecodable files raise ImageDecodeError.

        tta: a `finegrain.evaluate.TTA` (or its text, e.g. "flip+5crop"): probabilities averaged over the views.
        runtime: a `finegrain.runtime.Runtime` (default: fp32, contiguous layout, on the predictor's device)."""
        from PIL import Image

        tta = TTA.parse(tta) if isinstance(tta, str) or tta is None else tta
        rt = runtime or Runtime(str(self.device), "fp32", channels_last=False, workers=0)
        pres = tta.preprocesses(self.preprocess)
        views = TTAViews(pres, tta)
        out = []
        for i in range(0, len(images), batch_size):
            batch = [im if isinstance(im, Image.Image) else load_image(im) for im in images[i : i + batch_size]]
            per_image = [views(im.convert("RGB")) for im in batch]
            per_size = [torch.stack([v[s] for v in per_image]) for s in range(len(pres))]
            p = sum(forward(self.model, x, pre, rt).proba for x, pre in zip(per_size, pres))
            out.append((p / len(pres)).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def predict(self, images: Sequence, *, k: int = 1, tta=None) -> list[list[tuple[str, float]]]:
        proba = self.predict_proba(images, tta=tta)
        top = np.argsort(-proba, axis=1)[:, :k]
        return [[(self.classes[j], float(p[j])) for j in row] for p, row in zip(proba, top)]


def load(path: str, *, device: str = "cpu") -> Predictor:
    """Load a model saved by finegrain: a run folder, its model/ folder, or one of the run's weight files
    (`best.safetensors`, `checkpoint-last.pt`: the same architecture with that checkpoint's weights)."""
    model, spec = load_model(path)
    return Predictor(model, spec, device)
