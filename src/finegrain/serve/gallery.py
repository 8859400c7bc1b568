"""The training images behind a k-NN model's gallery.

A k-NN model saves its gallery as normalized training embeddings and labels, not file paths. The paths live in the
feature store the model was fitted from (`finegrain knn STORE` writes STORE/eval/<name>/model; `fit` keeps its
stores beside model/). `find_gallery_paths` looks for such a store near the model folder and accepts it only when
every gallery row is, after the model's own normalizer, one of the store's rows: then each neighbour gets its image.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from finegrain.embed import FeatureStore
from finegrain.errors import FinegrainError

MATCH_TOLERANCE = 1e-3  # squared distance, relative to the gallery row's squared norm


def _candidate_stores(model_dir: str, levels: int = 3) -> list[str]:
    """Folders with a finished feature store: the model folder, `levels` ancestors, and their direct subfolders."""
    out, here = [], os.path.abspath(model_dir)
    for _ in range(levels + 1):
        subdirs = sorted(os.path.join(here, d) for d in os.listdir(here)) if os.path.isdir(here) else []
        for folder in [here, *subdirs]:
            if folder not in out and all(os.path.isfile(os.path.join(folder, f)) for f in ("meta.json", "index.csv")):
                out.append(folder)
        here = os.path.dirname(here)
    return out


@torch.no_grad()
def _match_rows(model, store: FeatureStore, pooling: str) -> np.ndarray | None:
    """Store row of each gallery row, or None when some gallery row is in no row of this store."""
    gallery = model.head.gallery.float()
    feats = torch.from_numpy(np.array(store.features(pooling), dtype=np.float32))
    if feats.shape[1] != model.pool_dim or len(feats) == 0:
        return None
    normed = torch.cat([model.norm(feats[i : i + 4096]).float() for i in range(0, len(feats), 4096)])
    if normed.shape[1] != gallery.shape[1]:
        return None
    rows, gap = [], []
    for i in range(0, len(gallery), 1024):
        g = gallery[i : i + 1024]
        d = (g * g).sum(1, keepdim=True) + (normed * normed).sum(1)[None] - 2 * g @ normed.T
        best = d.min(1)
        rows.append(best.indices)
        gap.append(best.values / (g * g).sum(1).clamp(min=1e-12))
    return torch.cat(rows).numpy() if float(torch.cat(gap).max()) <= MATCH_TOLERANCE else None


def find_gallery_paths(model_dir: str, model, backbone: str, pooling: str) -> tuple[list[str] | None, str]:
    """(image path of each gallery row, how they were found) — (None, why not) when no nearby store holds them."""
    for root in _candidate_stores(model_dir):
        try:
            store = FeatureStore.open(root)
            if store.meta.get("backbone", {}).get("name") != backbone or pooling not in store.poolings:
                continue
            rows = _match_rows(model, store, pooling)
        except (FinegrainError, OSError, ValueError, KeyError, RuntimeError):
            continue  # an unfinished or foreign folder: try the next one
        if rows is not None:
            path_of_row = {e.row: e.path for e in store.index()}
            if all(int(r) in path_of_row for r in rows):
                return [path_of_row[int(r)] for r in rows], f"training images from the feature store {root}"
    return None, (
        "the model's gallery holds training embeddings and labels but not their files, and no feature store near "
        "the model folder holds them: neighbours are shown by class and similarity only"
    )
