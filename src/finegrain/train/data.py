"""Training data: train / val / test splits, val carved from train (stratified, seeded).

Images are read through `finegrain.runtime` (`ImageFiles`, `image_loader`), as every other pass over files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finegrain.data import ImageSet, Sample
from finegrain.data.splits import stratified_split


@dataclass
class Splits:
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    note: str


def make_splits(image_set: ImageSet, *, val_fraction: float, seed: int) -> Splits:
    """train/val/test from the folders; with no val folder, val is a stratified seeded part of train.

    A flat folder (no split folders) gets a test part as well (also val_fraction, also seeded): the test split is
    never used for any choice.
    """
    by = {s: [x for x in image_set.samples if x.split == s] for s in image_set.splits}
    if "train" in by:
        train, test = by["train"], by.get("test", [])
    else:
        pool = by.get("all", [])
        y = np.array([s.label for s in pool])
        tr, te = stratified_split(y, test_size=val_fraction, seed=seed + 1)
        train, test = [pool[i] for i in tr], [pool[i] for i in te]
    if "val" in by:
        return Splits(train, by["val"], test, "val folder")
    if val_fraction == 0:
        return Splits(train, [], test, "no validation split: the last epoch's model is kept")
    y = np.array([s.label for s in train])
    tr, va = stratified_split(y, test_size=val_fraction, seed=seed)
    note = f"val = {val_fraction:.0%} of train, stratified, seed {seed}"
    return Splits([train[i] for i in tr], [train[i] for i in va], test, note)
