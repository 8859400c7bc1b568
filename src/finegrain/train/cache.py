"""Cached frozen trunk: run the frozen part of the network once over V augmented views of each image.

With regime `last:K` (or `head`), the frozen prefix gives the same output for the same input every epoch, so it
is computed once per view and kept (bf16) in memory; each epoch then trains the tail on one of the V views of
every image. Training sees V fixed augmentations instead of fresh ones: a good trade on a CPU, where the trunk
is most of the cost.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch
from tqdm.auto import tqdm

from finegrain.backbones import Preprocess
from finegrain.data import Sample
from finegrain.runtime import ImageFiles, Runtime, image_loader


class TrunkCache:
    """views [V, N, ...] (bf16) of the trunk output for N samples; labels [N]; valid [N] (False: undecodable)."""

    def __init__(self, views: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> None:
        self.views, self.labels, self.valid = views, labels, valid
        self.seconds_per_image: float | None = None  # the measured pace of building one view

    @property
    def num_views(self) -> int:
        return self.views.shape[0]

    def batches(
        self, *, batch_size: int, generator: torch.Generator | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(trunk output [B, ...] float32, labels [B]); with a generator: shuffled, a random view per image."""
        idx = torch.nonzero(self.valid).flatten()
        if generator is not None:
            idx = idx[torch.randperm(len(idx), generator=generator)]
            view = torch.randint(self.num_views, (len(idx),), generator=generator)
        else:
            view = torch.zeros(len(idx), dtype=torch.long)
        for i in range(0, len(idx), batch_size):
            j, v = idx[i : i + batch_size], view[i : i + batch_size]
            yield self.views[v, j].float(), self.labels[j]

    def __len__(self) -> int:
        return int(self.valid.sum())


@torch.no_grad()
def build_trunk_cache(
    trunk: Callable[[torch.Tensor], torch.Tensor],
    samples: list[Sample],
    transforms: list[Callable],
    *,
    runtime: Runtime,
    preprocess: Preprocess,
    seed: int,
    batch_size: int,
    progress: bool = False,
    on_bad: Callable | None = None,
    deadline: float | None = None,
) -> TrunkCache:
    """Run `trunk` over every sample once per transform (view); view v's random augmentation is seeded by (seed, v).

    `runtime` places and autocasts the input; `on_bad(samples, [(position, reason)])` hears of undecodable files.
    `deadline` (a time.perf_counter() value): no view is started that would end after it (the first always runs);
    the cache then holds fewer views. The cache's `seconds_per_image` is the measured pace of one view."""
    views: torch.Tensor | None = None
    t0, done = time.perf_counter(), 0
    valid = torch.zeros(len(samples), dtype=torch.bool)
    labels = torch.tensor([s.label for s in samples], dtype=torch.long)
    bar = tqdm(total=len(samples) * len(transforms), desc="cache trunk", unit="img", disable=not progress, leave=False)
    for v, transform in enumerate(transforms):
        if v and deadline is not None and time.perf_counter() + (time.perf_counter() - t0) / v > deadline:
            break
        torch.manual_seed(seed + 7919 * v)
        files = ImageFiles([s.path for s in samples], transform, labels=[s.label for s in samples])
        generator = torch.Generator().manual_seed(seed + v)
        loader = image_loader(files, batch_size=batch_size, workers=runtime.num_workers, generator=generator)
        for x, _, idx, bad in loader:
            if on_bad is not None:
                on_bad(samples, bad)
            if x is None:
                continue
            with runtime.autocast():
                h = trunk(runtime.to_input(x, preprocess)).to(torch.bfloat16).cpu()
            if views is None:
                views = torch.zeros((len(transforms), len(samples), *h.shape[1:]), dtype=torch.bfloat16)
            views[v, torch.tensor(idx)] = h
            valid[torch.tensor(idx)] = True
            bar.update(len(idx) + len(bad))
        done += 1
    bar.close()
    if views is None:
        views = torch.zeros((len(transforms), len(samples), 1))
    cache = TrunkCache(views[:done] if done else views, labels, valid)
    cache.seconds_per_image = (time.perf_counter() - t0) / max(1, done * len(samples))
    return cache
