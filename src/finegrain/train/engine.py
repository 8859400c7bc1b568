"""One generic training engine: a task (forward + loss) per step, regimes only choose what learns.

A run folder holds config.yaml, metrics.csv (+ TensorBoard events), checkpoint-last.pt (atomic, every epoch),
best.safetensors and, at the end, model/ (weights + model.json) that `finegrain.load` turns into a predictor.
Each epoch's randomness (order, augmentation, mixing, dropout) is seeded from (seed, epoch), so a run resumed
from its last checkpoint ends exactly where an uninterrupted one would.

The pieces: train/setup.py builds the model, optimizer and schedule; train/steps.py is where a step's inputs come
from (images, or the frozen trunk cached over augmented views), chosen once; train/callbacks.py does what happens
around the epochs (checkpoint, best model, time budget, early stopping, logs). The Trainer wires them together.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from finegrain.atomic import atomic_write_json
from finegrain.config import TrainConfig
from finegrain.data import Sample, load_image_set
from finegrain.errors import FinegrainError
from finegrain.evaluate.longtail import shot_accuracy
from finegrain.faults import kill_point
from finegrain.losses import create_loss
from finegrain.models import ModelSpec, load_checkpoint, save_model
from finegrain.runtime import Runtime, resolve_device
from finegrain.train.callbacks import (
    CHECKPOINT,
    BestModel,
    Callback,
    Checkpointer,
    EarlyStopping,
    FitState,
    MaxSteps,
    MetricsLogger,
    TimeBudget,
    finished_run,
    split_sizes,
)
from finegrain.train.data import make_splits
from finegrain.train.distributed import DistContext
from finegrain.train.probe_init import init_head_from_probe
from finegrain.train.regimes import Regime
from finegrain.train.seeding import epoch_seed, seed_all
from finegrain.train.setup import (
    build_classifier,
    check_train_options,
    init_head_bias_for_loss,
    make_optimizer,
    make_schedule,
    settle_auto_regime,
)
from finegrain.train.steps import (
    CachedTrunkSteps,
    ImageSteps,
    TrainBatch,
    optimizer_update,
    set_train_mode,
    uses_trunk_cache,
)


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
    """A fine-tuning run described by a TrainConfig. The constructor checks and stores the options; `setup()`
    builds the run (splits, model, regime=auto's choice, optimizer, schedule, step source; once); `fit()` sets it
    up if needed, then runs or resumes it."""

    def __init__(self, cfg: TrainConfig, *, progress: bool = True, image_set=None, now=time.perf_counter) -> None:
        """`image_set`: an ImageSet to train on instead of `cfg.data`; `now`: the clock of the time budget (tests)."""
        check_train_options(cfg)
        cfg = dataclasses.replace(cfg, device=resolve_device(cfg.device))
        self.cfg, self.progress, self.image_set, self.now = cfg, progress, image_set, now
        self.dist: DistContext | None = None
        self.probe_info: dict | None = None  # the LP-FT probe's L2 and val scores, once fitted
        self.skipped: dict[str, str] = {}  # path -> why it could not be decoded
        self._ready = False

    # ---- building the run -------------------------------------------------------------------------------------------
    def setup(self) -> Trainer:
        """Build everything the run needs (the first call only); returns self."""
        if self._ready:
            return self
        cfg = self.cfg
        self.dist = DistContext.from_env(cfg.device)
        self.runtime = Runtime(str(self.dist.device), cfg.precision, cfg.channels_last, cfg.workers)
        seed_all(cfg.seed)
        self._setup_data()
        self._setup_model()
        self._setup_optimization()
        self.steps = self._make_steps(cached=uses_trunk_cache(self.cfg, self.regime, self.dist))
        self._ready = True
        return self

    def _setup_data(self) -> None:
        cfg = self.cfg
        if self.image_set is None:
            self.image_set = load_image_set(cfg.data)
        self.classes = self.image_set.classes
        self.splits = make_splits(self.image_set, val_fraction=cfg.val_fraction, seed=cfg.seed)
        if not self.splits.train or (not self.splits.val and cfg.val_fraction > 0):
            raise FinegrainError("too few images to carve a validation split: add images or a val/ folder")
        self.train_counts = [0] * len(self.classes)
        for sample in self.splits.train:
            self.train_counts[sample.label] += 1

    def _setup_model(self) -> None:
        cfg = self.cfg
        # regime=auto is settled once the data is known; auto never picks scratch, so the model is built the same way
        self.regime = Regime.parse("last:2" if cfg.regime == "auto" else cfg.regime)
        model = build_classifier(cfg, self.regime, self.classes).to(self.dist.device)
        self.model = model.to(memory_format=torch.channels_last) if cfg.channels_last else model
        self.regime_choice = None
        if cfg.regime == "auto":
            self.cfg, self.regime_choice = settle_auto_regime(
                cfg, self.model, self.train_counts, self.dist, progress=self.progress
            )
            self.regime = Regime.parse(self.cfg.regime)
        self.regime.apply(self.model)

    def _setup_optimization(self) -> None:
        cfg = self.cfg
        counts, options = self.train_counts, cfg.loss_options or {}
        self.loss_fn = create_loss(cfg.loss, label_smoothing=cfg.label_smoothing, class_counts=counts, **options)
        init_head_bias_for_loss(self.model, self.loss_fn, cfg)
        self.eval_loss = create_loss("ce")
        self.optimizer = make_optimizer(cfg, self.regime, self.model)
        self.steps_per_epoch = math.ceil(len(self.splits.train) / (cfg.batch_size * self.dist.world_size))
        self.plan_epochs(cfg.epochs)
        self.ema = None
        if cfg.ema_decay:
            from timm.utils import ModelEmaV3  # timm.utils pulls in more than the models need

            self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay)
        self.ddp_model = self.model
        if self.dist.enabled:
            ids = None if self.dist.device.type == "cpu" else [self.dist.device.index]
            self.ddp_model = DistributedDataParallel(self.model, device_ids=ids)
        fp16 = cfg.precision == "amp" and self.dist.device.type == "cuda" and not torch.cuda.is_bf16_supported()
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None  # fp16 needs loss scaling; bf16 does not

    def _make_steps(self, *, cached: bool) -> ImageSteps:
        common = dict(cfg=self.cfg, runtime=self.runtime, dist=self.dist, num_classes=len(self.classes))
        if cached:
            return CachedTrunkSteps(
                self.model, self.splits, regime=self.regime, progress=self.progress, on_bad=self._note_bad, **common
            )
        return ImageSteps(self.model, self.splits, forward=self.ddp_model, **common)

    def plan_epochs(self, epochs: int) -> None:
        """Plan `epochs` epochs (a time budget lowers the plan): the schedule ends with the last of them."""
        self.planned_epochs = epochs
        self.schedule = make_schedule(self.cfg, steps_per_epoch=self.steps_per_epoch, epochs=epochs)

    @property
    def eval_model(self) -> torch.nn.Module:
        """The model that is evaluated and kept: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def build_caches(self) -> None:
        """Train on the frozen trunk cached over augmented views from now on (head or last:K); built once."""
        self.setup()
        if not isinstance(self.steps, CachedTrunkSteps):
            self.steps = self._make_steps(cached=True)
        self.steps.prepare()

    def _note_bad(self, samples: list[Sample], bad: list[tuple[int, str]]) -> None:
        for i, reason in bad:
            self.skipped.setdefault(samples[i].path, reason)

    # ---- steps ------------------------------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict:
        """One epoch of optimizer steps: its train loss, top-1, images/s and last learning rate."""
        cfg = self.setup().cfg
        self.steps.prepare()
        seed_all(epoch_seed(cfg.seed, epoch, 0))
        if hasattr(self.loss_fn, "set_epoch"):  # deferred re-weighting (LDAM-DRW) switches at a set epoch
            self.loss_fn.set_epoch(epoch, cfg.epochs)
        n_batches, batches = self.steps.train_batches(epoch)
        set_train_mode(self.model, self.regime, freeze_bn=cfg.freeze_bn)
        show = self.progress and self.dist.is_main
        meter = _EpochMeter(n_batches, f"epoch {epoch + 1}/{self.planned_epochs}", self.dist.world_size, show=show)
        for i, batch in enumerate(batches):
            self._note_bad(self.splits.train, batch.failed)
            step = epoch * self.steps_per_epoch + i
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
            if batch.x is None:
                continue
            self.schedule.apply(self.optimizer, step)
            meter.update(*self._step(batch, step), batch.y)
        return {**meter.close(self.dist), "lr": self.optimizer.param_groups[-1]["lr"]}

    def _step(self, batch: TrainBatch, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer update; returns (loss, logits)."""
        with self.runtime.autocast():
            logits = self.steps.forward(batch.x)
            loss = self.loss_fn(logits.float(), batch.target)
        optimizer_update(loss, self.optimizer, self.model, scaler=self.scaler, clip_grad=self.cfg.clip_grad)
        if self.ema is not None:
            self.ema.update(self.model, step=step)
        return loss, logits

    @torch.no_grad()
    def evaluate(self, samples: list[Sample], *, model: torch.nn.Module | None = None) -> dict:
        """top-1, mean per-class accuracy, loss, n and per-class accuracy [C] over `samples`, reduced across ranks.

        `model` defaults to the trained model, run on the images; passed as the trained model itself, the val split
        comes from the trunk cache when there is one."""
        self.setup()
        cached = model is self.model
        model = model if model is not None else self.model
        model.eval()
        per_class = torch.zeros(2, len(self.classes), dtype=torch.float64)  # correct, count
        loss_sum = torch.zeros(1, dtype=torch.float64)
        for logits, y, failed in self.steps.eval_batches(samples, model, cached=cached):
            self._note_bad(samples, failed)
            if logits is None:
                continue
            loss_sum += self.eval_loss(logits, y).item() * len(y)
            hit = (logits.argmax(1) == y).double().cpu()
            per_class[0].index_add_(0, y.cpu(), hit)
            per_class[1].index_add_(0, y.cpu(), torch.ones_like(hit))
        return _accuracy(self.dist.all_reduce_sum(per_class), self.dist.all_reduce_sum(loss_sum))

    def probe_init_head(self) -> dict:
        """Fit the head as an L2-regularised logistic regression on frozen features (L-BFGS), the penalty chosen
        on the validation split when there is one; fine-tuning then starts from it (LP-FT)."""
        self.setup()
        if self.dist.enabled:
            raise FinegrainError("head_init=probe runs in a single process; start the run without torchrun")
        if not isinstance(self.model.head, torch.nn.Linear):
            raise FinegrainError("head_init=probe needs a linear head (not normed_head=true)")
        # fitted on the first cached view when there is a cache: on cub100 (256 px) a probe on the eval view of train
        # scored the same on val (0.884 vs 0.881) and costs one more full pass
        x, y = self.steps.head_inputs("train")
        info = init_head_from_probe(
            self.model.head, x, y, val=self.steps.head_inputs("val") if self.splits.val else None
        )
        if self.ema is not None:
            self.ema.module.load_state_dict(self.model.state_dict())
        self.probe_info = info
        return info

    # ---- the run ----------------------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Run the planned epochs (with cfg.resume, the rest of them), then the test split; writes the run folder.
        Resuming a run that already ended does nothing and returns what it recorded."""
        if self.cfg.resume and (done := finished_run(self.cfg.out)) is not None:
            return _recorded_result(self.cfg.out, done, progress=self.progress)
        self.setup()
        cfg, state, callbacks = self.cfg, FitState(), self._callbacks()
        for cb in callbacks:
            cb.on_fit_start(self, state)
        t0 = self.now()
        self.steps.prepare()
        if cfg.head_init == "probe" and state.start_epoch == 0:
            self.probe_init_head()
        for cb in callbacks:
            cb.on_train_start(self, state)
        seconds_before = state.seconds_before
        for epoch in range(state.start_epoch, cfg.epochs):
            if epoch >= self.planned_epochs:  # a time budget lowered the plan
                break
            for cb in callbacks:
                cb.on_epoch_start(self, epoch)
            row = {"epoch": epoch + 1, **self.train_epoch(epoch), **self._val_row()}
            row["seconds"] = seconds_before + self.now() - t0
            state.history.append(row)
            stop = [cb.on_epoch_end(self, state, epoch, row) for cb in callbacks]
            self.dist.barrier()
            kill_point("epoch", epoch + 1)  # tests of resume (finegrain/faults.py)
            if any(stop):
                break
        return self._finish(state, callbacks, self.now() - t0)

    def _callbacks(self) -> list[Callback]:
        """In hook order: the budget re-plans and the best model is judged before the checkpoint saves them."""
        cfg, out = self.cfg, self.cfg.out
        stops = [TimeBudget(cfg.time_budget_min, now=self.now)] if cfg.time_budget_min is not None else []
        stops += [MaxSteps(cfg.max_steps)] if cfg.max_steps is not None else []
        patience = [EarlyStopping(cfg.early_stop)] if cfg.early_stop is not None else []
        return [*stops, BestModel(out), *patience, Checkpointer(out), MetricsLogger(out, progress=self.progress)]

    def _val_row(self) -> dict:
        if not self.splits.val:  # without a validation split the newest model is kept
            return {"val_top1": math.nan, "val_mean_per_class": math.nan, "val_loss": math.nan}
        val = self.evaluate(self.splits.val, model=self.eval_model)
        return {f"val_{k}": v for k, v in val.items() if k not in ("n", "per_class")}

    def _finish(self, state: FitState, callbacks: list[Callback], seconds: float) -> TrainResult:
        self.dist.barrier()
        for cb in callbacks:
            cb.on_fit_end(self, state)
        final = self.eval_model
        test = None
        if self.splits.test:
            many, few = self.cfg.shot_thresholds
            test = _by_class(self.evaluate(self.splits.test, model=final), self.classes, self.train_counts, many, few)
        if self.dist.is_main:
            extra = {"regime": str(self.regime), "best_epoch": state.best_epoch + 1}
            spec = ModelSpec.of(final, classes=self.classes, train_counts=self.train_counts, extra=extra)
            save_model(final, os.path.join(self.cfg.out, "model"), spec)
            atomic_write_json(os.path.join(self.cfg.out, "metrics.json"), _summary(self, state, test, seconds))
        skipped = sorted(self.skipped.items())
        return TrainResult(
            self.cfg.out, state.history, state.best_epoch + 1, state.best_val_top1, test, skipped, seconds
        )

    def close(self) -> None:
        """Leave the process group (torchrun)."""
        if self.dist is not None:
            self.dist.close()


class _EpochMeter:
    """An epoch's running train loss, top-1 and images/s, on a progress bar."""

    def __init__(self, total: int, desc: str, world_size: int, *, show: bool) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
        self.world_size, self.t0 = world_size, time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, unit="batch", disable=not show, dynamic_ncols=True, leave=False)

    def update(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        with torch.no_grad():
            self.sums += torch.tensor(
                [loss.item() * len(y), (logits.argmax(1) == y).sum().item(), len(y)], dtype=torch.float64
            )
        s = self.sums
        self.bar.update(1)
        speed = s[2] * self.world_size / (time.perf_counter() - self.t0)
        self.bar.set_postfix(loss=f"{s[0] / s[2]:.3f}", acc=f"{s[1] / s[2]:.3f}", img_s=f"{speed:.1f}")

    def close(self, dist: DistContext) -> dict:
        self.bar.close()
        sums = dist.all_reduce_sum(self.sums)
        n = max(sums[2].item(), 1)
        return {
            "train_loss": sums[0].item() / n,
            "train_top1": sums[1].item() / n,
            "train_images_per_s": sums[2].item() / (time.perf_counter() - self.t0),
        }


def _accuracy(per_class: torch.Tensor, loss_sum: torch.Tensor) -> dict:
    """per_class [2, C] (correct, count) and the loss sum [1] -> the evaluate() dict."""
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


def _by_class(metrics: dict, classes: list[str], train_counts: list[int], many: int, few: int) -> dict:
    """evaluate()'s dict with its per-class accuracy [C] as many / medium / few-shot accuracy (by the training
    counts) and per_class_top1 {class: accuracy, None without test images}."""
    acc = metrics.pop("per_class")
    metrics.update(shot_accuracy(acc, train_counts, many=many, few=few))
    metrics["per_class_top1"] = {c: (None if np.isnan(a) else float(a)) for c, a in zip(classes, acc)}
    return metrics


def _summary(trainer: Trainer, state: FitState, test: dict | None, seconds: float) -> dict:
    """metrics.json: the best epoch (1-based; 0: the LP-FT probe itself won on val), test metrics, skipped files."""
    return {
        "best_epoch": state.best_epoch + 1,
        "best_val_top1": state.best_val_top1,
        "head_init_probe": trainer.probe_info,
        "test": test,
        "skipped": [{"path": p, "reason": r} for p, r in sorted(trainer.skipped.items())],
        "splits": split_sizes(trainer.splits),
        "seconds": seconds,
    }


def _recorded_result(out: str, metrics: dict, *, progress: bool) -> TrainResult:
    """The TrainResult of a run that ended, from its metrics.json and last checkpoint (nothing is recomputed)."""
    if progress:
        print(f"{out} already ended (metrics.json, model/): nothing to resume", flush=True)
    saved = load_checkpoint(os.path.join(out, CHECKPOINT)) if os.path.isfile(os.path.join(out, CHECKPOINT)) else {}
    skipped = [(s["path"], s["reason"]) for s in metrics.get("skipped", [])]
    return TrainResult(
        out,
        list(saved.get("history", [])),
        int(metrics.get("best_epoch", 0)),
        float(metrics.get("best_val_top1", float("nan"))),
        metrics.get("test"),
        skipped,
        float(metrics.get("seconds", 0.0)),
    )


def train(cfg: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Run (or with cfg.resume, continue) a fine-tuning run described by `cfg`."""
    trainer = Trainer(cfg, progress=progress)
    try:
        return trainer.fit()
    finally:
        trainer.close()
