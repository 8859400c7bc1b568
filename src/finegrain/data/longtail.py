"""Long-tailed training sets: exponential count profiles (Cao et al. 2019) and many/medium/few-shot groups.

`make_longtailed` turns a balanced list of samples into a long-tailed one the way CIFAR-10/100-LT are built;
`shot_groups` splits classes by training count as Kang et al. (ICLR 2020) report them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from finegrain.data.folders import Sample

ORDERS = ("index", "random")
GROUPS = ("many", "medium", "few")


def exponential_profile(n_max: int, n_classes: int, imbalance_ratio: float) -> list[int]:
    """Images per class [C]: n_c = ⌊n_max · ρ^(-c / (C - 1))⌋, from n_max down to ⌊n_max / ρ⌋.

    Same arithmetic as the LDAM-DRW reference (CIFAR-10, n_max 5000, ρ = 100: 5000 ... 50, 12,406 images).
    """
    if n_max < 1 or n_classes < 1:
        raise ValueError(f"n_max and n_classes must be >= 1, got {n_max}, {n_classes}")
    if imbalance_ratio < 1:
        raise ValueError(f"imbalance_ratio must be >= 1, got {imbalance_ratio}")
    if n_classes == 1:
        return [int(n_max)]
    factor = 1.0 / imbalance_ratio
    return [int(n_max * factor ** (c / (n_classes - 1.0))) for c in range(n_classes)]


def make_longtailed(
    samples: list[Sample],
    *,
    imbalance_ratio: float,
    seed: int,
    n_max: int | None = None,
    order: str = "index",
) -> list[Sample]:
    """Keep an exponential profile of each class's samples; the kept samples in their input order.

    Classes are 0..max label. `order="index"`: class c gets the c-th count of `exponential_profile`;
    `order="random"`: a seeded permutation decides which class gets which count. `n_max` defaults to the size of
    the largest class. Which images a class keeps is a seeded choice (same seed, same subset). A class with fewer
    images than its count keeps all of them, so the result can be less imbalanced than asked:
    check it with `describe_counts`.
    """
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; valid orders: {', '.join(ORDERS)}")
    if not samples:
        raise ValueError("make_longtailed needs at least one sample")
    labels = np.array([s.label for s in samples])
    n_classes = int(labels.max()) + 1
    by_class = [np.flatnonzero(labels == c) for c in range(n_classes)]
    n_max = max(len(idx) for idx in by_class) if n_max is None else n_max
    profile = exponential_profile(n_max, n_classes, imbalance_ratio)
    # The class order has a generator of its own, so order="index" keeps the same images whatever `order` does.
    rank = np.arange(n_classes) if order == "index" else np.random.default_rng((seed, 1)).permutation(n_classes)
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(samples), dtype=bool)
    for c, idx in enumerate(by_class):
        keep[rng.permutation(idx)[: profile[rank[c]]]] = True
    return [s for s, k in zip(samples, keep) if k]


def shot_groups(train_counts: Sequence[int], *, many: int = 100, few: int = 20) -> np.ndarray:
    """Training images per class [C] -> group per class [C]: "many" (n > many), "few" (n < few), else "medium"."""
    if few > many:
        raise ValueError(f"few ({few}) must not exceed many ({many})")
    counts = np.asarray(train_counts)
    if counts.ndim != 1:
        raise ValueError(f"train_counts must be 1-D, got shape {counts.shape}")
    return np.where(counts > many, "many", np.where(counts < few, "few", "medium"))


def describe_counts(counts: Sequence[int], *, many: int = 100, few: int = 20) -> dict:
    """Summary of a class-count profile [C]: classes, total, max, min and ρ = max / min (2 decimals) over classes
    with at least one image, classes per shot group, and `empty` (classes without images, also counted as few)."""
    counts = np.asarray(counts, dtype=np.int64)
    present = counts[counts > 0]
    groups = shot_groups(counts, many=many, few=few)
    out = {
        "classes": int(len(counts)),
        "total": int(counts.sum()),
        "max": int(present.max()) if len(present) else 0,
        "min": int(present.min()) if len(present) else 0,
        "imbalance_ratio": round(float(present.max() / present.min()), 2) if len(present) else float("nan"),
    }
    out.update({g: int((groups == g).sum()) for g in GROUPS})
    out["empty"] = int((counts == 0).sum())
    return out
