"""One dataset and one collate for every pass over image files: eval views, TTA views, training transforms.

A file that fails to decode never stops a pass: its item carries the reason, the collate drops it from the batch
and lists it, and the caller reports it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from finegrain.data import ImageDecodeError, load_image


class Batch(NamedTuple):
    """x: the stacked transform outputs of the images that decoded (a tensor, or a list of tensors when the
    transform returns a list), None when none did; y: their labels [B] (None without labels); index: their
    positions in the dataset; failed: [(position, reason)] of those that did not."""

    x: torch.Tensor | list[torch.Tensor] | None
    y: torch.Tensor | None
    index: list[int]
    failed: list[tuple[int, str]]


class ImageFiles(Dataset):
    """Image files -> (transform(RGB image), label, position, "") or (None, label, position, reason).

    min_side: decode JPEGs at reduced size when the transform only needs this many pixels on the short side."""

    def __init__(
        self,
        paths: Sequence[str],
        transform: Callable,
        *,
        labels: Sequence[int] | None = None,
        min_side: int | None = None,
    ) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.labels = None if labels is None else list(labels)
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        label = -1 if self.labels is None else self.labels[i]
        try:
            img = load_image(self.paths[i], min_side=self.min_side) if self.min_side else load_image(self.paths[i])
            return self.transform(img), label, i, ""
        except ImageDecodeError as e:
            return None, label, i, str(e)


def collate_images(items) -> Batch:
    good = [it for it in items if it[0] is not None]
    failed = [(it[2], it[3]) for it in items if it[0] is None]
    if not good:
        return Batch(None, None, [], failed)
    x = default_collate([it[0] for it in good])
    y = torch.tensor([it[1] for it in good], dtype=torch.long)
    return Batch(x, None if y.min() < 0 else y, [it[2] for it in good], failed)


def image_loader(
    dataset: ImageFiles,
    *,
    batch_size: int,
    workers: int,
    sampler: Sampler | None = None,
    pin_memory: bool = False,
    generator: torch.Generator | None = None,
    prefetch_factor: int = 2,
) -> DataLoader:
    """A DataLoader of `Batch`es, in dataset order unless a sampler is given."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_images,
        pin_memory=pin_memory,
        generator=generator,
        prefetch_factor=prefetch_factor if workers else None,
        persistent_workers=False,
    )
