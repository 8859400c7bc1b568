"""Training data: splits carved from train (stratified, seeded), datasets of uint8 tensors that skip bad files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from finegrain.data import ImageDecodeError, ImageSet, Sample, load_image
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


class ImageDataset(Dataset):
    """(uint8 [3, S, S], label, index) per sample; a file that fails to decode gives None and its reason."""

    def __init__(self, samples: list[Sample], transform: Callable) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        try:
            return self.transform(load_image(s.path)), s.label, i, ""
        except ImageDecodeError as e:
            return None, s.label, i, str(e)


def collate_skip_bad(items):
    good = [it for it in items if it[0] is not None]
    bad = [(it[2], it[3]) for it in items if it[0] is None]
    if not good:
        return None, None, [], bad
    x = torch.stack([it[0] for it in good])
    y = torch.tensor([it[1] for it in good], dtype=torch.long)
    return x, y, [it[2] for it in good], bad
