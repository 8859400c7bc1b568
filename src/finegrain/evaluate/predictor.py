"""A loaded model, ready to predict on image files or PIL images: what `finegrain.load` returns."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import torch

from finegrain.atomic import atomic_write_json
from finegrain.data import load_image
from finegrain.errors import FinegrainError
from finegrain.evaluate.tta import TTA, TTAViews
from finegrain.models import FORMAT, ImageClassifier, ModelSpec, find_model_folder, load_model, save_model
from finegrain.runtime import Engine, Runtime, check_runtime, choose_engine, forward, resolve_device

ONNX_CACHE = "onnx-cache"  # beside model.json: the in-process ONNX conversion and the measured choice of `auto`
INT8_GRAPH = "model.int8.onnx"  # `finegrain export --quantize int8`'s default output: `auto` may race it


class SetPrediction:
    """`predict_set`, shared by Predictor and Ensemble: the classes a calibrated model cannot rule out."""

    conformal = None  # evaluate.conformal.Conformal, read from the model folder by `load`

    def predict_set(self, images: Sequence, coverage: float = 0.9) -> list[list[tuple[str, float]]]:
        """For each image, the classes (with their probabilities, most probable first) of a set that holds the true
        class with probability >= `coverage` (split-conformal, calibrated by `fit` on images the model did not train
        on); the top-1 class is always in it."""
        return [a["set"] for a in self.answers(self.predict_proba(images), coverage)]

    def answers(self, proba: np.ndarray, coverage: float = 0.9) -> list[dict]:
        """Probabilities [M, C] -> per image {"set": [(class, probability)], "unknown": bool | None}: the prediction
        set at `coverage`, and whether the image looks unlike every class the model knows (its top probability
        under the level 95% of held-out known images reach; None when the calibration predates the flag)."""
        from finegrain.evaluate.conformal import check_coverage

        try:
            coverage = check_coverage(coverage)
        except ValueError as e:
            raise FinegrainError(str(e)) from None
        if self.conformal is None:
            raise FinegrainError("this model has no calibration for prediction sets: `finegrain fit` saves one "
                                 "(conformal.json, from its out-of-fold probabilities)")  # fmt: skip
        proba = np.asarray(proba, np.float64)
        members = self.conformal.predict_set(proba, coverage)
        unknown = self.conformal.is_unknown(proba)
        return [
            {"set": [(self.classes[j], float(p[j])) for j in np.argsort(-p) if m[j]],
             "unknown": None if unknown is None else bool(unknown[i])}
            for i, (p, m) in enumerate(zip(proba, members))
        ]  # fmt: skip


class Predictor(SetPrediction):
    """`predict(images)` -> [(class name, probability)] per image, `predict_proba(images)` -> [N, C].

    runtime: torch | onnx | auto, the engine that runs `model` (runtime/engine.py), chosen at the first prediction
    of each input size; `folder`: the model folder, where the ONNX conversion is cached. `model` stays the torch
    module (CAM, FixRes and training read it)."""

    def __init__(
        self, model: ImageClassifier, spec: ModelSpec, device: str = "auto", *, runtime: str = "torch", folder=None
    ) -> None:
        device = resolve_device(device)
        self.model = model.eval().to(device)
        self.spec = spec
        self.device = torch.device(device)
        self.runtime = check_runtime(runtime)
        self.folder = folder
        self._engines: dict[tuple, Engine] = {}

    def engine(self, preprocess, runtime: Runtime, *, n_images: int | None = None) -> Engine:
        """The engine for views of `preprocess`'s size under `runtime`'s settings (chosen once, then reused)."""
        key = (preprocess.input_size, runtime)
        if key not in self._engines:
            self._engines[key] = choose_engine(
                self.model,
                self.runtime,
                preprocess=preprocess,
                runtime=runtime,
                cache_dir=os.path.join(self.folder, ONNX_CACHE) if self.folder else None,
                int8_path=os.path.join(self.folder, INT8_GRAPH) if self.folder else None,
                n_images=n_images,
            )
        return self._engines[key]

    @property
    def engine_notes(self) -> list[str]:
        """Why each engine in use was chosen (one line each)."""
        return [f"{size} px: {e.reason}" for (size, _), e in self._engines.items()]

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
        engines = [self.engine(pre, rt, n_images=len(images)) for pre in pres]
        out = []
        for i in range(0, len(images), batch_size):
            batch = [im if isinstance(im, Image.Image) else load_image(im) for im in images[i : i + batch_size]]
            per_image = [views(im.convert("RGB")) for im in batch]
            per_size = [torch.stack([v[s] for v in per_image]) for s in range(len(pres))]
            p = sum(forward(e.module, x, pre, e.runtime).proba for x, pre, e in zip(per_size, pres, engines))
            out.append((p / len(pres)).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def predict(self, images: Sequence, *, k: int = 1, tta=None) -> list[list[tuple[str, float]]]:
        return _top_k(self.predict_proba(images, tta=tta), self.classes, k)


class Ensemble(SetPrediction):
    """Members (Predictors over the same classes) whose probabilities are averaged with `weights` (sum 1)."""

    def __init__(self, members: Sequence[Predictor], weights: Sequence[float] | None = None) -> None:
        if not members:
            raise FinegrainError("an ensemble needs at least one member")
        for m in members[1:]:
            if m.classes != members[0].classes:
                raise FinegrainError("ensemble members must share the same classes in the same order")
        w = np.ones(len(members)) if weights is None else np.asarray(weights, np.float64)
        if len(w) != len(members) or (w < 0).any() or w.sum() <= 0:
            raise FinegrainError(f"ensemble weights must be {len(members)} non-negative numbers, not all 0")
        self.members, self.weights = list(members), (w / w.sum()).tolist()
        # what runs: members on one trunk (frozen heads of one backbone, view and flip) fused into one forward pass
        self.runners: list[tuple[Predictor, float]] = share_trunks(self.members, self.weights)

    @property
    def classes(self) -> list[str]:
        return self.members[0].classes

    @property
    def meta(self) -> dict:
        return {"kind": "ensemble", "members": [m.meta for m in self.members], "weights": self.weights}

    def predict_proba(self, images: Sequence, **kwargs) -> np.ndarray:
        return sum(w * m.predict_proba(images, **kwargs) for m, w in self.runners)

    def predict(self, images: Sequence, *, k: int = 1, tta=None) -> list[list[tuple[str, float]]]:
        return _top_k(self.predict_proba(images, tta=tta), self.classes, k)

    def save(self, folder: str) -> str:
        """members/<i>/ (model folders) + model.json {kind: ensemble, members, weights, classes}."""
        names = [f"member-{i}" for i in range(len(self.members))]
        for m, name in zip(self.members, names):
            save_model(m.model, os.path.join(folder, name), m.spec)
        spec = {"format": FORMAT, "kind": "ensemble", "members": names, "weights": self.weights}
        atomic_write_json(os.path.join(folder, "model.json"), {**spec, "classes": self.classes})
        return folder


class SharedTrunk(torch.nn.Module):
    """Frozen classifiers on one backbone, preprocessing and flip setting as one model: the trunk runs once and each
    member's pooling -> normalizer -> head reads its feature map; the output's softmax is the members' probabilities
    averaged with `weights` (the logits are the log of that average). `forward_all` like ImageClassifier's, so
    `runtime.forward`, the ONNX conversion and the engines take it as they take one model."""

    def __init__(self, models: Sequence[torch.nn.Module], weights: Sequence[float]) -> None:
        super().__init__()
        self.backbone, self.flip, self.zoom = models[0].backbone, models[0].flip, models[0].zoom
        self.heads = torch.nn.ModuleList(
            [torch.nn.ModuleDict({"pool": m.pool, "norm": m.norm, "head": m.head}) for m in models]
        )
        w = torch.as_tensor(list(weights), dtype=torch.float32)
        self.register_buffer("weights", w / w.sum())

    @property
    def preprocess(self):
        return self.backbone.preprocess

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from finegrain.models.classifier import pooled_views

        pooled_all = pooled_views(self.backbone, x, [h["pool"] for h in self.heads], flip=self.flip, zoom=self.zoom)
        proba, first = 0.0, None
        for w, h, pooled in zip(self.weights, self.heads, pooled_all):
            with torch.autocast(x.device.type, enabled=False):
                feats = h["norm"](pooled.float())
                proba = proba + w * h["head"](feats).softmax(-1)
            first = feats if first is None else first
        return first, proba.clamp_min(1e-30).log()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)[1]


def _trunk_key(p: Predictor) -> tuple | None:
    """What two frozen members must share to run one trunk: backbone, weights' source, preprocessing, flip, device
    (None for a fine-tuned member: its trunk is its own)."""
    if p.spec.kind != "frozen":
        return None
    return (p.spec.backbone, p.spec.source, json.dumps(p.spec.preprocess.to_dict(), sort_keys=True), p.spec.flip,
            p.spec.zoom, str(p.device), p.runtime)  # fmt: skip


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def share_trunks(members: Sequence[Predictor], weights: Sequence[float]) -> list[tuple[Predictor, float]]:
    """[(Predictor, weight)] to run: frozen members with the same trunk (`_trunk_key` and equal backbone weights)
    fused into one SharedTrunk Predictor weighted by their sum; every other member as it is."""
    groups: list[list[int]] = []
    for i, m in enumerate(members):
        key = _trunk_key(m)
        for g in groups:
            first = members[g[0]]
            if key is not None and key == _trunk_key(first) and _same_weights(m.model.backbone, first.model.backbone):
                g.append(i)
                break
        else:
            groups.append([i])
    out = []
    for g in groups:
        total = sum(weights[i] for i in g)
        if len(g) == 1:
            out.append((members[g[0]], total))
            continue
        first = members[g[0]]
        model = SharedTrunk([members[i].model for i in g], [weights[i] / total for i in g])
        spec = first.spec.replace(extra={**first.spec.extra, "shared_trunk": len(g)})
        out.append((Predictor(model, spec, str(first.device), runtime=first.runtime), total))
    return out


def _top_k(proba: np.ndarray, classes: list[str], k: int) -> list[list[tuple[str, float]]]:
    top = np.argsort(-proba, axis=1)[:, :k]
    return [[(classes[j], float(p[j])) for j in row] for p, row in zip(proba, top)]


def load(path: str, *, device: str = "auto", runtime: str = "torch") -> Predictor | Ensemble:
    """Load a model saved by finegrain: a model folder (fine-tuned, frozen probe / NCM / k-NN, ensemble), a training
    run folder, or one of the run's weight files (`best.safetensors`, `checkpoint-last.pt`: the same architecture
    with that checkpoint's weights). runtime: torch | onnx | auto (the engine predictions run on; an ensemble's
    members each get theirs)."""
    check_runtime(runtime)
    inner = os.path.join(path, "model")
    if not os.path.isfile(os.path.join(path, "model.json")) and os.path.isfile(os.path.join(inner, "model.json")):
        path = inner  # a `fit` output folder: its model/ (an ensemble's model.json is there)
    meta_path = os.path.join(path, "model.json")
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("kind") == "ensemble":
            members = [load(os.path.join(path, m), device=device, runtime=runtime) for m in meta["members"]]
            return _calibrated(Ensemble(members, meta.get("weights")), path)
    model, spec = load_model(path)
    folder, weights = find_model_folder(path)
    predictor = Predictor(model, spec, device, runtime=runtime, folder=None if weights else folder)
    return _calibrated(predictor, folder) if weights is None else predictor


def _calibrated(predictor, folder: str):
    """The model with the prediction-set calibration `fit` saved beside it (conformal.json), if any."""
    path = os.path.join(folder, "conformal.json")
    if os.path.isfile(path):
        from finegrain.evaluate.conformal import Conformal

        with open(path, encoding="utf-8") as f:
            predictor.conformal = Conformal.from_dict(json.load(f))
    return predictor
