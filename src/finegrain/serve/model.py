"""The model behind the service: batch probabilities, one image's CAM overlay, its nearest gallery images, and the
description GET /model returns. Every call that touches the torch model runs in the one model thread (the batcher's
executor): Grad-CAM hooks and a batch forward must never interleave on the same modules."""

from __future__ import annotations

import base64
import inspect
import io
import json
import os
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from finegrain.errors import FinegrainError
from finegrain.evaluate.predictor import Ensemble, Predictor, load
from finegrain.models.layers import KNNHead
from finegrain.serve.gallery import find_gallery_paths


def load_predictor(path: str, *, device: str = "cpu", runtime: str | None = None) -> Predictor | Ensemble:
    """`finegrain.evaluate.predictor.load`, passing `runtime` (auto | torch | onnx) when this build's loader takes
    it; without that support only the torch path exists, so auto and torch load it and onnx is refused."""
    if not os.path.exists(path):
        raise FinegrainError(f"no model at {path}: give a model folder (or a run folder) saved by finegrain")
    if runtime is not None and "runtime" in inspect.signature(load).parameters:
        return load(path, device=device, runtime=runtime)
    if runtime not in (None, "auto", "torch"):
        raise FinegrainError(f"runtime {runtime!r} is not available in this finegrain build; use auto or torch")
    return load(path, device=device)


def _png_data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def _model_name(path: str | None) -> str | None:
    """The model folder's name, or its parent's when the folder is the conventional `model/`."""
    if not path:
        return None
    parts = os.path.abspath(path).rstrip(os.sep).split(os.sep)
    return parts[-2] if parts[-1] == "model" and len(parts) > 1 else parts[-1]


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, int | float | str | bool) or v is None}


class ServedModel:
    """A loaded finegrain model (Predictor or Ensemble) and what the service needs from it."""

    def __init__(self, predictor: Predictor | Ensemble, *, path: str | None = None) -> None:
        self.predictor, self.path = predictor, path
        self.members: list[Predictor] = predictor.members if isinstance(predictor, Ensemble) else [predictor]
        self.classes = list(predictor.classes)
        self.knn = next((m for m in self.members if isinstance(m.model.head, KNNHead)), None)
        self.gallery_paths: list[str] | None = None
        self.gallery_note = "the model has no gallery (not a k-NN model)"
        if self.knn is not None:
            self.gallery_note = "neighbours by class and similarity only (the model was given without its folder)"
            if path is not None:
                spec = self.knn.spec
                self.gallery_paths, self.gallery_note = find_gallery_paths(
                    path, self.knn.model, spec.backbone, spec.pooling
                )

    @property
    def min_side(self) -> int:
        """The short side the first member resizes to: large JPEGs are decoded at a reduced scale down to it."""
        return min(m.preprocess.resize_size for m in self.members)

    def predict_batch(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        """RGB images -> one probability row [C] each (a single forward pass for the whole batch)."""
        proba = self.predictor.predict_proba(list(images), batch_size=max(1, len(images)))
        return list(np.asarray(proba, dtype=np.float64))

    def warm_up(self) -> None:
        """One prediction on a synthetic photo: allocations, and the engine `--runtime auto` chooses (a measured
        race, an ONNX conversion the first time), happen before the first request."""
        self.predict_batch([Image.fromarray(np.full((240, 320, 3), 128, np.uint8))])

    @property
    def engines(self) -> list[str]:
        """Which engine runs each member at each input size, and why (the predictor's own notes)."""
        runners = getattr(self.predictor, "runners", [(self.predictor, 1.0)])  # an ensemble: its trunks once each
        return [note for m, _ in runners for note in getattr(m, "engine_notes", [])]

    def measure_batch_sizes(self, ceiling: int = 16, *, rounds: int = 3) -> dict[int, float]:
        """Images/s of `predict_batch` at batch sizes 1, 2, 4, ... up to `ceiling`, on synthetic photos (decoded
        320 x 240 noise: the preprocessing runs too), the best of `rounds` interleaved rounds (a busy machine slows
        some timings down, never up). On a CPU a larger batch is not always faster per image: measured, not assumed."""
        rng = np.random.default_rng(0)
        photos = [Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)) for _ in range(ceiling)]
        sizes = [2**i for i in range(ceiling.bit_length()) if 2**i <= ceiling]
        for size in sizes:
            self.predict_batch(photos[:size])  # warm-up: first calls allocate, engines get chosen
        speeds = dict.fromkeys(sizes, 0.0)
        for _ in range(rounds):
            for size in sizes:
                speeds[size] = max(speeds[size], size / max(_timed(self.predict_batch, photos[:size]), 1e-9))
        return speeds

    def cam(self, image: Image.Image) -> dict:
        """The first member's CAM (Grad-CAM when the head is not GAP + linear) as a PNG data URL over the view the
        model saw, with the explained class and method."""
        from finegrain.explain import explain_images, overlay

        member = self.members[0]
        try:
            e = explain_images(member, [image])[0]
        except FinegrainError as err:
            return {"error": str(err)}
        out = {"image": _png_data_url(overlay(e.view, e.heatmap, e.box)), "method": e.method, "class": e.target_name}
        if len(self.members) > 1:
            out["note"] = "the CAM of the ensemble's first member"
        return out

    def zoom_box(self, image: Image.Image) -> dict | None:
        """Where a look-closer (zoom) member looked closer: its box as fractions (x0, y0, x1, y1) of the photo; None
        for a model without a zoom view."""
        from finegrain.models.zoom import box_in_photo

        member = next((m for m in self.members if getattr(m.model, "zoom", False)), None)
        if member is None:
            return None
        pre, image = member.preprocess, image.convert("RGB")
        x = pre.normalize(pre.pil_to_uint8(image)[None].to(member.device))
        box = member.model.zoom_boxes(x)[0].tolist()
        return {"box": [round(v, 4) for v in box_in_photo(box, image.size, pre.crop_pct)]}

    @torch.no_grad()
    def neighbours(self, image: Image.Image, n: int = 6) -> list[dict]:
        """The `n` gallery entries nearest to the image under the k-NN head's own metric: class, similarity (cosine,
        or minus the squared distance), gallery row, and whether its image can be fetched (GET /gallery/ROW)."""
        if self.knn is None:
            return []
        model, pre = self.knn.model, self.knn.preprocess
        x = pre.normalize(pre.pil_to_uint8(image.convert("RGB"))[None].to(self.knn.device))
        feats, _ = model.forward_all(x)
        head = model.head
        q, g = feats.double(), head.gallery.double()
        if head.metric == "cosine":
            sims = F.normalize(q, dim=1) @ F.normalize(g, dim=1).T
        else:
            sims = -torch.cdist(q, g).square()
        values, rows = sims[0].topk(min(n, len(g)))
        return [
            {"row": int(r), "class": self.classes[int(head.labels[r])], "similarity": round(float(v), 4)}
            | {"image": self.gallery_paths is not None}
            for v, r in zip(values, rows)
        ]

    def gallery_thumbnail(self, row: int, side: int = 192) -> bytes:
        """The training image of one gallery row as a JPEG thumbnail; FinegrainError when there is none."""
        from finegrain.data import load_image

        if self.gallery_paths is None or not 0 <= row < len(self.gallery_paths):
            raise FinegrainError(f"no gallery image {row}")
        img = load_image(self.gallery_paths[row], min_side=side)
        img.thumbnail((side, side))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        return buf.getvalue()

    def describe(self) -> dict:
        """What GET /model returns: classes, preprocessing, kind, gallery, metrics found beside the model."""
        first = self.members[0]
        meta = first.meta
        out = {
            "name": _model_name(self.path),
            "path": self.path,
            "kind": "ensemble" if len(self.members) > 1 else meta.get("kind", "fine-tuned"),
            "backbone": meta.get("backbone"),
            "head": meta.get("head"),
            "num_classes": len(self.classes),
            "classes": self.classes,
            "preprocess": [m.preprocess.to_dict() for m in self.members],
            "members": len(self.members),
            "engines": self.engines,
            "gallery": None if self.knn is None else {"size": int(len(self.knn.model.head.gallery))},
            "gallery_note": self.gallery_note,
            "metrics": self.metrics(),
            # a calibrated model (fit's conformal.json) answers `coverage=` with a set and an unknown flag
            "prediction_sets": getattr(self.predictor, "conformal", None) is not None,
        }
        if out["gallery"] is not None:
            out["gallery"]["images"] = self.gallery_paths is not None
        return out

    def metrics(self) -> dict | None:
        """Scalar entries of the first metrics.json in the model folder or up to two folders above it; the model's
        own recorded metrics (model.json) otherwise."""
        if self.path:
            here = os.path.abspath(self.path)
            for folder in (here, os.path.dirname(here), os.path.dirname(os.path.dirname(here))):
                candidate = os.path.join(folder, "metrics.json")
                if os.path.isfile(candidate):
                    try:
                        with open(candidate, encoding="utf-8") as f:
                            return {"source": candidate, **_scalars(json.load(f))}
                    except (OSError, ValueError):
                        continue
        recorded = self.members[0].meta.get("metrics")
        return {"source": "model.json", **_scalars(recorded)} if isinstance(recorded, dict) else None
