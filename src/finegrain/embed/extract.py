"""Streaming extraction: images on disk -> pooled features in a FeatureStore, resumable, bounded memory."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from finegrain.backbones import Backbone, Preprocess
from finegrain.data import ImageDecodeError, ImageSet, load_image
from finegrain.models.pooling import create_pooling
from finegrain.embed.store import FeatureStore, IndexEntry

PRECISIONS = ("auto", "fp32", "bf16")


def file_sha1(path: str) -> str | None:
    try:
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    except OSError:
        return None


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 where the hardware runs it fast (CUDA with bf16, CPUs with AVX-512 or AMX), else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    cap = torch.backends.cpu.get_cpu_capability()
    return "bf16" if cap in ("AVX512", "AMX") or "AVX512" in cap else "fp32"


def default_num_workers() -> int:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # One decoding worker per two cores: on small machines the model's threads need the rest.
    return max(1, min(8, n // 2))


class DecodedImages(Dataset):
    """Samples -> ([3, S, S] uint8, position) or (None, position, reason) for files that fail to decode."""

    def __init__(self, paths: Sequence[str], preprocess: Preprocess) -> None:
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img = load_image(self.paths[i], min_side=self.preprocess.resize_size)
            return self.preprocess.pil_to_uint8(img), i, ""
        except ImageDecodeError as e:
            return None, i, str(e)


def collate_decoded(items):
    good = [(t, i) for t, i, _ in items if t is not None]
    failed = [(i, reason) for t, i, reason in items if t is None]
    batch = torch.stack([t for t, _ in good]) if good else None
    return batch, [i for _, i in good], failed


class Embedder(torch.nn.Module):
    """Backbone trunk + several poolings at once: one forward, [B, D] per pooling.

    `flip=True` also embeds the mirrored image and averages the two descriptors (test-time augmentation:
    twice the compute, a steadier descriptor for classes told apart by fine detail).
    """

    def __init__(self, backbone: Backbone, poolings: Sequence[str], *, flip: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.names = list(poolings)
        self.pools = torch.nn.ModuleList([create_pooling(p) for p in poolings])
        self.flip = flip

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n = x.shape[0]
        fmap = self.backbone.forward_features(torch.cat([x, x.flip(3)]) if self.flip else x)
        out = {name: pool(fmap).float() for name, pool in zip(self.names, self.pools)}
        return {k: (v[:n] + v[n:]) / 2 for k, v in out.items()} if self.flip else out


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


def run_embedder(
    embedder: Embedder,
    batch: torch.Tensor,
    *,
    preprocess: Preprocess,
    device: torch.device,
    precision: str,
    channels_last: bool,
) -> dict[str, np.ndarray]:
    x = preprocess.normalize(batch.to(device, non_blocking=True))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = embedder(x)
    return {k: v.cpu().numpy() for k, v in out.items()}


def extract_to_store(
    image_set: ImageSet,
    backbone: Backbone,
    out_dir: str,
    *,
    poolings: Sequence[str] = ("gap", "gem"),
    flip: bool = False,
    batch_size: int = 32,
    num_workers: int | None = None,
    precision: str = "auto",
    channels_last: bool = True,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> ExtractResult:
    """Extract pooled features of every sample of `image_set` into the store at `out_dir`.

    Images already in the store (same file content, backbone, preprocessing, precision, poolings) are reused,
    so an interrupted run resumes where it stopped. Undecodable files are skipped and listed in skipped.csv.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    precision = resolve_precision(precision, device)
    workers = default_num_workers() if num_workers is None else num_workers
    backbone = backbone.to(device).eval()
    meta = _store_meta(image_set, backbone, poolings, precision, flip)
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

    embedder = Embedder(backbone, poolings, flip=flip).to(device)
    if channels_last:
        embedder = embedder.to(memory_format=torch.channels_last)
    loader = DataLoader(
        DecodedImages([p for _, p in todo_items], backbone.preprocess),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_decoded,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    bad_sha: set[str] = set()
    bar = tqdm(total=len(todo_items), desc="extract", unit="img", disable=not progress, dynamic_ncols=True)
    n_done = 0
    for batch, positions, failed in loader:
        for pos, reason in failed:
            skipped.append((todo_items[pos][1], reason))
            bad_sha.add(todo_items[pos][0])
        if batch is not None:
            feats = run_embedder(
                embedder,
                batch,
                preprocess=backbone.preprocess,
                device=device,
                precision=precision,
                channels_last=channels_last,
            )
            rows = store.append(feats, [todo_items[p][0] for p in positions])
            done.update({todo_items[p][0]: r for p, r in zip(positions, rows)})
            n_done += len(positions)
        bar.update(len(positions) + len(failed))
    bar.close()
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


def _store_meta(image_set: ImageSet, backbone: Backbone, poolings: Sequence[str], precision: str, flip: bool) -> dict:
    import json

    key = {
        "backbone": backbone.name,
        "source": backbone.source,
        "preprocess": backbone.preprocess.to_dict(),
        "precision": precision,
        "poolings": list(poolings),
        **({"flip": True} if flip else {}),  # stores made without flip keep their fingerprint
    }
    return {
        "fingerprint": hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16],
        "backbone": backbone.describe(),
        "precision": precision,
        "flip": flip,
        "poolings": list(poolings),
        "dim": backbone.num_features,
        "classes": list(image_set.classes),
        "data_root": image_set.root,
    }


def embed_images(
    paths: Sequence[str],
    backbone: Backbone,
    *,
    pooling: str = "gap",
    flip: bool = False,
    batch_size: int = 32,
    precision: str = "auto",
    device: str | torch.device = "cpu",
    channels_last: bool = True,
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """In-memory features [N, D] of a few images (queries, predictions); returns (features, skipped)."""
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    embedder = Embedder(backbone.to(device).eval(), [pooling], flip=flip).to(device)
    if channels_last:
        embedder = embedder.to(memory_format=torch.channels_last)
    data = DecodedImages(paths, backbone.preprocess)
    feats, skipped = [], []
    for start in range(0, len(data), batch_size):
        batch, _, failed = collate_decoded([data[i] for i in range(start, min(start + batch_size, len(data)))])
        skipped += [(paths[start + i], r) for i, r in failed]
        if batch is not None:
            feats.append(
                run_embedder(
                    embedder,
                    batch,
                    preprocess=backbone.preprocess,
                    device=device,
                    precision=precision,
                    channels_last=channels_last,
                )[pooling]
            )
    return (np.concatenate(feats) if feats else np.zeros((0, backbone.num_features), np.float32)), skipped


__all__ = ["ExtractResult", "Embedder", "embed_images", "extract_to_store", "file_sha1", "resolve_precision"]
