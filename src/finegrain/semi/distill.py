"""Distillation-based self-training (Su, Cheng, Maji, "A realistic evaluation of semi-supervised learning for
fine-grained classification", CVPR 2021; Hinton et al.'s knowledge distillation): a teacher's temperature-softened
predictions on the unlabeled images, and a fine-tuned student trained on the labelled images with its own loss plus
`weight` x T^2 KL(teacher || student) at temperature T on the unlabeled ones. They found it the most robust method
when starting from a pretrained model, also with out-of-class unlabeled images.

The teacher is the best model on frozen features finegrain has: label propagation's probe (semi/propagation.py),
whose out-of-class guard and certainty decide which unlabeled images the student learns from. The student is
finegrain's training engine (`DistillTrainer`, a `Trainer`) on the frozen trunk cached over augmented views of the
labelled and the unlabeled images (regime head or last:K: what a CPU affords); each step forwards a labelled batch
and `ratio` x as many unlabeled images together, so BatchNorm sees both.

Measured (bench.unlabeled --distill, cub100, 5 labelled images a class, the rest of train unlabeled, 3 seeds): a
last:1 lite0 student at 256 px reached 0.850 test top-1 against 0.705 for the same student on the labelled images
alone (seed 0), but stayed 1.2 points below its teacher (0.862): on a 2-core CPU the student sees 15 epochs of 2
cached views, not the long full fine-tune of the paper. With half the pool from 50 other classes (seed 0) it used
1241 of 2398 images (117 foreign) and scored 0.896: above the best supervised head (0.875), below LP (0.910). At
1 labelled image a class (seed 0) 0.685 against LP's 0.729 (60 epochs, the 5-shot student's 240 steps; 15 epochs:
0.591). T = 2 and T = 1 scored the same on a train-labels-only development protocol (0.831 / 0.828 on the unlabeled
pool, seed 5)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from finegrain.atomic import atomic_write_json
from finegrain.config import TrainConfig
from finegrain.data import Sample
from finegrain.errors import FinegrainError
from finegrain.heads.index import l2_normalize
from finegrain.semi.propagation import LabelPropagationProbe
from finegrain.train.engine import Trainer, TrainResult
from finegrain.train.seeding import epoch_seed
from finegrain.train.steps import CachedTrunkSteps, TrainBatch, optimizer_update

TEMPERATURE = 2.0  # Hinton et al.'s softening; the probe teacher's logits are confident on most pool images
WEIGHT = 1.0
RATIO = 2  # unlabeled images a step per labelled one


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = TEMPERATURE
) -> torch.Tensor:
    """T^2 x KL(softmax(teacher / T) || softmax(student / T)), summed over classes, mean over the batch.
    student_logits, teacher_logits [B, C]; T^2 keeps the gradient's scale independent of T (Hinton et al.)."""
    t = float(temperature)
    log_q = F.log_softmax(teacher_logits.float() / t, dim=1)
    log_p = F.log_softmax(student_logits.float() / t, dim=1)
    return t * t * F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)


@dataclass
class Teacher:
    """Soft labels of M unlabeled images: logits [M, C] in the run's class order, use [M] (False: left out by the
    guard or below the certainty bar), and a report of what was used."""

    logits: np.ndarray
    use: np.ndarray
    report: dict


def teacher_logits(clf, X: np.ndarray, n_classes: int) -> np.ndarray:
    """A fitted probe's logits [M, n_classes] on X [M, D], its classes_ placed in 0..n_classes-1 (a class it never
    saw gets a logit far below the others)."""
    d = np.asarray(clf.decision_function(X), np.float64)
    d = np.stack([np.zeros_like(d), d], axis=1) if d.ndim == 1 else d  # binary: sigmoid(d) = softmax([0, d])
    out = np.full((len(X), n_classes), d.min() - 30.0 if d.size else 0.0)
    out[:, np.asarray(clf.classes_, np.int64)] = d
    return out


def make_teacher(clf, X_unlab: np.ndarray, n_classes: int, *, temperature: float = TEMPERATURE) -> Teacher:
    """The Teacher of a fitted semi-supervised probe (pseudo_labels_ -1: not used) on X_unlab [M, D] (as it was
    fitted on); the report gives the teacher's top softened probability over the images used."""
    logits = teacher_logits(clf, X_unlab, n_classes)
    use = np.asarray(clf.pseudo_labels_) >= 0
    conf = torch.softmax(torch.from_numpy(logits[use]) / temperature, dim=1).max(dim=1).values.numpy()
    report = {
        "method": "distillation",
        "teacher": getattr(clf, "report_", {}).get("method", type(clf).__name__),
        "n_unlabeled": int(len(X_unlab)),
        "n_used": int(use.sum()),
        "n_dropped_by_guard": int(getattr(clf, "report_", {}).get("n_dropped_by_guard", 0)),
        "mean_confidence": round(float(conf.mean()), 4) if len(conf) else None,
        "min_confidence": round(float(conf.min()), 4) if len(conf) else None,
        "temperature": float(temperature),
    }
    return Teacher(logits, use, report)


def fit_teacher(X_lab: np.ndarray, y: np.ndarray, X_unlab: np.ndarray, n_classes: int, *, seed: int = 0,
                temperature: float = TEMPERATURE) -> Teacher:  # fmt: skip
    """Label propagation's probe (its defaults, guard on) on L2-normalised frozen features X_lab [L, D] (labels y
    in 0..n_classes-1) and X_unlab [M, D]; its soft labels on X_unlab."""
    Xl, Xu = l2_normalize(np.asarray(X_lab, np.float32)), l2_normalize(np.asarray(X_unlab, np.float32))
    clf = LabelPropagationProbe(random_state=seed).fit(Xl, np.asarray(y), Xu)
    return make_teacher(clf, Xu, n_classes, temperature=temperature)


class DistillTrainer(Trainer):
    """A fine-tuning run (`Trainer`) whose every step adds weight x `distillation_loss` on `ratio` x batch_size
    unlabeled images to the labelled loss. `teacher`: soft labels of `unlabeled` (paths, in order); None: label
    propagation's probe on the run's own frozen pooled features (the first cached view of the labelled and the
    unlabeled images), fitted before training. Writes <out>/unlabeled.json (what the student learned from)."""

    def __init__(self, cfg: TrainConfig, unlabeled: list[str], *, teacher: Teacher | None = None,
                 temperature: float = TEMPERATURE, weight: float = WEIGHT, ratio: int = RATIO,
                 progress: bool = True, image_set=None) -> None:  # fmt: skip
        if not temperature > 0 or not weight >= 0 or int(ratio) < 1:
            raise FinegrainError(f"distillation needs temperature > 0, weight >= 0 and ratio >= 1; got "
                                 f"{temperature}, {weight}, {ratio}")  # fmt: skip
        if not unlabeled:
            raise FinegrainError("distillation needs unlabeled images; got none")
        if teacher is not None and len(teacher.logits) != len(unlabeled):
            raise FinegrainError(f"the teacher has {len(teacher.logits)} soft labels for {len(unlabeled)} images")
        super().__init__(cfg, progress=progress, image_set=image_set)
        self.unlabeled, self.teacher = list(unlabeled), teacher
        self.temperature, self.weight, self.ratio = float(temperature), float(weight), int(ratio)
        self.unlabeled_cache = None
        self._stream: tuple[int, Iterator] | None = None

    def fit(self) -> TrainResult:
        if self.cfg.resume and os.path.isfile(os.path.join(self.cfg.out, "metrics.json")):
            return super().fit()  # an ended run: nothing to rebuild
        self.setup()
        try:
            self.build_caches()
        except FinegrainError:
            why = "the frozen trunk is cached over the unlabeled images too"
            raise FinegrainError(
                f"train --unlabeled needs regime head or last:K and no mixup/cutmix ({why}); got {self.cfg.regime}"
            ) from None
        self._prepare_unlabeled()
        result = super().fit()
        doc = {"n_files": len(self.unlabeled), "weight": self.weight, "ratio": self.ratio, **self.teacher.report}
        atomic_write_json(os.path.join(self.cfg.out, "unlabeled.json"), doc)
        return result

    def _prepare_unlabeled(self) -> None:
        """Cache the trunk over the unlabeled images (as many views as train), fit the teacher if none was given,
        keep only the images the teacher lets the student learn from."""
        steps: CachedTrunkSteps = self.steps
        samples = [Sample(p, i, "unlabeled") for i, p in enumerate(self.unlabeled)]  # label = position
        seed = epoch_seed(self.cfg.seed, 0, 8)
        cache = steps.cache_samples(samples, n_views=steps.train_cache.num_views, seed=seed)
        if self.teacher is None:
            if not len(cache):
                raise FinegrainError("no unlabeled image could be read")
            x, y = steps.head_inputs("train")
            xu, rows = steps.pooled_features(cache)
            t = fit_teacher(x.numpy(), y.numpy(), xu.numpy(), len(self.classes), seed=self.cfg.seed,
                            temperature=self.temperature)  # fmt: skip
            logits, use = np.zeros((len(samples), len(self.classes))), np.zeros(len(samples), bool)
            logits[rows.numpy()], use[rows.numpy()] = t.logits, t.use
            self.teacher = Teacher(logits, use, {**t.report, "n_unlabeled": len(samples)})
        cache.valid &= torch.from_numpy(np.asarray(self.teacher.use, bool))
        self.teacher.report["n_used"] = len(cache)  # read and kept
        self.unlabeled_cache = cache
        self._teacher_logits = torch.as_tensor(self.teacher.logits, dtype=torch.float32)
        if not len(cache) and self.progress:
            print("distillation: no unlabeled image passed the teacher's guard: labelled loss only", flush=True)

    def _unlabeled_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(cached trunk outputs [B', ...], teacher logits [B', C]) on the device, shuffled, a random view each,
        seeded by (seed, epoch), cycling over the pool as long as asked."""
        g = torch.Generator().manual_seed(epoch_seed(self.cfg.seed, epoch, 9))
        device = self.runtime.torch_device
        while True:
            for h, idx in self.unlabeled_cache.batches(batch_size=self.cfg.batch_size * self.ratio, generator=g):
                yield h.to(device), self._teacher_logits[idx].to(device)

    def _step(self, batch: TrainBatch, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.unlabeled_cache is None or not len(self.unlabeled_cache) or self.weight == 0:
            return super()._step(batch, step)
        epoch = step // self.steps_per_epoch
        if self._stream is None or self._stream[0] != epoch:  # restarted each epoch: a resumed run matches
            self._stream = (epoch, self._unlabeled_batches(epoch))
        h_u, t_u = next(self._stream[1])
        n = len(batch.x)
        with self.runtime.autocast():
            logits = self.steps.forward(torch.cat([batch.x, h_u]))
            loss = self.loss_fn(logits[:n].float(), batch.target)
            kd = distillation_loss(logits[n:], t_u, temperature=self.temperature)
            loss = loss + self.weight * kd
        optimizer_update(loss, self.optimizer, self.model, scaler=self.scaler, clip_grad=self.cfg.clip_grad)
        if self.ema is not None:
            self.ema.update(self.model, step=step)
        return loss, logits[:n]


def train_distilled(cfg: TrainConfig, unlabeled: list[str], *, temperature: float = TEMPERATURE,
                    weight: float = WEIGHT, progress: bool = True) -> TrainResult:  # fmt: skip
    """`finegrain train DATA --unlabeled DIR`: the run `cfg` describes, its student distilled from label
    propagation's probe on the run's frozen features over the unlabeled image files `unlabeled`."""
    trainer = DistillTrainer(cfg, unlabeled, temperature=temperature, weight=weight, progress=progress)
    try:
        return trainer.fit()
    finally:
        trainer.close()
