"""Predict a list of images with one model or an ensemble, with test-time augmentation.

Layered like DINOv2's evaluation: `run_views` works on tensors, `predict_paths` on files (decoding in DataLoader
workers, bad files skipped and reported), `evaluate_models` (in evaluate/evaluation.py) on a dataset.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from finegrain.backbones import Preprocess
from finegrain.data import ImageDecodeError, load_image
from finegrain.errors import FinegrainError
from finegrain.evaluate.tta import TTA, image_views


@dataclass
class Predictions:
    """Probabilities [N_ok, C] for the images that decoded, in input order; `index` maps rows to input positions."""

    proba: np.ndarray
    index: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    views: int = 1
    models: int = 1

    @property
    def images_per_second(self) -> float:
        return len(self.index) / self.seconds if self.seconds else float("nan")


class _ViewSet(Dataset):
    def __init__(self, paths: Sequence[str], pres: list[Preprocess], tta: TTA) -> None:
        self.paths, self.pres, self.tta = list(paths), pres, tta

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img = load_image(self.paths[i], min_side=max(p.resize_size for p in self.pres))
        except ImageDecodeError as e:
            return None, i, str(e)
        return [image_views(img, p, self.tta) for p in self.pres], i, ""


def _collate(items):
    good = [(v, i) for v, i, _ in items if v is not None]
    failed = [(i, reason) for v, i, reason in items if v is None]
    if not good:
        return None, [], failed
    per_size = [torch.stack([v[s] for v, _ in good]) for s in range(len(good[0][0]))]  # [B, V, 3, S, S] each
    return per_size, [i for _, i in good], failed


@torch.no_grad()
def run_views(model, views: torch.Tensor, pre: Preprocess, *, precision: str = "fp32", channels_last: bool = True):
    """[B, V, 3, S, S] uint8 -> mean softmax over the V views [B, C] (float32)."""
    b, v = views.shape[:2]
    device = next(model.parameters()).device
    x = pre.normalize(views.flatten(0, 1).to(device))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(x)
    return logits.float().softmax(-1).view(b, v, -1).mean(1)


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
) -> Predictions:
    """Average the (TTA-averaged) probabilities of one Predictor or several (an ensemble) over image files.

    Every model must know the same classes in the same order. Undecodable files are skipped and listed.
    """
    from tqdm.auto import tqdm

    from finegrain.embed.extract import default_num_workers, resolve_precision

    predictors = list(predictors) if isinstance(predictors, list | tuple) else [predictors]
    if not predictors:
        raise FinegrainError("no model to predict with")
    classes = predictors[0].classes
    for p in predictors[1:]:
        if list(p.classes) != list(classes):
            raise FinegrainError("ensemble members must share the same classes in the same order")
    tta = tta or TTA()
    workers = default_num_workers() if workers is None else workers
    t0 = time.perf_counter()
    total: np.ndarray | None = None
    ok: list[int] = []
    skipped: dict[int, str] = {}
    for m, predictor in enumerate(predictors):
        model = predictor.model.eval()
        prec = resolve_precision(precision, predictor.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        pres = tta.preprocesses(predictor.preprocess)
        loader = DataLoader(
            _ViewSet(paths, pres, tta),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=_collate,
            prefetch_factor=2 if workers else None,
        )
        rows, index = [], []
        label = desc if len(predictors) == 1 else f"{desc} [{m + 1}/{len(predictors)}]"
        for per_size, positions, failed in tqdm(loader, desc=label, unit="batch", disable=not progress):
            for i, reason in failed:
                skipped[i] = reason
            if per_size is None:
                continue
            p = sum(
                run_views(model, v, pre, precision=prec, channels_last=channels_last) for v, pre in zip(per_size, pres)
            )
            rows.append((p / len(pres)).cpu().numpy())
            index.extend(positions)
        proba = np.concatenate(rows) if rows else np.zeros((0, len(classes)), np.float32)
        if total is None:
            total, ok = proba, index
        else:
            keep = np.isin(ok, index)  # a file one member could not read is dropped for all
            total, ok = total[keep] + proba[np.isin(index, ok)], list(np.asarray(ok)[keep])
    assert total is not None
    return Predictions(
        proba=(total / len(predictors)).astype(np.float32),
        index=np.asarray(ok, dtype=np.int64),
        skipped=[(paths[i], r) for i, r in sorted(skipped.items())],
        seconds=time.perf_counter() - t0,
        views=tta.n_views(),
        models=len(predictors),
    )
