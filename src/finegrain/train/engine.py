"""One generic training engine: a task (forward + loss) per step, regimes only choose what learns.

A run folder holds config.yaml, metrics.csv (+ TensorBoard events), checkpoint-last.pt (atomic, every epoch),
best.safetensors and, at the end, model/ (weights + model.json) that `finegrain.load` turns into a predictor.
Each epoch's randomness (order, augmentation, mixing, dropout) is seeded from (seed, epoch), so a run resumed
from its last checkpoint ends exactly where an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from finegrain.atomic import atomic_write_json, atomic_write_text
from finegrain.config import TrainConfig, config_dict, save_config
from finegrain.errors import FinegrainError
from finegrain.models import (
    ImageClassifier,
    ModelSpec,
    build_model,
    has_learned_pooling,
    load_checkpoint,
    msra_init_,
    save_checkpoint,
    save_model,
    save_weights,
    stage_view,
)
from finegrain.train.data import ImageDataset, Splits, collate_skip_bad, make_splits
from finegrain.train.distributed import DistContext
from finegrain.train.regimes import Regime

CHECKPOINT = "checkpoint-last.pt"


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    return (seed * 1_000_003 + epoch * 7919 + stream * 104_729) % (2**31 - 1)


def seed_all(s: int) -> None:
    random.seed(s)
    np.random.seed(s % (2**32 - 1))
    torch.manual_seed(s)


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, sharded across ranks (rank r takes every world-th index, padded)."""

    def __init__(self, n: int, *, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world_size, shuffle
        self.epoch = 0
        self.per_rank = math.ceil(n / world_size) if shuffle else len(range(rank, n, world_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.rank, self.n, self.world))
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, 1))
        order = torch.randperm(self.n, generator=g).tolist()
        order += order[: self.per_rank * self.world - self.n]  # pad so every rank takes as many steps
        return iter(order[self.rank :: self.world])

    def __len__(self) -> int:
        return self.per_rank


@dataclass
class TrainResult:
    out: str
    history: list[dict]
    best_epoch: int
    best_val_top1: float
    test_metrics: dict | None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


class Trainer:
    """Builds everything a run needs from a TrainConfig; `fit()` runs or resumes it."""

    def __init__(self, cfg: TrainConfig, *, progress: bool = True, image_set=None) -> None:
        """`image_set`: an ImageSet to train on instead of loading `cfg.data` (Python API, benchmarks)."""
        from finegrain.data import load_image_set
        from finegrain.losses import create_loss

        self.cfg = cfg
        self.progress = progress
        self.dist = DistContext.from_env(cfg.device)
        self.device = self.dist.device
        # regime=auto is settled once the data is known; auto never picks scratch, so the model is built the same way
        self.regime = Regime.parse("last:2" if cfg.regime == "auto" else cfg.regime)
        self.regime_choice = None
        if cfg.head_init not in ("msra", "probe"):
            raise FinegrainError(
                f"head_init must be msra or probe (a linear probe on frozen features); got {cfg.head_init!r}"
            )
        _check_options(cfg)
        seed_all(cfg.seed)
        self.image_set = image_set if image_set is not None else load_image_set(cfg.data)
        self.classes = self.image_set.classes
        self.splits: Splits = make_splits(self.image_set, val_fraction=cfg.val_fraction, seed=cfg.seed)
        if not self.splits.train or (not self.splits.val and cfg.val_fraction > 0):
            raise FinegrainError("too few images to carve a validation split: add images or a val/ folder")
        self.model = self._build_model().to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.train_counts = [0] * len(self.classes)
        for sample in self.splits.train:
            self.train_counts[sample.label] += 1
        if cfg.regime == "auto":
            cfg = self.cfg = self._settle_auto_regime()
        self.regime.apply(self.model)
        self.loss_fn = create_loss(
            cfg.loss, label_smoothing=cfg.label_smoothing, class_counts=self.train_counts, **(cfg.loss_options or {})
        )
        self.eval_loss = create_loss("ce")
        self.optimizer = self._build_optimizer()
        self.steps_per_epoch = math.ceil(len(self.splits.train) / (cfg.batch_size * self.dist.world_size))
        self.schedule = self._build_schedule()
        self.planned_epochs = cfg.epochs  # lowered by a time budget, so the schedule still ends inside it
        self.ema = None
        if cfg.ema_decay:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay)
        self.ddp_model = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp_model = DistributedDataParallel(
                self.model, device_ids=None if self.device.type == "cpu" else [self.device.index]
            )
        self.skipped: dict[str, str] = {}
        self.train_cache = self.val_cache = None
        fp16 = cfg.precision == "amp" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported()
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None  # fp16 needs loss scaling; bf16 does not

    # ---- construction ---------------------------------------------------------------------------------------------
    def _settle_auto_regime(self) -> TrainConfig:
        """regime=auto: choose the regime (and, on a CPU, cached views) from the data and the measured speed; the
        choice replaces `auto` in the config, so the saved config is concrete and a resumed run keeps it."""
        from finegrain.train.auto_regime import auto_cache_views, choose_regime, measure_training_speed

        cfg = self.cfg
        if cfg.resume:
            saved = _saved_config(cfg.out)
            if saved.get("regime", "auto") == "auto":
                raise FinegrainError(f"cannot resume {cfg.out}: its config.yaml does not say which regime auto chose")
            self.regime = Regime.parse(saved["regime"])
            return dataclasses.replace(cfg, regime=saved["regime"], cache_views=int(saved.get("cache_views", 0)))
        counts = self.train_counts
        choice = None
        if self.dist.is_main:
            speed = (
                measure_training_speed(self.model, batch_size=min(cfg.batch_size, 16)) if cfg.time_budget_min else None
            )
            choice = choose_regime(counts, images_per_second=speed, budget_min=cfg.time_budget_min)
        choice = self.dist.broadcast_object(choice)
        self.regime, self.regime_choice = Regime.parse(choice.regime), choice
        views = cfg.cache_views
        cacheable = choice.regime != "full" and cfg.mixup == 0 and cfg.cutmix == 0 and not self.dist.enabled
        if views == 0 and cacheable and self.device.type == "cpu":
            views = auto_cache_views(choice.passes)
        if self.progress and self.dist.is_main:
            extra = f"; the frozen trunk is cached over {views} augmented views" if views != cfg.cache_views else ""
            print(f"regime auto -> {choice.regime}: {choice.reason}{extra}", flush=True)
        return dataclasses.replace(cfg, regime=choice.regime, cache_views=views)

    def _build_model(self) -> ImageClassifier:
        from finegrain.backbones import create_backbone

        cfg = self.cfg
        pretrained = self.regime.pretrained and cfg.pretrained
        backbone = create_backbone(cfg.backbone, pretrained=pretrained, checkpoint=cfg.checkpoint)
        if self.regime.kind == "scratch":
            msra_init_(backbone)
        spec = ModelSpec(
            backbone=backbone.name,
            source=backbone.source,
            preprocess=backbone.preprocess.with_geometry(cfg.image_size, cfg.crop_pct),
            pooling=cfg.pooling,
            normalizer="l2" if cfg.feature_norm else "none",
            head="normed" if cfg.normed_head else "linear",
            classes=tuple(self.classes),
        )
        return build_model(spec, backbone=backbone, drop_rate=cfg.drop_rate)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        from finegrain.train.optim import build_optimizer, build_param_groups

        cfg = self.cfg
        scale = self.regime.lr_scale(self.model, backbone_lr_scale=cfg.backbone_lr_scale, layer_decay=cfg.layer_decay)
        groups = build_param_groups(self.model, lr=cfg.lr, weight_decay=cfg.weight_decay, lr_scale=scale)
        return build_optimizer(cfg.optimizer, groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)

    def _build_schedule(self, epochs: int | None = None):
        from finegrain.train.schedule import LRSchedule

        cfg = self.cfg
        total = (epochs or cfg.epochs) * self.steps_per_epoch
        warm = min(int(round(cfg.warmup_epochs * self.steps_per_epoch)), max(total - 1, 0))
        return LRSchedule(kind=cfg.schedule, total_steps=total, warmup_steps=warm)

    # ---- data -----------------------------------------------------------------------------------------------------
    def _loader(self, samples, transform, *, shuffle: bool, epoch: int) -> DataLoader:
        from finegrain.runtime import default_num_workers

        if shuffle and self.cfg.sampler != "instance":
            from finegrain.train.samplers import create_sampler

            sampler = create_sampler(
                self.cfg.sampler,
                [x.label for x in samples],
                seed=self.cfg.seed,
                total_epochs=self.cfg.epochs,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
            )
        else:
            sampler = EpochSampler(
                len(samples), seed=self.cfg.seed, rank=self.dist.rank, world_size=self.dist.world_size, shuffle=shuffle
            )
        sampler.set_epoch(epoch)
        workers = default_num_workers() if self.cfg.workers is None else self.cfg.workers
        return DataLoader(
            ImageDataset(samples, transform),
            batch_size=self.cfg.batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate_skip_bad,
            drop_last=False,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(epoch_seed(self.cfg.seed, epoch, 2)),
            persistent_workers=False,
            prefetch_factor=4 if workers else None,
        )

    def _note_bad(self, samples, bad) -> None:
        for i, reason in bad:
            self.skipped.setdefault(samples[i].path, reason)

    # ---- steps ----------------------------------------------------------------------------------------------------
    def _autocast(self):
        p = self.cfg.precision
        if p == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if p == "amp":
            return torch.autocast("cuda", dtype=torch.float16 if not torch.cuda.is_bf16_supported() else torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def _to_input(self, x: torch.Tensor) -> torch.Tensor:
        x = self.model.preprocess.normalize(x.to(self.device, non_blocking=True))
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def _set_train_mode(self) -> None:
        self.model.train()
        frozen = self.regime.frozen_stages(self.model)
        view = stage_view(self.model.backbone.model) if frozen not in (None, 0) else None
        if frozen is None:
            self.model.backbone.eval()  # head regime: the whole backbone keeps its statistics
        elif view is not None:
            for m in view.stem + view.stages[:frozen]:
                m.eval()
        if self.cfg.freeze_bn:
            for m in self.model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()

    # ---- LP-FT: the head starts as a linear probe on the frozen network's features -------------------------------
    @torch.no_grad()
    def _head_inputs(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features [N, D] and labels of the train or val split through the network as it is now (eval);
        from the trunk cache when there is one (its first view), else from the eval view."""
        from finegrain.train.augment import build_eval_transform

        model = self.model.eval()
        cache = self.train_cache if which == "train" else self.val_cache
        samples = self.splits.train if which == "train" else self.splits.val
        frozen = self.regime.frozen_stages(model)
        view = stage_view(model.backbone.model) if frozen else None

        def pooled(x, cached):
            if not cached:
                return model.embed(model.forward_features(x))
            if frozen is None:
                return model.embed(x) if has_learned_pooling(model.pool) else x
            for m in view.stages[frozen:] + view.post:
                x = m(x)
            return model.embed(x)

        if cache is not None:
            batches = ((h.to(self.device), y) for h, y in cache.batches(batch_size=self.cfg.batch_size, generator=None))
        else:
            loader = self._loader(samples, build_eval_transform(model.preprocess), shuffle=False, epoch=0)
            batches = ((self._to_input(x), y) for x, y, _, _ in loader if x is not None)
        feats, ys = [], []
        for x, y in batches:
            with self._autocast():
                feats.append(pooled(x, cache is not None).float().cpu())
            ys.append(y.cpu())
        return torch.cat(feats), torch.cat(ys)

    def probe_init_head(self) -> dict:
        """Fit the head as an L2-regularised logistic regression on frozen features (L-BFGS), the penalty chosen
        on the validation split when there is one; fine-tuning then starts from it (LP-FT)."""
        from finegrain.train.probe_init import fit_linear_head

        if self.dist.enabled:
            raise FinegrainError("head_init=probe runs in a single process; start the run without torchrun")
        if not isinstance(self.model.head, torch.nn.Linear):
            raise FinegrainError("head_init=probe needs a linear head (not normed_head=true)")
        # fitted on the first cached view when there is a cache: on cub100 (256 px) a probe on the eval view of train
        # scored the same on val (0.884 vs 0.881) and costs one more full pass
        x, y = self._head_inputs("train")
        val = self._head_inputs("val") if self.splits.val else None
        w, b, info = fit_linear_head(x, y, len(self.classes), val=val)
        with torch.no_grad():
            self.model.head.weight.copy_(w.to(self.model.head.weight))
            self.model.head.bias.copy_(b.to(self.model.head.bias))
        if self.ema is not None:
            self.ema.module.load_state_dict(self.model.state_dict())
        self.probe_info = info
        return info

    # ---- cached trunk (regimes head and last:K) ---------------------------------------------------------------------
    def _trunk_fn(self):
        frozen = self.regime.frozen_stages(self.model)
        if frozen is None and has_learned_pooling(self.model.pool):
            return self.model.forward_features  # a learned pooling trains: cache the feature map, not the vector
        if frozen is None:
            return lambda x: self.model.embed(self.model.forward_features(x))
        k = len(stage_view(self.model.backbone.model).stages) - frozen
        return lambda x: self.model.trunk(x, k)

    def _tail(self, h: torch.Tensor) -> torch.Tensor:
        frozen = self.regime.frozen_stages(self.model)
        if frozen is None and has_learned_pooling(self.model.pool):
            return self.model.forward_head(h)
        if frozen is None:
            return self.model.head(self.model.dropout(h))
        if self.cfg.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        return self.model.tail(h, len(stage_view(self.model.backbone.model).stages) - frozen)

    def _use_cache(self) -> bool:
        """Asked for with cache_views, or free: the head regime without augmentation trains on cached features."""
        cfg = self.cfg
        no_mix = cfg.mixup == 0 and cfg.cutmix == 0
        auto = self.regime.kind == "head" and cfg.augment == "none" and no_mix and not self.dist.enabled
        return cfg.cache_views > 0 or auto

    def build_caches(self) -> None:
        """Run the frozen trunk once: cache_views augmented views of train, one eval view of val."""
        from finegrain.runtime import default_num_workers
        from finegrain.train.augment import build_eval_transform, build_train_transform
        from finegrain.train.cache import build_trunk_cache

        cfg = self.cfg
        if self.regime.kind not in ("head", "last") or cfg.mixup > 0 or cfg.cutmix > 0 or self.dist.enabled:
            raise FinegrainError("cache_views needs regime head or last:K, no mixup/cutmix and a single process")
        self.model.eval()
        train_tf = build_train_transform(cfg.augment, self.model.preprocess, scale=cfg.crop_scale)
        n_views = 1 if cfg.augment == "none" else max(cfg.cache_views, 1)
        from finegrain.runtime import resolve_precision

        # The frozen trunk only runs forward: bf16 autocast where the hardware makes it faster (the cache is
        # stored in bf16 anyway), whatever precision the trained tail uses.
        fast = resolve_precision("auto", self.device) == "bf16"
        trunk_autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if fast else self._autocast
        common = dict(
            to_input=self._to_input,
            batch_size=cfg.batch_size,
            autocast=trunk_autocast,
            num_workers=default_num_workers() if cfg.workers is None else cfg.workers,
            progress=self.progress,
            on_bad=self._note_bad,
        )
        self.train_cache = build_trunk_cache(
            self._trunk_fn(), self.splits.train, [train_tf] * n_views, seed=epoch_seed(cfg.seed, 0, 5), **common
        )
        self.val_cache = build_trunk_cache(
            self._trunk_fn(),
            self.splits.val,
            [build_eval_transform(self.model.preprocess)],
            seed=epoch_seed(cfg.seed, 0, 6),
            **common,
        )

    def train_epoch(self, epoch: int) -> dict:
        from tqdm.auto import tqdm

        from finegrain.train.augment import build_train_transform
        from finegrain.train.mixing import MixConfig, mix_batch

        cfg = self.cfg
        seed_all(epoch_seed(cfg.seed, epoch, 0))
        if hasattr(self.loss_fn, "set_epoch"):  # deferred re-weighting (LDAM-DRW) switches at a set epoch
            self.loss_fn.set_epoch(epoch, cfg.epochs)
        mix_gen = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch, 3))
        mix_cfg = MixConfig(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix)
        if self.train_cache is not None:
            gen = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch, 1))
            loader = [(h, y, None, []) for h, y in self.train_cache.batches(batch_size=cfg.batch_size, generator=gen)]
        else:
            transform = build_train_transform(cfg.augment, self.model.preprocess, scale=cfg.crop_scale)
            loader = self._loader(self.splits.train, transform, shuffle=True, epoch=epoch)
        self._set_train_mode()
        step0 = epoch * self.steps_per_epoch
        sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
        t0 = time.perf_counter()
        bar = tqdm(
            total=len(loader),
            desc=f"epoch {epoch + 1}/{self.planned_epochs}",
            unit="batch",
            disable=not (self.progress and self.dist.is_main),
            dynamic_ncols=True,
            leave=False,
        )
        for i, (x, y, _, bad) in enumerate(loader):
            self._note_bad(self.splits.train, bad)
            step = step0 + i
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
            if x is None:
                continue
            self.schedule.apply(self.optimizer, step)
            cached = self.train_cache is not None
            x, y = (x.to(self.device) if cached else self._to_input(x)), y.to(self.device)
            target = y
            if cfg.mixup > 0 or cfg.cutmix > 0:
                x, target = mix_batch(
                    x, y, len(self.classes), mix_cfg, label_smoothing=cfg.label_smoothing, generator=mix_gen
                )
            with self._autocast():
                logits = self._tail(x) if cached else self.ddp_model(x)
                loss = self.loss_fn(logits.float(), target)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model, step=step)
            with torch.no_grad():
                sums += torch.tensor(
                    [loss.item() * len(y), (logits.argmax(1) == y).sum().item(), len(y)], dtype=torch.float64
                )
            bar.update(1)
            bar.set_postfix(
                loss=f"{sums[0] / sums[2]:.3f}",
                acc=f"{sums[1] / sums[2]:.3f}",
                img_s=f"{sums[2] * self.dist.world_size / (time.perf_counter() - t0):.1f}",
            )
        bar.close()
        sums = self.dist.all_reduce_sum(sums)
        n = max(sums[2].item(), 1)
        return {
            "train_loss": sums[0].item() / n,
            "train_top1": sums[1].item() / n,
            "train_images_per_s": sums[2].item() / (time.perf_counter() - t0),
            "lr": self.optimizer.param_groups[-1]["lr"],
        }

    @torch.no_grad()
    def evaluate(self, samples, *, model: torch.nn.Module | None = None) -> dict:
        """top-1, mean per-class accuracy and loss over `samples`, reduced across ranks."""
        from finegrain.train.augment import build_eval_transform

        use_cache = samples is self.splits.val and self.val_cache is not None and model is self.model
        model = model or self.model
        model.eval()
        c = len(self.classes)
        per_class = torch.zeros(2, c, dtype=torch.float64)  # correct, count
        loss_sum = torch.zeros(1, dtype=torch.float64)
        if use_cache:
            loader = [
                (h, y, None, []) for h, y in self.val_cache.batches(batch_size=self.cfg.batch_size, generator=None)
            ]
        else:
            loader = self._loader(samples, build_eval_transform(self.model.preprocess), shuffle=False, epoch=0)
        for x, y, _, bad in loader:
            self._note_bad(samples, bad)
            if x is None:
                continue
            with self._autocast():
                logits = (self._tail(x.to(self.device)) if use_cache else model(self._to_input(x))).float()
            y = y.to(self.device)
            loss_sum += self.eval_loss(logits, y).item() * len(y)
            hit = (logits.argmax(1) == y).double().cpu()
            per_class[0].index_add_(0, y.cpu(), hit)
            per_class[1].index_add_(0, y.cpu(), torch.ones_like(hit))
        per_class = self.dist.all_reduce_sum(per_class)
        loss_sum = self.dist.all_reduce_sum(loss_sum)
        n = per_class[1].sum().item()
        present = per_class[1] > 0
        acc = torch.where(present, per_class[0] / per_class[1].clamp(min=1), torch.nan).numpy()
        return {
            "top1": per_class[0].sum().item() / max(n, 1),
            "mean_per_class": float(np.nanmean(acc)) if n else 0.0,
            "loss": loss_sum.item() / max(n, 1),
            "n": int(n),
            "per_class": acc,
        }

    # ---- the run --------------------------------------------------------------------------------------------------
    def _state(self, epoch: int, history: list[dict], best: tuple[int, float]) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else {},
            "epoch": epoch,
            "history": history,
            "best_epoch": best[0],
            "best_val_top1": best[1],
            "planned_epochs": self.planned_epochs,
            "config": config_dict(self.cfg),
        }

    def fit(self) -> TrainResult:
        cfg = self.cfg
        out = cfg.out
        ckpt_path = os.path.join(out, CHECKPOINT)
        history: list[dict] = []
        best = (-1, -1.0)
        start = 0
        if cfg.resume:
            state = load_checkpoint(ckpt_path)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.ema is not None and state.get("ema"):
                self.ema.load_state_dict(state["ema"])
            history, best, start = (
                list(state["history"]),
                (state["best_epoch"], state["best_val_top1"]),
                state["epoch"] + 1,
            )
            self.planned_epochs = int(state.get("planned_epochs", cfg.epochs))
            if self.planned_epochs != cfg.epochs:
                self.schedule = self._build_schedule(self.planned_epochs)
        elif os.path.exists(ckpt_path):
            raise FinegrainError(f"{out} already holds a run: add --resume to continue it, or choose another --out")
        if self.dist.is_main:
            save_config(self.cfg, out, extra={"resolved": self._resolved()})
        writer = self._tensorboard(out)
        t0 = time.perf_counter()
        if self._use_cache():
            self.build_caches()
        if cfg.head_init == "probe" and start == 0:
            self.probe_init_head()
            if self.splits.val:  # the probe is the first candidate: fine-tuning must beat it on val to replace it
                eval_model = self.ema.module if self.ema is not None else self.model
                best = (-1, self.evaluate(self.splits.val, model=eval_model)["top1"])
                self.probe_info["val_top1_model"] = best[1]
                if self.dist.is_main:
                    save_weights(eval_model, os.path.join(out, "best.safetensors"))
        seconds_before = history[-1]["seconds"] if history else 0.0  # wall time of the epochs before a resume
        patience = 0
        for epoch in range(start, cfg.epochs):
            if epoch >= self.planned_epochs:
                break
            epoch_start = time.perf_counter()
            row = {"epoch": epoch + 1, **self.train_epoch(epoch)}
            eval_model = self.ema.module if self.ema is not None else self.model
            nan = float("nan")
            val = {"top1": nan, "mean_per_class": nan, "loss": nan}
            if self.splits.val:
                val = self.evaluate(self.splits.val, model=eval_model)
            row.update({f"val_{k}": v for k, v in val.items() if k not in ("n", "per_class")})
            row["seconds"] = seconds_before + time.perf_counter() - t0
            history.append(row)
            self._fit_budget(epoch, history, time.perf_counter() - epoch_start)
            # without a validation split the newest model is kept
            improved = val["top1"] > best[1] if self.splits.val else True
            if improved:
                best, patience = (epoch, val["top1"] if self.splits.val else nan), 0
            else:
                patience += 1
            if self.dist.is_main:
                if improved:
                    save_weights(eval_model, os.path.join(out, "best.safetensors"))
                save_checkpoint(ckpt_path, self._state(epoch, history, best))
                _write_history(os.path.join(out, "metrics.csv"), history)
                if writer is not None:
                    for k, v in row.items():
                        if k != "epoch":
                            writer.add_scalar(k, v, epoch + 1)
                    writer.flush()
                if self.progress:
                    print(
                        f"epoch {epoch + 1}/{self.planned_epochs}: train loss {row['train_loss']:.3f} "
                        f"acc {row['train_top1']:.3f} | val top-1 {val['top1']:.4f} "
                        f"mean/class {val['mean_per_class']:.4f} | {row['train_images_per_s']:.1f} img/s"
                    )
            self.dist.barrier()
            if cfg.early_stop is not None and patience >= cfg.early_stop:
                break
            if cfg.max_steps is not None and (epoch + 1) * self.steps_per_epoch >= cfg.max_steps:
                break
            if cfg.time_budget_min is not None and row["seconds"] >= 60 * cfg.time_budget_min:
                break
        return self._finish(history, best, writer, time.perf_counter() - t0)

    def _fit_budget(self, epoch: int, history: list[dict], epoch_seconds: float) -> None:
        """With time_budget_min: plan only the epochs that fit (at the last epoch's pace) and end the cosine there.

        Timing-dependent by nature; the plan is saved in the checkpoint, so a resumed run keeps it.
        """
        budget = self.cfg.time_budget_min
        if budget is None:
            return
        # the pace of this epoch alone: one-off work before it (the trunk cache) is in `seconds`, not in the pace
        remaining = 60 * budget - history[-1]["seconds"]
        fits = epoch + 1 + int(max(remaining, 0) // max(epoch_seconds, 1e-9))
        plan = max(epoch + 1, min(self.planned_epochs, fits))
        if plan < self.planned_epochs:
            self.planned_epochs = plan
            self.schedule = self._build_schedule(plan)

    def _finish(self, history, best, writer, seconds) -> TrainResult:
        out = self.cfg.out
        best_path = os.path.join(out, "best.safetensors")
        self.dist.barrier()
        if os.path.exists(best_path):
            from safetensors.torch import load_file

            target = self.ema.module if self.ema is not None else self.model
            target.load_state_dict(load_file(best_path))
        final = self.ema.module if self.ema is not None else self.model
        test = self.evaluate(self.splits.test, model=final) if self.splits.test else None
        if test is not None:
            from finegrain.data.longtail import shot_groups

            many, few = self.cfg.shot_thresholds
            groups = shot_groups(self.train_counts, many=many, few=few)
            acc = test.pop("per_class")
            for g in ("many", "medium", "few"):
                vals = acc[(groups == g) & ~np.isnan(acc)]
                test[f"{g}_shot"] = float(vals.mean()) if len(vals) else None
            test["per_class_top1"] = {c: (None if np.isnan(a) else float(a)) for c, a in zip(self.classes, acc)}
        if self.dist.is_main:
            spec = ModelSpec.of(
                final,
                classes=self.classes,
                train_counts=self.train_counts,
                extra={"regime": str(self.regime), "best_epoch": best[0] + 1},
            )
            save_model(final, os.path.join(out, "model"), spec)
            summary = {
                "best_epoch": best[0] + 1,
                "best_val_top1": best[1],
                "head_init_probe": getattr(self, "probe_info", None),  # best_epoch 0: the probe itself won on val
                "test": test,
                "skipped": [{"path": p, "reason": r} for p, r in sorted(self.skipped.items())],
                "splits": {
                    "train": len(self.splits.train),
                    "val": len(self.splits.val),
                    "test": len(self.splits.test),
                    "how": self.splits.note,
                },
                "seconds": seconds,
            }
            atomic_write_json(os.path.join(out, "metrics.json"), summary)
        if writer is not None:
            writer.close()
        return TrainResult(out, history, best[0] + 1, best[1], test, sorted(self.skipped.items()), seconds)

    def _resolved(self) -> dict:
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        auto = dataclasses.asdict(self.regime_choice) if self.regime_choice is not None else None
        return {
            "regime": str(self.regime),
            "regime_auto": auto,
            "trainable_parameters": n_train,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "backbone": self.model.backbone.describe(),
            "classes": len(self.classes),
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.dist.world_size,
            "splits": {
                "train": len(self.splits.train),
                "val": len(self.splits.val),
                "test": len(self.splits.test),
                "how": self.splits.note,
            },
        }

    def _tensorboard(self, out: str):
        if not self.dist.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional: metrics.csv has the same numbers
            return None
        return SummaryWriter(os.path.join(out, "tensorboard"))


def _write_history(path: str, history: list[dict]) -> None:
    keys = list(history[0])
    lines = [",".join(keys)] + [
        ",".join(f"{r.get(k, ''):.6g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys)
        for r in history
    ]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _saved_config(out: str) -> dict:
    import yaml

    path = os.path.join(out, "config.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise FinegrainError(f"cannot resume {out}: {path} is missing or unreadable ({e})") from None


def _check_options(cfg: TrainConfig) -> None:
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise FinegrainError("epochs and batch_size must be at least 1")
    if not 0 <= cfg.val_fraction < 1:
        raise FinegrainError("val_fraction must be in [0, 1), e.g. 0.1 (0: no validation split, keep the last epoch)")
    if cfg.precision not in ("fp32", "bf16", "amp"):
        raise FinegrainError(f"precision must be fp32, bf16 or amp (CUDA), got {cfg.precision!r}")
    if cfg.lr <= 0:
        raise FinegrainError("lr must be positive")
    if cfg.crop_pct is not None and not 0 < cfg.crop_pct <= 1:
        raise FinegrainError(
            f"crop_pct must be in (0, 1], e.g. 0.875 or 1.0 (the whole short side); got {cfg.crop_pct}"
        )
    scale = tuple(cfg.crop_scale) if isinstance(cfg.crop_scale, list | tuple) else ()
    if len(scale) != 2 or not all(isinstance(v, int | float) for v in scale) or not 0 < scale[0] <= scale[1] <= 1:
        raise FinegrainError(
            f"crop_scale must be [min, max] with 0 < min <= max <= 1, e.g. [0.25, 1]; got {cfg.crop_scale}"
        )


def train(cfg: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Run (or with cfg.resume, continue) a fine-tuning run described by `cfg`."""
    trainer = Trainer(cfg, progress=progress)
    try:
        return trainer.fit()
    finally:
        trainer.dist.close()
