"""The real images an export checks itself on (parity, top-1 agreement) and calibrates int8 on.

From `--calibration DATA` (its train split calibrates, its test split — else val, else all — checks), else from
what the model recorded: a training run's splits.json, or the data folder of the feature store a frozen model was
fitted on. Up to `limit` of each, spread evenly over the sorted list (every class represented), decoded once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from finegrain.config import load_splits
from finegrain.data import ImageDecodeError, load_image, load_image_set


@dataclass
class CheckImages:
    """check: paths the parity and agreement are measured on; calibrate: train paths for int8; source: where from."""

    check: list[str]
    calibrate: list[str]
    source: str


def _spread(paths: list[str], limit: int) -> list[str]:
    paths = sorted(paths)
    if len(paths) <= limit:
        return paths
    step = len(paths) / limit
    return [paths[int(i * step)] for i in range(limit)]


def _from_data(data: str, limit: int) -> CheckImages:
    image_set = load_image_set(data)
    by_split = {s: [x.path for x in image_set.split(s)] for s in image_set.splits}
    check = by_split.get("test") or by_split.get("val") or [p for ps in by_split.values() for p in ps]
    calibrate = by_split.get("train") or check
    return CheckImages(_spread(check, limit), _spread(calibrate, limit), data)


def _store_root(folder: str) -> str | None:
    """The data folder of the feature store a frozen model was fitted on (STORE/eval/NAME/model)."""
    here = os.path.abspath(folder)
    for _ in range(4):
        here = os.path.dirname(here)
        meta = os.path.join(here, "meta.json")
        if os.path.isfile(meta):
            try:
                with open(meta, encoding="utf-8") as f:
                    root = json.load(f).get("data_root")
            except (OSError, ValueError):
                return None
            return root if root and os.path.exists(root) else None
    return None


def check_images(folder: str, data: str | None = None, *, limit: int = 200) -> CheckImages | None:
    """The images to check and calibrate on; None when neither `data` nor the model's records give any."""
    if data:
        return _from_data(data, limit)
    recorded = load_splits(folder)
    if recorded is not None:
        path, splits = recorded
        check = [p for p in splits.get("test", []) if os.path.exists(p)]
        calibrate = [p for p in splits.get("train", []) if os.path.exists(p)]
        if check or calibrate:
            return CheckImages(_spread(check or calibrate, limit), _spread(calibrate or check, limit), path)
    root = _store_root(folder)
    return _from_data(root, limit) if root else None


def decode(paths: list[str], preprocess) -> torch.Tensor:
    """uint8 [N, 3, S, S] of the paths that decode (the others are left out: an export check needs no all)."""
    out = []
    for p in paths:
        try:
            out.append(preprocess.pil_to_uint8(load_image(p, min_side=preprocess.resize_size)))
        except ImageDecodeError:
            continue
    return torch.stack(out) if out else torch.zeros((0, 3, preprocess.input_size, preprocess.input_size), torch.uint8)
