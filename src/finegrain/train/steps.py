"""Where a run's steps get their inputs, chosen once per run.

ImageSteps        every epoch decodes and augments the training images (mixup / CutMix on the batch); the whole
                  network runs
CachedTrunkSteps  the frozen trunk ran once over V augmented views of each image (train/cache.py); an epoch runs
                  only the trained tail on one of them (manifold mixup mixes the trunk outputs at this cut)

Both offer one face: `prepare()`, `train_batches(epoch)`, `forward(x)` (training logits), `eval_batches(samples,
model)` and `head_inputs(which)` (the features LP-FT's probe is fitted on), so the engine never asks which it has.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Sampler

from finegrain.config import TrainConfig
from finegrain.data import Sample
from finegrain.errors import FinegrainError
from finegrain.models import ImageClassifier, has_learned_pooling, stage_view
from finegrain.runtime import ImageFiles, Runtime, image_loader, native_bf16
from finegrain.train.augment import build_eval_transform, build_train_transform
from finegrain.train.cache import TrunkCache, build_trunk_cache
from finegrain.train.data import Splits
from finegrain.train.distributed import DistContext
from finegrain.train.mixing import MixConfig, mix_batch, mix_features
from finegrain.train.regimes import Regime
from finegrain.train.samplers import ShardSampler, create_sampler
from finegrain.train.seeding import epoch_seed

Failed = list[tuple[int, str]]  # (position in the split, reason) of images that did not decode


class TrainBatch(NamedTuple):
    """x: the input of `forward` on the device (None: no image of the batch decoded); y: labels [B] on the device;
    target: what the loss compares with, y or soft targets [B, C] after mixing; failed: see `Failed`."""

    x: torch.Tensor | None
    y: torch.Tensor | None
    target: torch.Tensor | None
    failed: Failed


def set_train_mode(model: ImageClassifier, regime: Regime, *, freeze_bn: bool) -> None:
    """Train mode, except what the regime freezes (its BatchNorm statistics stay), and every BatchNorm with
    freeze_bn."""
    model.train()
    frozen = regime.frozen_stages(model)
    view = stage_view(model.backbone.model) if frozen not in (None, 0) else None
    if frozen is None:
        model.backbone.eval()  # head regime: the whole backbone keeps its statistics
    elif view is not None:
        for m in view.stem + view.stages[:frozen]:
            m.eval()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def optimizer_update(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module,
    *,
    scaler: torch.amp.GradScaler | None = None,
    clip_grad: float | None = None,
) -> None:
    """Backward and one optimizer step: loss scaling (fp16) when a scaler is given, the gradient norm of `model`
    clipped to `clip_grad` when set."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def uses_trunk_cache(cfg: TrainConfig, regime: Regime, dist: DistContext) -> bool:
    """Asked for with cache_views or manifold_mixup (it mixes the cached trunk output), or free: the head regime
    without augmentation trains on cached features."""
    no_mix = cfg.mixup == 0 and cfg.cutmix == 0
    if cfg.cache_views > 0 or cfg.manifold_mixup > 0:
        return True
    return regime.kind == "head" and cfg.augment == "none" and no_mix and not dist.enabled


class ImageSteps:
    """Steps on images decoded and augmented every epoch. `forward` is the module a training step runs (the DDP
    wrapper under torchrun), `model` the classifier itself."""

    def __init__(
        self,
        model: ImageClassifier,
        splits: Splits,
        *,
        cfg: TrainConfig,
        runtime: Runtime,
        dist: DistContext,
        num_classes: int,
        forward: torch.nn.Module | None = None,
    ) -> None:
        self.model, self.splits, self.cfg, self.runtime, self.dist = model, splits, cfg, runtime, dist
        self.num_classes = num_classes
        self.forward_module = forward if forward is not None else model
        self.image_eval_pace: float | None = None  # seconds an image, measured on the last pass over images

    def prepare(self) -> None:
        """Build what the first epoch needs (nothing here)."""

    def eval_pace(self) -> float | None:
        """Seconds an image an evaluation pass through the images takes (the test split's cost), once measured."""
        return self.image_eval_pace

    def loader(self, samples: list[Sample], transform: Callable, *, sampler: Sampler | None = None, epoch: int = 0):
        """A DataLoader of runtime `Batch`es of `samples` (uint8 images), seeded by (seed, epoch)."""
        files = ImageFiles([s.path for s in samples], transform, labels=[s.label for s in samples])
        return image_loader(
            files,
            batch_size=self.cfg.batch_size,
            workers=self.runtime.num_workers,
            sampler=sampler,
            pin_memory=self.runtime.torch_device.type == "cuda",
            generator=torch.Generator().manual_seed(epoch_seed(self.cfg.seed, epoch, 2)),
            prefetch_factor=4,
        )

    def train_batches(self, epoch: int) -> tuple[int, Iterator[TrainBatch]]:
        """(number of batches, the batches) of one epoch: cfg.sampler's order, augmented, mixed when asked."""
        cfg = self.cfg
        transform = build_train_transform(cfg.augment, self.model.preprocess, scale=cfg.crop_scale)
        labels = [s.label for s in self.splits.train]
        sampler = create_sampler(
            cfg.sampler,
            labels,
            seed=cfg.seed,
            total_epochs=cfg.epochs,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        sampler.set_epoch(epoch)
        loader = self.loader(self.splits.train, transform, sampler=sampler, epoch=epoch)
        return len(loader), self._mixed(loader, epoch)

    def _mixed(self, loader: DataLoader, epoch: int) -> Iterator[TrainBatch]:
        cfg = self.cfg
        mix = MixConfig(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix)
        generator = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch, 3))
        for x, y, _, failed in loader:
            if x is None:
                yield TrainBatch(None, None, None, failed)
                continue
            x, y = self.runtime.to_input(x, self.model.preprocess), y.to(self.runtime.torch_device)
            target = y
            if mix.enabled:
                x, target = mix_batch(
                    x, y, self.num_classes, mix, label_smoothing=cfg.label_smoothing, generator=generator
                )
            yield TrainBatch(x, y, target, failed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training logits [B, C] of a `TrainBatch.x`."""
        return self.forward_module(x)

    def eval_batches(
        self, samples: list[Sample], model: torch.nn.Module, *, cached: bool = False
    ) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None, Failed]]:
        """(logits [B, C] float32, labels [B], failed) of this rank's share of `samples` through `model`, on the
        eval view. `cached`: the val split may come from a trunk cache (only for the trained model itself)."""
        sampler = ShardSampler(len(samples), rank=self.dist.rank, world_size=self.dist.world_size)
        t0 = time.perf_counter()
        for x, y, _, failed in self.loader(samples, build_eval_transform(self.model.preprocess), sampler=sampler):
            if x is None:
                yield None, None, failed
                continue
            with self.runtime.autocast():
                logits = model(self.runtime.to_input(x, self.model.preprocess)).float()
            yield logits, y.to(self.runtime.torch_device), failed
        if samples:
            self.image_eval_pace = (time.perf_counter() - t0) / len(samples)

    @torch.no_grad()
    def head_inputs(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features [N, D] and labels [N] of the train or val split through the network as it is (eval)."""
        model = self.model.eval()
        samples = self.splits.train if which == "train" else self.splits.val
        sampler = ShardSampler(len(samples), rank=self.dist.rank, world_size=self.dist.world_size)
        batches = (
            (self.runtime.to_input(x, model.preprocess), y)
            for x, y, _, _ in self.loader(samples, build_eval_transform(model.preprocess), sampler=sampler)
            if x is not None
        )
        return self._features(batches, lambda x: model.embed(model.forward_features(x)))

    def _features(self, batches: Iterable, pooled: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        feats, ys = [], []
        for x, y in batches:
            with self.runtime.autocast():
                feats.append(pooled(x).float().cpu())
            ys.append(y.cpu())
        return torch.cat(feats), torch.cat(ys)


class CachedTrunkSteps(ImageSteps):
    """Steps on the frozen trunk's outputs, computed once (`prepare`): cfg.cache_views augmented views of train,
    one eval view of val. Other passes (the test split, an EMA copy) go through the images."""

    def __init__(
        self,
        model: ImageClassifier,
        splits: Splits,
        *,
        regime: Regime,
        progress: bool = False,
        on_bad: Callable[[list[Sample], Failed], None] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(model, splits, **kwargs)
        cfg = self.cfg
        if regime.kind not in ("head", "last") or cfg.mixup > 0 or cfg.cutmix > 0 or self.dist.enabled:
            raise FinegrainError(
                "the trunk cache (cache_views, manifold_mixup) needs regime head or last:K, no mixup/cutmix and a "
                "single process"
            )
        self.regime, self.progress, self.on_bad = regime, progress, on_bad
        self.frozen = regime.frozen_stages(model)  # None: the whole backbone
        self.train_cache: TrunkCache | None = None
        self.val_cache: TrunkCache | None = None

    def prepare(self) -> None:
        """Run the frozen trunk once over every view (again only if it has not run yet)."""
        if self.train_cache is not None:
            return
        cfg, model = self.cfg, self.model.eval()
        # More views than epochs are never all seen: each epoch draws one view of each image
        n_views = 1 if cfg.augment == "none" else min(max(cfg.cache_views, 1), cfg.epochs)
        # A time budget bounds the whole run: the augmented views may take at most half of it
        budget = cfg.time_budget_min
        deadline = time.perf_counter() + 30 * budget if budget else None
        seed = epoch_seed(cfg.seed, 0, 5)
        self.train_cache = self.cache_samples(self.splits.train, n_views=n_views, seed=seed, deadline=deadline)
        val_view = [build_eval_transform(model.preprocess)]
        self.val_cache = self._cache(self.splits.val, val_view, seed=epoch_seed(cfg.seed, 0, 6))

    def cache_samples(
        self, samples: list[Sample], *, n_views: int, seed: int, deadline: float | None = None
    ) -> TrunkCache:
        """The frozen trunk over n_views augmented (train) views of `samples` (train, or unlabeled images)."""
        cfg = self.cfg
        train_tf = build_train_transform(cfg.augment, self.model.eval().preprocess, scale=cfg.crop_scale)
        return self._cache(samples, [train_tf] * n_views, seed=seed, deadline=deadline)

    def _cache(self, samples: list[Sample], views: list[Callable], *, seed: int, deadline=None) -> TrunkCache:
        # The frozen trunk only runs forward: bf16 autocast where the hardware makes it faster (the cache is
        # stored in bf16 anyway), whatever precision the trained tail uses.
        fast = native_bf16(self.runtime.torch_device)
        runtime = dataclasses.replace(self.runtime, precision="bf16") if fast else self.runtime
        return build_trunk_cache(
            self._trunk(), samples, views, runtime=runtime, preprocess=self.model.preprocess, seed=seed,
            batch_size=self.cfg.batch_size, progress=self.progress, on_bad=self.on_bad, deadline=deadline,
        )  # fmt: skip

    def eval_pace(self) -> float | None:
        """Measured on images when a pass went through them, else the trunk cache's pace (the trunk is most of it)."""
        if self.image_eval_pace is None and self.train_cache is not None:
            return self.train_cache.seconds_per_image
        return self.image_eval_pace

    def _trunk(self) -> Callable[[torch.Tensor], torch.Tensor]:
        model = self.model
        if self.frozen is None and has_learned_pooling(model.pool):
            return model.forward_features  # a learned pooling trains: cache the feature map, not the vector
        if self.frozen is None:
            return lambda x: model.embed(model.forward_features(x))
        k = len(stage_view(model.backbone.model).stages) - self.frozen
        return lambda x: model.trunk(x, k)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] of cached trunk outputs: the trained tail alone."""
        model = self.model
        if self.frozen is None and has_learned_pooling(model.pool):
            return model.forward_head(h)
        if self.frozen is None:
            return model.head(model.dropout(h))
        if self.cfg.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        return model.tail(h, len(stage_view(model.backbone.model).stages) - self.frozen)

    def train_batches(self, epoch: int) -> tuple[int, Iterator[TrainBatch]]:
        """(number of batches, the batches): a seeded shuffle of the cached images, a random view of each."""
        generator = torch.Generator().manual_seed(epoch_seed(self.cfg.seed, epoch, 1))
        batches = self.train_cache.batches(batch_size=self.cfg.batch_size, generator=generator)
        return math.ceil(len(self.train_cache) / self.cfg.batch_size), self._on_device(batches, epoch)

    def _on_device(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], epoch: int) -> Iterator[TrainBatch]:
        """The batches on the device; with manifold_mixup, trunk outputs and targets mixed with one λ a batch."""
        cfg, device = self.cfg, self.runtime.torch_device
        generator = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch, 3))
        for h, y in batches:
            h, y = h.to(device), y.to(device)
            target = y
            if cfg.manifold_mixup > 0:
                h, target, _ = mix_features(
                    h, y, self.num_classes, alpha=cfg.manifold_mixup, label_smoothing=cfg.label_smoothing,
                    generator=generator,
                )  # fmt: skip
            yield TrainBatch(h, y, target, [])

    def eval_batches(
        self, samples: list[Sample], model: torch.nn.Module, *, cached: bool = False
    ) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None, Failed]]:
        if not (cached and samples is self.splits.val and self.val_cache is not None):
            yield from super().eval_batches(samples, model)
            return
        device = self.runtime.torch_device
        for h, y in self.val_cache.batches(batch_size=self.cfg.batch_size, generator=None):
            with self.runtime.autocast():
                logits = self.forward(h.to(device)).float()
            yield logits, y.to(device), []

    @torch.no_grad()
    def head_inputs(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """From the cache when it is built (its first view), else from the eval view of the images."""
        cache = self.train_cache if which == "train" else self.val_cache
        if cache is None:
            return super().head_inputs(which)
        return self.pooled_features(cache)

    @torch.no_grad()
    def pooled_features(self, cache: TrunkCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features [N', D] of the first view of a cache's valid images through the network as it is (eval),
        and the cache's labels [N']."""
        self.model.eval()
        device = self.runtime.torch_device
        batches = ((h.to(device), y) for h, y in cache.batches(batch_size=self.cfg.batch_size, generator=None))
        return self._features(batches, self._pooled)

    def _pooled(self, h: torch.Tensor) -> torch.Tensor:
        """Pooled features of cached trunk outputs: the frozen-free stages (not the head), pooling, normalizer."""
        model = self.model
        if self.frozen is None:
            return model.embed(h) if has_learned_pooling(model.pool) else h
        view = stage_view(model.backbone.model)
        for m in view.stages[self.frozen :] + view.post:
            h = m(h)
        return model.embed(h)
