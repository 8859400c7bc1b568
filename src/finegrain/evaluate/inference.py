"""Predict a list of images with one model or an ensemble, with test-time augmentation.

Layered like DINOv2's evaluation: `runtime.forward` works on tensors, `predict_paths` on files (decoding in
DataLoader workers, bad files skipped and reported), `evaluate_models` (in evaluate/evaluation.py) on a dataset.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from finegrain.errors import FinegrainError
from finegrain.evaluate.tta import TTA, TTAViews
from finegrain.runtime import ImageFiles, Runtime, forward, image_loader


@dataclass
class Predictions:
    """Probabilities [N_ok, C] for the images that decoded, in input order; `index` maps rows to input positions.
    features [N_ok, D]: the vectors the head saw (view-averaged), when asked for (one model only)."""

    proba: np.ndarray
    index: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    views: int = 1
    models: int = 1
    features: np.ndarray | None = None

    @property
    def images_per_second(self) -> float:
        return len(self.index) / self.seconds if self.seconds else float("nan")


def _predict_one(predictor, paths, tta: TTA, rt: Runtime, *, batch_size, progress, desc, features):
    """(proba [N_ok, C], features [N_ok, D] or None, kept positions, {position: reason})."""
    from tqdm.auto import tqdm

    pres = tta.preprocesses(predictor.preprocess)
    engines = [predictor.engine(pre, rt, n_images=len(paths)) for pre in pres]
    data = ImageFiles(paths, TTAViews(pres, tta), min_side=max(p.resize_size for p in pres))
    loader = image_loader(data, batch_size=batch_size, workers=rt.num_workers)
    proba, feats, index, skipped = [], [], [], {}
    for per_size, _, positions, failed in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        skipped.update(failed)
        if per_size is None:
            continue
        outs = [forward(e.module, views, pre, e.runtime) for views, pre, e in zip(per_size, pres, engines)]
        proba.append((sum(o.proba for o in outs) / len(outs)).cpu().numpy())
        if features:
            feats.append((sum(o.features for o in outs) / len(outs)).cpu().numpy())
        index.extend(positions)
    n_classes = len(predictor.classes)
    proba = np.concatenate(proba) if proba else np.zeros((0, n_classes), np.float32)
    feats = (np.concatenate(feats) if feats else None) if features else None
    return proba, feats, index, skipped


def predict_paths(
    predictors,
    paths: Sequence[str],
    *,
    tta: TTA | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    precision: str = "auto",
    channels_last: bool = True,
    progress: bool = False,
    desc: str = "predict",
    features: bool = False,
) -> Predictions:
    """Average the (TTA-averaged) probabilities of one Predictor or several (an ensemble) over image files.

    Every model must know the same classes in the same order. Undecodable files are skipped and listed.
    """
    members = _weighted_members(predictors)
    if features and len(members) > 1:
        raise FinegrainError("features come from one model: an ensemble has no single feature space")
    classes = members[0][0].classes
    if any(list(p.classes) != list(classes) for p, _ in members[1:]):
        raise FinegrainError("ensemble members must share the same classes in the same order")
    tta = tta or TTA()
    t0 = time.perf_counter()
    total, feats, ok, skipped = None, None, [], {}
    for m, (predictor, weight) in enumerate(members):
        rt = Runtime(str(predictor.device), precision, channels_last, workers)
        label = desc if len(members) == 1 else f"{desc} [{m + 1}/{len(members)}]"
        proba, feats, index, bad = _predict_one(
            predictor, paths, tta, rt, batch_size=batch_size, progress=progress, desc=label, features=features
        )
        skipped.update(bad)
        if total is None:
            total, ok = weight * proba, index
        else:
            keep = np.isin(ok, index)  # a file one member could not read is dropped for all
            total, ok = total[keep] + weight * proba[np.isin(index, ok)], list(np.asarray(ok)[keep])
    return Predictions(
        proba=total.astype(np.float32),
        index=np.asarray(ok, dtype=np.int64),
        skipped=[(paths[i], r) for i, r in sorted(skipped.items())],
        seconds=time.perf_counter() - t0,
        views=tta.n_views(),
        models=len(members),
        features=feats,
    )


def _weighted_members(predictors) -> list[tuple]:
    """[(Predictor, weight)]: several models (or saved ensembles) averaged, each input counting equally."""
    items = list(predictors) if isinstance(predictors, list | tuple) else [predictors]
    if not items:
        raise FinegrainError("no model to predict with")
    out = []
    for item in items:
        pairs = item.runners if hasattr(item, "runners") else [(item, 1.0)]  # an ensemble: its trunks once each
        out += [(p, w / len(items)) for p, w in pairs]
    return out
