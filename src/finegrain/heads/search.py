"""Image similarity search: embed query images with the store's own backbone, find the nearest stored images."""

from __future__ import annotations

import numpy as np

from finegrain.embed import FeatureStore, create_normalizer, embed_images
from finegrain.errors import FinegrainError
from finegrain.heads.index import build_index
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
    gallery = np.asarray(store.features(pooling)[np.array([e.row for e in entries])])
    normalizer = create_normalizer(norm).fit(gallery)
    index = build_index(normalizer.transform(gallery), metric="cosine")
    feats, skipped = embed_images(
        queries,
        backbone_from_meta(store.meta),
        pooling=pooling,
        flip=bool(store.meta.get("flip")),
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
        q: [(float(s), entries[i].path, classes[entries[i].label]) for s, i in zip(srow, irow)]
        for q, srow, irow in zip(good, scores, idx)
    }
