"""Sharded extraction: every rank of a torchrun job extracts its share, rank 0 merges the shards into one store.

`torchrun --nproc_per_node=N -m finegrain extract DATA --out STORE` (several nodes too, STORE on a shared disk):
rank r takes the r-th contiguous slice of the image list (deterministic: same list, same world size, same slice) and
extracts it into `STORE/shards/RRRRR-of-WWWWW/`, itself a resumable store. After a barrier, rank 0 appends the
shards' rows, in shard order and without duplicate contents, to `STORE` and deletes the shards. The merged store
holds the same rows, in the same order, as one process would have written. Killed, the same command resumes: each
shard keeps its journal, the main store keeps its own, and images already merged are not extracted again.

The distributed context is passed in (`finegrain.train.distributed.DistContext` or anything with rank, world_size,
barrier and all_reduce_sum), so this module needs no process group of its own.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np
import torch

from finegrain.atomic import atomic_write_text
from finegrain.data import ImageSet
from finegrain.embed.extract import ExtractResult, extract_to_store, file_sha1
from finegrain.embed.store import FeatureStore, IndexEntry, _csv_line
from finegrain.errors import FinegrainError

SHARDS_DIR = "shards"
_MERGE_BLOCK = 4096  # shard rows copied at a time: 4096 x 1280 x 4 B = 20 MiB per pooling


class Dist(Protocol):
    rank: int
    world_size: int

    def barrier(self) -> None: ...

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor: ...


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of n items; shares differ in size by at most one."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size); got rank={rank}, world_size={world_size}")
    return n * rank // world_size, n * (rank + 1) // world_size


def shard_dir(out_dir: str, rank: int, world_size: int) -> str:
    return os.path.join(out_dir, SHARDS_DIR, f"{rank:05d}-of-{world_size:05d}")


def extract_sharded(image_set: ImageSet, backbone, out_dir: str, *, dist: Dist, progress: bool = True, **kwargs):
    """Extract this rank's share of `image_set` into its shard, then (rank 0) merge every shard into `out_dir`.

    kwargs go to `extract_to_store` (poolings, flip, batch_size, precision, device, overwrite, runtime, ...);
    runtime "auto" extracts with torch (a race per rank could pick different engines, and a store has one).
    Every rank returns an ExtractResult of the merged store with counts summed over the ranks.
    """
    t0 = time.perf_counter()
    rank, world = dist.rank, dist.world_size
    if kwargs.get("runtime") == "auto":  # each rank's measured race could pick another engine: one engine a store
        kwargs = {**kwargs, "runtime": "torch"}
    start, stop = shard_bounds(len(image_set.samples), rank, world)
    mine = image_set.samples[start:stop]
    error, counts = "", [0, 0]
    try:
        if kwargs.get("overwrite") and rank == 0:
            shutil.rmtree(os.path.join(out_dir, SHARDS_DIR), ignore_errors=True)
        dist.barrier()  # nobody writes a shard while rank 0 may still be deleting the old ones
        result = _extract_shard(image_set, mine, backbone, shard_dir(out_dir, rank, world), progress, kwargs)
        counts = [result.n_extracted, result.n_reused]
    except (FinegrainError, OSError) as e:
        error = f"rank {rank} ({shard_dir(out_dir, rank, world)}): {e}"
    failed = dist.all_reduce_sum(torch.tensor([float(bool(error))]))  # also the barrier before the merge
    if error:
        raise FinegrainError(error)
    if failed.item() > 0:
        raise FinegrainError("another rank failed (its error is on its own stderr); re-run the same command to resume")
    totals = dist.all_reduce_sum(torch.tensor(counts, dtype=torch.float64)).tolist()
    if rank == 0:
        merge_shards(out_dir, image_set, world_size=world, overwrite=bool(kwargs.get("overwrite")))
    dist.barrier()
    store = FeatureStore.open(out_dir)
    skipped = _read_skipped(os.path.join(out_dir, "skipped.csv"))
    n_new = int(totals[0])
    seconds = time.perf_counter() - t0
    return ExtractResult(store, len(image_set.samples), n_new, len(store.index()) - n_new, skipped, seconds)


def _extract_shard(image_set: ImageSet, mine, backbone, out: str, progress: bool, kwargs: dict) -> ExtractResult:
    """Hash this rank's images, record (path, sha1) in the shard, extract those the main store lacks."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        sha1s = list(pool.map(file_sha1, [s.path for s in mine]))
    merged = _main_journal(os.path.dirname(os.path.dirname(out)), kwargs.get("overwrite", False))
    todo = [s for s, h in zip(mine, sha1s) if h is None or h not in merged]
    os.makedirs(out, exist_ok=True)
    lines = ["path,sha1"] + [_csv_line([s.path, h or ""]) for s, h in zip(mine, sha1s)]
    atomic_write_text(os.path.join(out, "hashes.csv"), "\n".join(lines) + "\n")
    part = dataclasses.replace(image_set, samples=todo)
    try:
        return extract_to_store(part, backbone, out, progress=progress, **kwargs)
    except FinegrainError as e:
        raise FinegrainError(f"{e} (this shard only: delete {out} and re-run the same command)") from None


def _main_journal(out_dir: str, overwrite: bool) -> dict[str, int]:
    """sha1 -> row of the images already merged into the main store (none when it is new or being replaced)."""
    if overwrite or not os.path.exists(os.path.join(out_dir, "meta.json")):
        return {}
    return FeatureStore(out_dir, {"dim": 1, "poolings": []}).journal()


def merge_shards(out_dir: str, image_set: ImageSet, *, world_size: int, overwrite: bool = False) -> FeatureStore:
    """Append the rows of every shard of `out_dir` to the main store there, write its index, delete the shards.

    Raises a one-line FinegrainError naming the shard when one is missing, unfinished, of another backbone or
    preprocessing, or shorter than its journal.
    """
    shards = [_open_shard(shard_dir(out_dir, r, world_size)) for r in range(world_size)]
    meta = dict(shards[0][0].meta)
    for shard, _ in shards[1:]:
        if shard.meta.get("fingerprint") != meta.get("fingerprint"):
            raise FinegrainError(f"shard {shard.root} holds features of another backbone or preprocessing")
    meta.pop("format_version", None)
    main = FeatureStore.create_or_resume(out_dir, meta, overwrite=overwrite)
    done = main.journal()
    for shard, _ in shards:
        _append_shard(main, shard, done)
    sha_of: dict[str, str] = {}
    for _, hashes in shards:
        sha_of.update(hashes)
    skipped = [item for shard, _ in shards for item in _read_skipped(os.path.join(shard.root, "skipped.csv"))]
    bad = {p for p, _ in skipped}
    entries = [
        IndexEntry(s.path, s.label, s.split, done[sha_of[s.path]], sha_of[s.path])
        for s in image_set.samples
        if s.path not in bad and sha_of.get(s.path) in done
    ]
    main.write_index(entries, skipped)
    shutil.rmtree(os.path.join(out_dir, SHARDS_DIR), ignore_errors=True)
    return main


def _open_shard(root: str) -> tuple[FeatureStore, dict[str, str]]:
    """A finished shard, checked: (its store, path -> sha1 of each of its images)."""
    hint = f"delete {root} and re-run the same command to extract that shard again"
    try:
        shard = FeatureStore.open(root)
        hashes = {r["path"]: r["sha1"] for r in _read_csv(os.path.join(root, "hashes.csv")) if r["sha1"]}
        n = len(shard.journal())
        for pool in shard.poolings:
            size = os.path.getsize(shard._feature_path(pool))
            if size != n * shard.dim_of(pool) * 4:
                raise FinegrainError(
                    f"features-{pool}.f32 holds {size} bytes, its journal {n} rows of {shard.dim_of(pool)}"
                )
    except FinegrainError as e:
        raise FinegrainError(f"shard {root} is damaged or unfinished ({_first_line(e)}); {hint}") from None
    except (OSError, KeyError, ValueError) as e:
        raise FinegrainError(f"shard {root} is damaged or unfinished ({type(e).__name__}: {e}); {hint}") from None
    return shard, hashes


def _append_shard(main: FeatureStore, shard: FeatureStore, done: dict[str, int]) -> None:
    """Append shard rows whose content the main store lacks, block by block (bounded memory), updating `done`."""
    by_row = sorted((row, sha) for sha, row in shard.journal().items())
    feats = {pool: shard.features(pool) for pool in main.poolings}
    for start in range(0, len(by_row), _MERGE_BLOCK):
        block = [(row, sha) for row, sha in by_row[start : start + _MERGE_BLOCK] if sha not in done]
        if not block:
            continue
        rows = np.array([r for r, _ in block])
        new = main.append({p: np.asarray(f[rows]) for p, f in feats.items()}, [sha for _, sha in block])
        done.update({sha: r for (_, sha), r in zip(block, new)})


def _read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _read_skipped(path: str) -> list[tuple[str, str]]:
    if not os.path.exists(path):
        return []
    return [(r["path"], r["reason"]) for r in _read_csv(path)]


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


__all__: Sequence[str] = ["extract_sharded", "merge_shards", "shard_bounds", "shard_dir"]
