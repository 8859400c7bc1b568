"""Streaming extraction: images on disk -> pooled features in a FeatureStore, resumable, bounded memory."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from finegrain.backbones import Backbone
from finegrain.data import ImageSet
from finegrain.embed.store import FeatureStore, IndexEntry
from finegrain.models import create_pooling, pooled_dim, stage_maps_needed
from finegrain.models.classifier import pooled_views
from finegrain.runtime import (
    ImageFiles,
    Runtime,
    choose_engine,
    collate_images,
    forward,
    image_loader,
    machine_cache_dir,
)


def file_sha1(path: str) -> str | None:
    try:
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    except OSError:
        return None


class Embedder(torch.nn.Module):
    """Backbone trunk + several poolings at once: one forward, [B, D] per pooling (`dims`: each pooling's D).

    A stage pooling (`stages`) reads the last stages' maps, which come out of that same forward.
    `flip=True` also embeds the mirrored image and averages the two descriptors (test-time augmentation:
    twice the compute, a steadier descriptor for classes told apart by fine detail).
    `zoom=True` (models/zoom.py): the input is decoded at twice the view's side; each pooling gives the full view's
    descriptor and the zoomed region's, concatenated [B, 2D]. A (weights [K, C], bias [K]) pair instead of True:
    the CAM of that linear head's predicted class (on the map's average) places the box, not the class-agnostic map
    (bench/zoom.py measures which).
    """

    def __init__(self, backbone: Backbone, poolings: Sequence[str], *, flip: bool = False, zoom: bool | tuple = False,
                 zoom_head: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:  # fmt: skip
        super().__init__()
        self.backbone = backbone
        self.names = list(poolings)
        self.pools = torch.nn.ModuleList([create_pooling(p) for p in poolings])
        self.stage_maps = max((stage_maps_needed(p) for p in self.pools), default=0)
        if isinstance(zoom, tuple):
            zoom_head = tuple(torch.as_tensor(a).float() for a in zoom)
        self.zoom = bool(zoom or zoom_head is not None)
        width = 2 if self.zoom else 1
        self.dims = {name: pooled_dim(backbone, pool) * width for name, pool in zip(self.names, self.pools)}
        self.flip = flip
        self.zoom_head = zoom_head

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = pooled_views(self.backbone, x, self.pools, flip=self.flip, zoom=self.zoom, zoom_head=self.zoom_head)
        return {name: p.float() for name, p in zip(self.names, pooled)}


@dataclass
class ExtractResult:
    store: FeatureStore
    n_images: int
    n_extracted: int
    n_reused: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.n_extracted / self.seconds if self.seconds > 0 else float("nan")


def extract_to_store(
    image_set: ImageSet,
    backbone: Backbone,
    out_dir: str,
    *,
    poolings: Sequence[str] = ("gap", "gem"),
    flip: bool = False,
    zoom: bool | tuple = False,
    batch_size: int = 32,
    num_workers: int | None = None,
    precision: str = "auto",
    channels_last: bool = True,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    runtime: str = "torch",
) -> ExtractResult:
    """Extract pooled features of every sample of `image_set` into the store at `out_dir`.

    Images already in the store (same file content, backbone, preprocessing, precision, poolings) are reused,
    so an interrupted run resumes where it stopped. Undecodable files are skipped and listed in skipped.csv.
    runtime: torch | onnx | auto (runtime/engine.py; ONNX Runtime computes fp32 features, recorded as fp32).
    zoom: look closer (`Embedder`; the backbone's preprocess decodes at twice the side the trunk runs at)."""
    rt = Runtime(str(device), precision, channels_last, num_workers)
    backbone = backbone.to(rt.torch_device).eval()
    embedder = Embedder(backbone, poolings, flip=flip, zoom=zoom)
    engine = _engine(embedder, runtime, rt, out_dir, overwrite, len(image_set.samples))
    meta = _store_meta(image_set, embedder, engine.runtime.resolved_precision)
    rt, embedder, meta["runtime"] = engine.runtime, engine.module, engine.name
    store = FeatureStore.create_or_resume(out_dir, meta, overwrite=overwrite)
    t0 = time.perf_counter()

    paths = [s.path for s in image_set.samples]
    with ThreadPoolExecutor(max_workers=4) as pool:
        sha1s = list(pool.map(file_sha1, paths))
    done = store.journal()
    skipped: list[tuple[str, str]] = [(p, "file not readable") for p, h in zip(paths, sha1s) if h is None]
    todo: dict[str, str] = {}  # sha1 -> first path with that content
    for p, h in zip(paths, sha1s):
        if h is not None and h not in done and h not in todo:
            todo[h] = p
    todo_items = list(todo.items())
    n_done, bad_sha = _extract_new(embedder, backbone.preprocess, todo_items, store, done, skipped, rt, batch_size,
                                   progress)  # fmt: skip
    seconds = time.perf_counter() - t0

    entries = [
        IndexEntry(s.path, s.label, s.split, done[h], h)
        for s, h in zip(image_set.samples, sha1s)
        if h is not None and h in done
    ]
    # A file whose content duplicates a bad file is bad too; list each bad path once.
    skipped_paths = {p for p, _ in skipped}
    skipped += [
        (s.path, "cannot decode (same content as a skipped file)")
        for s, h in zip(image_set.samples, sha1s)
        if h in bad_sha and s.path not in skipped_paths
    ]
    store.write_index(entries, skipped)
    return ExtractResult(store, len(image_set.samples), n_done, len(entries) - n_done, skipped, seconds)


def _engine(embedder: Embedder, runtime: str, rt: Runtime, out_dir: str, overwrite: bool, n_images: int):
    """The engine to extract with; `auto` resumes a store on the engine that started it (one precision a store)."""
    import json
    import os

    if runtime == "auto" and not overwrite:
        try:
            with open(os.path.join(out_dir, "meta.json"), encoding="utf-8") as f:
                runtime = json.load(f).get("runtime", "torch")
        except (OSError, ValueError):
            pass
    # the pretrained trunk's conversion and race are kept for this machine: later extractions of the same view reuse
    # them (runtime/engine.py machine_cache_dir)
    cache = os.path.join(machine_cache_dir(), "onnx")
    return choose_engine(
        embedder, runtime, preprocess=embedder.backbone.preprocess, runtime=rt, n_images=n_images, cache_dir=cache
    )


def _extract_new(embedder, pre, todo_items, store, done, skipped, rt: Runtime, batch_size: int, progress: bool):
    """Embed [(sha1, path)] into the store, recording rows in `done` and failures in `skipped`;
    returns (images embedded, sha1s of the files that failed)."""
    from tqdm.auto import tqdm

    loader = image_loader(
        ImageFiles([p for _, p in todo_items], pre.pil_to_uint8, min_side=pre.resize_size),
        batch_size=batch_size,
        workers=rt.num_workers,
        pin_memory=rt.torch_device.type == "cuda",
        prefetch_factor=4,
    )
    bad_sha: set[str] = set()
    bar = tqdm(total=len(todo_items), desc="extract", unit="img", disable=not progress, dynamic_ncols=True)
    n_done = 0
    for batch, _, positions, failed in loader:
        for pos, reason in failed:
            skipped.append((todo_items[pos][1], reason))
            bad_sha.add(todo_items[pos][0])
        if batch is not None:
            feats = {k: v.cpu().numpy() for k, v in forward(embedder, batch, pre, rt).features.items()}
            rows = store.append(feats, [todo_items[p][0] for p in positions])
            done.update({todo_items[p][0]: r for p, r in zip(positions, rows)})
            n_done += len(positions)
        bar.update(len(positions) + len(failed))
    bar.close()
    return n_done, bad_sha


def _store_meta(image_set: ImageSet, embedder: Embedder, precision: str) -> dict:
    """dim: the backbone's width (every plain pooling's); dims: each pooling's, recorded where one differs."""
    import json

    backbone, poolings, flip, zoom, dims = (
        embedder.backbone,
        embedder.names,
        embedder.flip,
        embedder.zoom,
        embedder.dims,
    )
    key = {
        "backbone": backbone.name,
        "source": backbone.source,
        "preprocess": backbone.preprocess.to_dict(),
        "precision": precision,
        "poolings": list(poolings),
        **({"flip": True} if flip else {}),  # stores made without flip (or zoom) keep their fingerprint
        **({"zoom": True} if zoom else {}),
    }
    return {
        "fingerprint": hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16],
        "backbone": backbone.describe(),
        "precision": precision,
        "flip": flip,
        **({"zoom": True} if zoom else {}),
        "poolings": list(poolings),
        "dim": backbone.num_features,
        **({"dims": dict(dims)} if any(d != backbone.num_features for d in dims.values()) else {}),
        "classes": list(image_set.classes),
        "data_root": image_set.root,
    }


def embed_images(
    paths: Sequence[str],
    backbone: Backbone,
    *,
    pooling: str = "gap",
    flip: bool = False,
    zoom: bool = False,
    batch_size: int = 32,
    precision: str = "auto",
    device: str | torch.device = "cpu",
    channels_last: bool = True,
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """In-memory features [N, D] of a few images (queries, predictions); returns (features, skipped)."""
    rt = Runtime(str(device), precision, channels_last, workers=0)
    embedder = rt.prepare(Embedder(backbone, [pooling], flip=flip, zoom=zoom))
    pre = backbone.preprocess
    data = ImageFiles(paths, pre.pil_to_uint8, min_side=pre.resize_size)
    feats, skipped = [], []
    for start in range(0, len(data), batch_size):
        batch, _, _, failed = collate_images([data[i] for i in range(start, min(start + batch_size, len(data)))])
        skipped += [(paths[start + i], r) for i, r in failed]
        if batch is not None:
            feats.append(forward(embedder, batch, pre, rt).features[pooling].cpu().numpy())
    return (np.concatenate(feats) if feats else np.zeros((0, embedder.dims[pooling]), np.float32)), skipped


__all__ = ["ExtractResult", "Embedder", "embed_images", "extract_to_store", "file_sha1"]
