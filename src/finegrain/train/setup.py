"""What a run is built from: its options checked, the model, optimizer and schedule a TrainConfig describes, and
regime=auto settled into a concrete regime."""

from __future__ import annotations

import dataclasses
import os

import torch
import yaml

from finegrain.backbones import create_backbone
from finegrain.config import TrainConfig
from finegrain.errors import FinegrainError
from finegrain.models import ImageClassifier, ModelSpec, build_model, msra_init_
from finegrain.train.auto_regime import RegimeChoice, auto_cache_views, choose_regime, measure_training_speed
from finegrain.train.distributed import DistContext
from finegrain.train.optim import build_optimizer, build_param_groups
from finegrain.train.regimes import Regime
from finegrain.train.schedule import LRSchedule


def check_train_options(cfg: TrainConfig) -> None:
    """Reject options no run could use, with a one-line reason (before any work is done)."""
    if cfg.head_init not in ("msra", "probe"):
        raise FinegrainError(
            f"head_init must be msra or probe (a linear probe on frozen features); got {cfg.head_init!r}"
        )
    if cfg.regime != "auto":
        Regime.parse(cfg.regime)  # an unknown regime names the valid ones
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise FinegrainError("epochs and batch_size must be at least 1")
    if not 0 <= cfg.val_fraction < 1:
        raise FinegrainError("val_fraction must be in [0, 1), e.g. 0.1 (0: no validation split, keep the last epoch)")
    if cfg.precision not in ("fp32", "bf16", "amp"):
        raise FinegrainError(f"precision must be fp32, bf16 or amp (CUDA), got {cfg.precision!r}")
    if cfg.precision == "amp" and torch.device(cfg.device).type != "cuda":
        raise FinegrainError("precision amp needs a CUDA device (device=cuda); use fp32 or bf16 on a CPU")
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
    if cfg.manifold_mixup > 0:
        _check_manifold_mixup(cfg)


def _check_manifold_mixup(cfg: TrainConfig) -> None:
    """Manifold mixup mixes the cached trunk output, the tail's input: only a cached head / last:K run has it."""
    if cfg.mixup > 0 or cfg.cutmix > 0:
        raise FinegrainError("manifold_mixup (mixing at the cut) and mixup/cutmix (mixing images) exclude each other")
    if cfg.regime == "auto":
        return  # settled with the regime (settle_auto_regime)
    if Regime.parse(cfg.regime).kind not in ("head", "last") or cfg.cache_views < 1:
        raise FinegrainError(
            "manifold_mixup mixes the cached trunk output: it needs regime head or last:K and cache_views >= 1; "
            f"got regime {cfg.regime}, cache_views {cfg.cache_views}"
        )


def build_classifier(cfg: TrainConfig, regime: Regime, classes: list[str]) -> ImageClassifier:
    """The model to fine-tune: the backbone (pretrained unless scratch, then MSRA-initialised) + pooling + head."""
    backbone = create_backbone(cfg.backbone, pretrained=regime.pretrained and cfg.pretrained, checkpoint=cfg.checkpoint)
    if regime.kind == "scratch":
        msra_init_(backbone)
    spec = ModelSpec(
        backbone=backbone.name,
        source=backbone.source,
        preprocess=backbone.preprocess.with_geometry(cfg.image_size, cfg.crop_pct),
        pooling=cfg.pooling,
        normalizer="l2" if cfg.feature_norm else "none",
        head="normed" if cfg.normed_head else "linear",
        classes=tuple(classes),
    )
    return build_model(spec, backbone=backbone, drop_rate=cfg.drop_rate)


def init_head_bias_for_loss(model: ImageClassifier, loss_fn: torch.nn.Module, cfg: TrainConfig) -> None:
    """Start a new linear head's bias where the loss asks (sigmoid class-balanced losses: -log(C - 1), the prior
    of Cui et al.'s reference code). A probe-initialised head keeps its probe; a resumed run loads its own."""
    init = getattr(loss_fn, "head_bias_init", None)
    bias = getattr(model.head, "bias", None)
    if init is None or bias is None or cfg.head_init != "msra":
        return
    value = init(bias.numel())
    if value is not None:
        with torch.no_grad():
            bias.fill_(value)


def make_optimizer(cfg: TrainConfig, regime: Regime, model: ImageClassifier) -> torch.optim.Optimizer:
    """The optimizer over the parameters `regime` trains, each group at its rate (no decay on norms and biases)."""
    scale = regime.lr_scale(model, backbone_lr_scale=cfg.backbone_lr_scale, layer_decay=cfg.layer_decay)
    groups = build_param_groups(model, lr=cfg.lr, weight_decay=cfg.weight_decay, lr_scale=scale)
    return build_optimizer(cfg.optimizer, groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def make_schedule(cfg: TrainConfig, *, steps_per_epoch: int, epochs: int) -> LRSchedule:
    """Warm-up then cfg.schedule over `epochs` epochs of `steps_per_epoch` optimizer steps."""
    total = epochs * steps_per_epoch
    warm = min(int(round(cfg.warmup_epochs * steps_per_epoch)), max(total - 1, 0))
    return LRSchedule(kind=cfg.schedule, total_steps=total, warmup_steps=warm)


def settle_auto_regime(
    cfg: TrainConfig, model: ImageClassifier, train_counts: list[int], dist: DistContext, *, progress: bool
) -> tuple[TrainConfig, RegimeChoice | None]:
    """regime=auto: choose the regime (and, on a CPU, cached views) from the data and the measured speed of `model`.

    The choice replaces `auto` in the returned config, so the saved config is concrete and a resumed run keeps it
    (resuming reads it back from config.yaml; the choice is then None)."""
    if cfg.resume:
        saved = _saved_config(cfg.out)
        if saved.get("regime", "auto") == "auto":
            raise FinegrainError(f"cannot resume {cfg.out}: its config.yaml does not say which regime auto chose")
        return dataclasses.replace(cfg, regime=saved["regime"], cache_views=int(saved.get("cache_views", 0))), None
    choice = None
    if dist.is_main:
        timed = bool(cfg.time_budget_min)
        speed = measure_training_speed(model, batch_size=min(cfg.batch_size, 16)) if timed else None
        choice = choose_regime(train_counts, images_per_second=speed, budget_min=cfg.time_budget_min)
    choice = dist.broadcast_object(choice)
    views = cfg.cache_views
    cacheable = choice.regime != "full" and cfg.mixup == 0 and cfg.cutmix == 0 and not dist.enabled
    if cfg.manifold_mixup > 0 and not cacheable:
        raise FinegrainError(
            f"regime auto chose {choice.regime}{' under torchrun' if dist.enabled else ''}, but manifold_mixup mixes "
            "the cached trunk output (regime head or last:K, one process): set regime=last:K cache_views=N"
        )
    if views == 0 and cacheable and (dist.device.type == "cpu" or cfg.manifold_mixup > 0):
        views = min(auto_cache_views(choice.passes), cfg.epochs)  # an epoch draws one view of each image
    if progress and dist.is_main:
        extra = f"; the frozen trunk is cached over {views} augmented views" if views != cfg.cache_views else ""
        print(f"regime auto -> {choice.regime}: {choice.reason}{extra}", flush=True)
    return dataclasses.replace(cfg, regime=choice.regime, cache_views=views), choice


def _saved_config(out: str) -> dict:
    path = os.path.join(out, "config.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise FinegrainError(f"cannot resume {out}: {path} is missing or unreadable ({e})") from None
