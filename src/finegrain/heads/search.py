"""Image similarity search: embed query images with the store's own backbone, find the nearest stored images."""

from __future__ import annotations

import numpy as np

from finegrain.embed import FeatureStore, create_normalizer, embed_images
from finegrain.errors import FinegrainError
from finegrain.heads.index import FaissIndex, build_index, dense_fits
from finegrain.models import ModelSpec, build_backbone


def backbone_from_meta(meta: dict):
    """Rebuild the backbone a store was made with (its recorded weights source), with the exact preprocessing."""

    return build_backbone(ModelSpec.from_backbone_info(meta["backbone"]), pretrained=True)


def search_store(
    store_dir: str,
    queries: list[str],
    *,
    k: int = 10,
    pooling: str | None = None,
    norm: str = "l2",
) -> dict[str, list[tuple[float, str, str]]]:
    """For each query image: [(similarity, path, class name)] of its k nearest stored images, best first."""

    if k < 1:
        raise FinegrainError("-k must be at least 1")
    store = FeatureStore.open(store_dir)
    pooling = pooling or store.poolings[0]
    entries = store.index()
    if dense_fits(len(entries), store.dim_of(pooling)):
        gallery = np.asarray(store.features(pooling)[np.array([e.row for e in entries])])
        normalizer = create_normalizer(norm).fit(gallery)
        index = build_index(normalizer.transform(gallery), metric="cosine")
    else:  # larger than memory: IVF-PQ over the memory map, hits are store rows
        normalizer, index = (
            create_normalizer("none").fit(np.zeros((1, store.dim_of(pooling)), np.float32)),
            disk_index(store, pooling, norm),
        )
        by_row = {e.row: e for e in entries}
        entries = [by_row.get(r) for r in range(store.num_rows())]
    feats, skipped = embed_images(
        queries,
        backbone_from_meta(store.meta),
        pooling=pooling,
        flip=bool(store.meta.get("flip")),
        zoom=bool(store.meta.get("zoom")),
        precision=store.meta.get("precision", "auto"),
    )
    if skipped:
        for path, reason in skipped:
            print(f"skipped query {path}: {reason}")
        if len(skipped) == len(queries):
            raise FinegrainError("no query image could be decoded")
    good = [q for q in queries if q not in {p for p, _ in skipped}]
    scores, idx = index.search(normalizer.transform(feats), min(k, len(entries)))
    classes = store.classes
    return {
        q: [(float(s), entries[i].path, classes[entries[i].label]) for s, i in zip(srow, irow) if i >= 0 and entries[i]]
        for q, srow, irow in zip(good, scores, idx)
    }


def disk_index(store: FeatureStore, pooling: str, norm: str) -> FaissIndex:
    """IVF-PQ over all rows of the store's memory map (cosine; re-ranked from the map), built once and kept in the
    store as index-ivfpq-<pooling>.faiss while the store's rows do not change."""
    import os

    if norm not in ("l2", "none"):
        raise FinegrainError(f"a store larger than memory is searched by cosine (--norm l2), not --norm {norm}")
    feats = store.features(pooling)
    path = os.path.join(store.root, f"index-ivfpq-{pooling}.faiss")
    if os.path.exists(path):
        index = FaissIndex.load(path, metric="cosine", kind="ivfpq", source=feats)
        if index.ntotal == len(feats):
            return index
    index = FaissIndex("cosine", kind="ivfpq").add(feats)
    index.save(path)
    return index
