"""`finegrain extract` as a library call: a folder (or manifest) of images -> a feature store, one process or a
torchrun job."""

from __future__ import annotations

import os
from dataclasses import dataclass

from finegrain.config import ExtractConfig, save_config
from finegrain.errors import FinegrainError
from finegrain.runtime.distributed import torchrun_context


@dataclass(frozen=True)
class FolderExtraction:
    """The extraction's result (embed.extract.ExtractResult), its one-line summary and where skipped files are
    listed (both empty on a torchrun rank other than 0)."""

    result: object
    line: str
    listed: str


def _is_model_path(name: str) -> bool:
    """A finegrain model folder, a training run folder, or one of a run's weight files (not a timm name)."""
    return os.path.isdir(name) or os.path.isfile(name)


def _trained_backbone(path: str, checkpoint: str | None):
    """`--backbone RUN`: the trunk of a saved finegrain model (fine-tuned weights, its preprocessing). The store
    records it as a checkpoint source, so search and the probes rebuild the same trunk."""
    from finegrain.models import find_model_folder, load_model

    if checkpoint is not None:
        raise FinegrainError("--backbone RUN already names the weights: drop --checkpoint")
    folder, weights = find_model_folder(path)
    model, _ = load_model(path)
    backbone = model.backbone
    backbone.source = "checkpoint:" + os.path.abspath(weights or os.path.join(folder, "model.safetensors"))
    return backbone


def extract_folder(cfg: ExtractConfig, *, progress: bool = True) -> FolderExtraction:
    """`finegrain extract`: the images of cfg.data through cfg.backbone (a timm name or a finegrain model) into the
    feature store cfg.out, with its resolved config beside it; under torchrun each rank extracts its shard and rank 0
    merges (embed/shard.py). FinegrainError when no image could be read."""
    from finegrain.backbones import create_backbone
    from finegrain.data import load_image_set
    from finegrain.embed import extract_to_store

    image_set = load_image_set(cfg.data)
    if _is_model_path(cfg.backbone):
        backbone = _trained_backbone(cfg.backbone, cfg.checkpoint)
    else:
        backbone = create_backbone(cfg.backbone, checkpoint=cfg.checkpoint)
    backbone.preprocess = backbone.preprocess.with_geometry(cfg.image_size, cfg.crop_pct)
    if cfg.zoom:  # look closer: decoded at twice the side the trunk runs at (models/zoom.py)
        from finegrain.models.zoom import ZOOM_FACTOR

        backbone.preprocess = backbone.preprocess.with_size(backbone.preprocess.input_size * ZOOM_FACTOR)
    dist = torchrun_context(cfg.device)  # torchrun: each rank extracts its shard, rank 0 merges (embed/shard.py)
    if dist is not None:
        from functools import partial

        from finegrain.embed.shard import extract_sharded

        extract_to_store = partial(extract_sharded, dist=dist)  # noqa: F811
        progress = progress and dist.is_main
    result = extract_to_store(
        image_set,
        backbone,
        cfg.out,
        poolings=cfg.pooling,
        flip=cfg.flip,
        zoom=cfg.zoom,
        batch_size=cfg.batch_size,
        num_workers=cfg.workers,
        precision=cfg.precision,
        channels_last=cfg.channels_last,
        device=cfg.device if dist is None else str(dist.device),  # torchrun on GPUs: cuda:LOCAL_RANK
        overwrite=cfg.overwrite,
        progress=progress,
        runtime=cfg.runtime,
    )
    if dist is not None:
        dist.close()  # an orderly gloo / nccl shutdown: exiting with the group alive can abort a rank
        if not dist.is_main:
            return FolderExtraction(result, "", "")  # rank 0 reports and writes
    resolved = {"precision": result.store.meta["precision"], "runtime": result.store.meta.get("runtime", "torch")}
    save_config(cfg, cfg.out, extra={"resolved": {**resolved, "backbone": backbone.describe()}})
    listed = os.path.join(cfg.out, "skipped.csv")
    if result.skipped and result.n_extracted + result.n_reused == 0:
        raise FinegrainError(f"none of the {result.n_images} images of {cfg.data} could be read (listed in {listed})")
    line = (
        f"{result.n_images} images, {len(image_set.classes)} classes, splits {image_set.splits}: "
        f"{result.n_extracted} extracted ({result.images_per_second:.1f} img/s), {result.n_reused} reused, "
        f"{len(result.skipped)} skipped -> {cfg.out}"
    )
    return FolderExtraction(result, line, listed)
