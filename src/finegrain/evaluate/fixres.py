"""FixRes (Touvron et al., 2019): adapt a trained model to a higher test resolution.

Training crops (RandomResizedCrop) show objects larger than the centre crop at the same size does, so a model is
often better tested at a higher resolution, once the statistics that depend on it are fixed. `fix_resolution`:
1. sets the preprocessing to the new size (same crop_pct),
2. re-estimates the running mean/variance of the BatchNorm before global pooling (or of every BatchNorm,
   `bn_layers="all"`) on training images seen as at test time (cumulative average over the images, the rest of
   the network in eval mode),
3. fine-tunes the linear classifier on the pooled features of those images at the new size (a few epochs from its
   current weights, at a small learning rate), unless `head_epochs=0`.
The result is saved as a new model folder that `finegrain.load` reads like any other.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from finegrain.errors import FinegrainError
from finegrain.evaluate.predictor import Predictor
from finegrain.models import save_model
from finegrain.runtime import ImageFiles, Runtime, forward, image_loader, resolve_precision


def _batches(paths, pre, batch_size, rt: Runtime):
    """(uint8 [B, 3, S, S], positions) of the images that decode, at `pre`'s eval geometry."""
    data = ImageFiles(paths, pre.pil_to_uint8, min_side=pre.resize_size)
    for x, _, positions, _ in image_loader(data, batch_size=batch_size, workers=rt.num_workers):
        if x is not None:
            yield x, positions


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    paths: Sequence[str],
    pre,
    *,
    layers: str = "last",
    batch_size=32,
    workers=None,
    flip=True,
    precision="fp32",
) -> int:
    """Re-estimate BatchNorm running statistics on `paths` at `pre`'s geometry; returns the images used.

    layers: "last" (the BatchNorm that precedes global pooling, as FixRes fine-tunes) or "all". Re-estimating
    every layer also moves the statistics of layers that were frozen while the later ones learned on their
    outputs, which shifts the features those later layers expect."""
    if layers not in ("last", "all"):
        raise FinegrainError(f"BatchNorm layers to re-estimate must be last or all; got {layers!r}")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if layers == "last":
        bns = bns[-1:]
    if not bns:
        return 0
    model.eval()
    saved = [(bn.momentum, bn.training) for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every batch counts equally
        bn.train()
    rt = Runtime(str(next(model.parameters()).device), precision, channels_last=False, workers=workers)
    n = 0
    try:
        for x, _ in _batches(paths, pre, batch_size, rt):
            forward(model, x, pre, rt)  # BatchNorm in train mode: the pass updates the running statistics
            if flip:
                forward(model, x.flip(-1), pre, rt)
            n += len(x)
    finally:
        for bn, (momentum, _) in zip(bns, saved):
            bn.momentum = momentum
        model.eval()
    if n == 0:
        raise FinegrainError("no training image could be read to re-estimate BatchNorm statistics")
    return n


@torch.no_grad()
def _pooled(model, paths, pre, labels, *, batch_size, workers, precision):
    rt = Runtime(str(next(model.parameters()).device), precision, channels_last=False, workers=workers)
    feats, ys = [], []
    for x, positions in _batches(paths, pre, batch_size, rt):
        feats.append(forward(model, x, pre, rt).features.cpu())
        ys.append(torch.as_tensor(labels[positions]))
    return torch.cat(feats), torch.cat(ys)


def finetune_head(model, feats, labels, *, epochs=5, lr=0.01, weight_decay=1e-4, label_smoothing=0.1, seed=0) -> None:
    """A few epochs of SGD on the head alone, from its current weights, on fixed pooled features."""
    gen = torch.Generator().manual_seed(seed)
    head = model.head
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    n = len(feats)
    steps = epochs * ((n + 63) // 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(n, generator=gen).split(64):
                opt.zero_grad(set_to_none=True)
                loss_fn(head(feats[idx].to(head.weight.device)), labels[idx].to(head.weight.device)).backward()
                opt.step()
                sched.step()


def fix_resolution(
    predictor,
    train_paths: Sequence[str],
    train_labels: np.ndarray,
    size: int,
    *,
    head_epochs: int = 5,
    head_lr: float = 0.01,
    bn_layers: str = "last",
    max_images: int | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    precision: str = "auto",
    seed: int = 0,
):
    """A copy of the loaded model adapted to test at `size` pixels: returns a new Predictor (not saved).

    max_images: use a seeded random subset of the training images (both steps) to bound the cost."""

    if size < 32:
        raise FinegrainError(f"test size must be at least 32 pixels; got {size}")
    model = copy.deepcopy(predictor.model).eval()
    pre = predictor.preprocess.with_size(size)
    model.backbone.preprocess = pre
    rng = np.random.default_rng(seed)
    train_paths, train_labels = list(train_paths), np.asarray(train_labels)
    if max_images and len(train_paths) > max_images:  # a seeded random subset serves both steps
        keep = np.sort(rng.choice(len(train_paths), max_images, replace=False))
        train_paths, train_labels = [train_paths[i] for i in keep], train_labels[keep]
    bn_paths = train_paths
    prec = resolve_precision(precision, predictor.device)
    n_bn = recalibrate_batchnorm(
        model, bn_paths, pre, layers=bn_layers, batch_size=batch_size, workers=workers, precision=prec
    )
    info = {"size": size, "bn_layers": bn_layers, "bn_images": n_bn, "head_epochs": head_epochs, "head_lr": head_lr}
    if head_epochs > 0:
        if not isinstance(model.head, nn.Linear):
            raise FinegrainError("the FixRes head fine-tuning needs a linear head; pass head_epochs=0")
        feats, ys = _pooled(
            model,
            list(train_paths),
            pre,
            np.asarray(train_labels),
            batch_size=batch_size,
            workers=workers,
            precision=prec,
        )
        finetune_head(model, feats, ys, epochs=head_epochs, lr=head_lr, seed=seed)
        info["head_images"] = len(ys)
    spec = predictor.spec.replace(preprocess=pre, extra={**predictor.spec.extra, "fixres": info})
    return Predictor(model, spec, str(predictor.device))


def save_predictor(predictor, folder: str) -> str:
    """Write a (FixRes-adapted) Predictor as a model folder."""

    return save_model(predictor.model, folder, predictor.spec)


def fixres_samples(model: str, data: str, split: str, classes: list[str]):
    """The images fixres may fit on: the split asked for; in a flat folder, the run's recorded train (or val)
    images, never its recorded test holdout."""
    import numpy as np

    from finegrain.config import load_splits
    from finegrain.data import load_image_set
    from finegrain.evaluate.evaluation import samples_for_model

    if load_image_set(data).splits != ["all"]:
        return samples_for_model(data, split, classes)[:2]
    record = load_splits(model)
    if record is None or not record[1].get(split):
        raise FinegrainError(
            f"{data} is a flat folder and {model} records no {split} split: fixres would fit on images the test "
            "score may use; give a folder with train/ and test/ or the run trained on this folder"
        )
    allowed = {os.path.abspath(p) for p in record[1][split]}
    paths, labels, _ = samples_for_model(data, "all", classes)
    keep = [i for i, p in enumerate(paths) if os.path.abspath(p) in allowed]
    return [paths[i] for i in keep], np.asarray(labels)[keep]
