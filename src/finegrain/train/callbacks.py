"""What a run does around its epochs besides training: one small class a concern, with Lightning-style hooks.

The engine calls each hook on every callback, in list order: `on_fit_start` before any work (resume, config.yaml),
`on_train_start` once the step source is prepared and the head initialised, `on_epoch_start`, `on_epoch_end`
(True: stop after this epoch) and `on_fit_end` after the last epoch, before the test split. The order matters where
one reads what another wrote: TimeBudget re-plans before the checkpoint saves the plan and the epoch line prints it;
BestModel decides "improved" before EarlyStopping counts and the checkpoint saves it. Files are written by rank 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from safetensors.torch import load_file

from finegrain.atomic import atomic_write_text
from finegrain.config import config_dict, save_config, save_splits
from finegrain.errors import FinegrainError
from finegrain.models import load_checkpoint, save_checkpoint, save_weights

CHECKPOINT = "checkpoint-last.pt"
BEST = "best.safetensors"
Trainer = Any  # the engine's Trainer (not imported: the engine imports this module)


@dataclass
class FitState:
    """What a run has done: its epochs' rows, the best epoch (0-based; -1: none yet, or the LP-FT probe) and its
    val top-1, and the epoch this fit starts at (after a resume, the one after the checkpoint's)."""

    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_val_top1: float = -1.0
    start_epoch: int = 0

    @property
    def seconds_before(self) -> float:
        """Wall time of the epochs run before a resume."""
        return self.history[-1]["seconds"] if self.history else 0.0


class Callback:
    """Hooks that do nothing; a callback overrides the ones it needs."""

    def on_fit_start(self, trainer: Trainer, state: FitState) -> None:
        pass

    def on_train_start(self, trainer: Trainer, state: FitState) -> None:
        pass

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        pass

    def on_epoch_end(self, trainer: Trainer, state: FitState, epoch: int, row: dict) -> bool:
        return False

    def on_fit_end(self, trainer: Trainer, state: FitState) -> None:
        pass


class Checkpointer(Callback):
    """checkpoint-last.pt, written atomically after every epoch; with cfg.resume the run continues from it (and
    without, a folder that holds one is refused)."""

    def __init__(self, out: str) -> None:
        self.out, self.path = out, os.path.join(out, CHECKPOINT)

    def on_fit_start(self, trainer: Trainer, state: FitState) -> None:
        if not trainer.cfg.resume:
            if os.path.exists(self.path):
                raise FinegrainError(
                    f"{self.out} already holds a run: add --resume to continue it, or choose another --out"
                )
            return
        saved = load_checkpoint(self.path)
        trainer.model.load_state_dict(saved["model"])
        trainer.optimizer.load_state_dict(saved["optimizer"])
        if trainer.ema is not None and saved.get("ema"):
            trainer.ema.load_state_dict(saved["ema"])
        state.history = list(saved["history"])
        state.best_epoch, state.best_val_top1 = saved["best_epoch"], saved["best_val_top1"]
        state.start_epoch = saved["epoch"] + 1
        trainer.plan_epochs(int(saved.get("planned_epochs", trainer.cfg.epochs)))

    def on_epoch_end(self, trainer: Trainer, state: FitState, epoch: int, row: dict) -> bool:
        if trainer.dist.is_main:
            save_checkpoint(self.path, self.checkpoint(trainer, state, epoch))
        return False

    @staticmethod
    def checkpoint(trainer: Trainer, state: FitState, epoch: int) -> dict:
        return {
            "model": trainer.model.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "ema": trainer.ema.state_dict() if trainer.ema is not None else {},
            "epoch": epoch,
            "history": state.history,
            "best_epoch": state.best_epoch,
            "best_val_top1": state.best_val_top1,
            "planned_epochs": trainer.planned_epochs,
            "config": config_dict(trainer.cfg),
        }


def finished_run(out: str) -> dict | None:
    """The metrics.json of a run that ended (its model saved, then metrics.json), None for one that did not."""
    path = os.path.join(out, "metrics.json")
    if not (os.path.isfile(path) and os.path.isfile(os.path.join(out, "model", "model.json"))):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class BestModel(Callback):
    """best.safetensors: the evaluated model (the EMA when there is one) whenever val top-1 improves; without a val
    split, the newest. With head_init=probe the probe-initialised model is the first candidate: fine-tuning must
    beat it on val to replace it. At the end the best weights are loaded back."""

    def __init__(self, out: str) -> None:
        self.path = os.path.join(out, BEST)

    def on_train_start(self, trainer: Trainer, state: FitState) -> None:
        if trainer.cfg.head_init != "probe" or state.start_epoch != 0 or not trainer.splits.val:
            return
        state.best_val_top1 = trainer.evaluate(trainer.splits.val, model=trainer.eval_model)["top1"]
        trainer.probe_info["val_top1_model"] = state.best_val_top1
        self._save(trainer)

    def on_epoch_end(self, trainer: Trainer, state: FitState, epoch: int, row: dict) -> bool:
        if not trainer.splits.val or row["val_top1"] > state.best_val_top1:
            state.best_epoch, state.best_val_top1 = epoch, row["val_top1"]  # NaN without a val split
            self._save(trainer)
        return False

    def on_fit_end(self, trainer: Trainer, state: FitState) -> None:
        if os.path.exists(self.path):
            trainer.eval_model.load_state_dict(load_file(self.path))

    def _save(self, trainer: Trainer) -> None:
        if trainer.dist.is_main:
            save_weights(trainer.eval_model, self.path)


class EarlyStopping(Callback):
    """Stop once val top-1 has not improved (BestModel's judgement) for `patience` epochs of this fit."""

    def __init__(self, patience: int) -> None:
        self.patience, self.waited = patience, 0

    def on_fit_start(self, trainer: Trainer, state: FitState) -> None:
        self.waited = 0

    def on_epoch_end(self, trainer: Trainer, state: FitState, epoch: int, row: dict) -> bool:
        self.waited = 0 if state.best_epoch == epoch else self.waited + 1
        return self.waited >= self.patience


class TimeBudget(Callback):
    """time_budget_min: plan only the epochs that fit (at the last epoch's pace) and end the schedule there; stop
    when the budget is spent. The budget bounds the whole run: the final pass over the test split is reserved (its
    images at the measured evaluation pace) and the trunk cache may take at most half of it (steps.py).
    Timing-dependent by nature; the plan is saved in the checkpoint, so a resumed run keeps it."""

    def __init__(self, minutes: float, *, now=time.perf_counter) -> None:
        self.seconds, self.epoch_start, self.now = 60 * minutes, 0.0, now

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self.epoch_start = self.now()

    def on_epoch_end(self, trainer: Trainer, state: FitState, epoch: int, row: dict) -> bool:
        # the pace of this epoch alone: one-off work before it (the trunk cache) is in `seconds`, not in the pace
        pace = self.now() - self.epoch_start
        reserve = (trainer.steps.eval_pace() or 0.0) * len(trainer.splits.test)
        remaining = self.seconds - reserve - row["seconds"]
        fits = epoch + 1 + int(max(remaining, 0) // max(pace, 1e-9))
        plan = max(epoch + 1, min(trainer.planned_epochs, fits))
        if plan < trainer.planned_epochs:
            trainer.plan_epochs(plan)
        return row["seconds"] + reserve >= self.seconds


class MaxSteps(Callback):
    """Stop after the epoch in which the run reaches max_steps optimizer steps (the schedule is unchanged)."""

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps

    def on_epoch_end(self, trainer: Trainer, state: FitState, epoch: int, row: dict) -> bool:
        return (epoch + 1) * trainer.steps_per_epoch >= self.max_steps


class MetricsLogger(Callback):
    """config.yaml (resolved) and splits.json (the images of each split) at the start; after each epoch
    metrics.csv, TensorBoard scalars (when tensorboard is installed) and, with progress, the printed epoch line."""

    def __init__(self, out: str, *, progress: bool) -> None:
        self.out, self.progress, self.writer = out, progress, None

    def on_fit_start(self, trainer: Trainer, state: FitState) -> None:
        # a resumed run keeps the config.yaml and splits.json it started with (and regime=auto's recorded reason)
        resumed = trainer.cfg.resume and os.path.isfile(os.path.join(self.out, "config.yaml"))
        if trainer.dist.is_main and not resumed:
            save_config(trainer.cfg, self.out, extra={"resolved": describe_run(trainer)})
            splits = trainer.splits
            recorded = {"train": splits.train, "val": splits.val, "test": splits.test}
            save_splits(
                self.out,
                data=trainer.cfg.data,
                how=splits.note,
                splits={k: [s.path for s in v] for k, v in recorded.items()},
            )
        if trainer.dist.is_main:
            self.writer = _tensorboard(self.out)

    def on_epoch_end(self, trainer: Trainer, state: FitState, epoch: int, row: dict) -> bool:
        if not trainer.dist.is_main:
            return False
        write_history(os.path.join(self.out, "metrics.csv"), state.history)
        if self.writer is not None:
            for k, v in row.items():
                if k != "epoch":
                    self.writer.add_scalar(k, v, epoch + 1)
            self.writer.flush()
        if self.progress:
            print(
                f"epoch {epoch + 1}/{trainer.planned_epochs}: train loss {row['train_loss']:.3f} "
                f"acc {row['train_top1']:.3f} | val top-1 {row['val_top1']:.4f} "
                f"mean/class {row['val_mean_per_class']:.4f} | {row['train_images_per_s']:.1f} img/s"
            )
        return False

    def on_fit_end(self, trainer: Trainer, state: FitState) -> None:
        if self.writer is not None:
            self.writer.close()


def describe_run(trainer: Trainer) -> dict:
    """The resolved facts config.yaml records beside the options: regime (and auto's choice), sizes, splits."""
    model, splits = trainer.model, trainer.splits
    choice = trainer.regime_choice
    return {
        "regime": str(trainer.regime),
        "regime_auto": dataclasses.asdict(choice) if choice is not None else None,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "parameters": sum(p.numel() for p in model.parameters()),
        "backbone": model.backbone.describe(),
        "classes": len(trainer.classes),
        "steps_per_epoch": trainer.steps_per_epoch,
        "world_size": trainer.dist.world_size,
        "splits": split_sizes(splits),
    }


def split_sizes(splits) -> dict:
    return {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test), "how": splits.note}


def write_history(path: str, history: list[dict]) -> None:
    """metrics.csv: one row an epoch, floats to 6 significant digits."""
    keys = list(history[0])
    lines = [",".join(keys)] + [
        ",".join(f"{r.get(k, ''):.6g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys)
        for r in history
    ]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _tensorboard(out: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: metrics.csv has the same numbers
        return None
    return SummaryWriter(os.path.join(out, "tensorboard"))


__all__ = [
    "BEST",
    "CHECKPOINT",
    "BestModel",
    "Callback",
    "Checkpointer",
    "EarlyStopping",
    "FitState",
    "MaxSteps",
    "MetricsLogger",
    "TimeBudget",
    "describe_run",
    "write_history",
]
