"""Mid-level features for far domains (issue 23, item 5): the `stages` pooling against GAP on frozen lite0.

One extraction a data set (`efficientnet_lite0`, the weights' eval view: 224 px, center crop 0.875, fp32 torch)
stores gap, gem, `stages` (the default: the last 3 stages, L2 each, concatenated) and `stages:7` (every stage) in
one forward pass; the design variants (how many stages, with or without the final map = L2(gap)) are slices of
`stages:7` and gap, so they cost no second pass. Each representation is scored three
ways, train only for every choice, top-1 on the test split:
  * raw: scikit-learn LogisticRegression(max_iter=1000), its default C, on the stored vectors;
  * l2-cv3: rows L2-normalized, C in 0.001-100 (half-decades) by 3-fold stratified CV on train
    (LogisticRegressionCV, max_iter=1000);
  * l2-probe: rows L2-normalized, finegrain's probe (create_classifier("probe"): C on its own split of train).
Data: ../shared/data/rsscn7 (aerial, 504/336), flowers17 (816/544) and cifar10 reduced to the
first 100 train images a class and the first 200 test images a class (2,000; the folder is sorted by class, so "the
first 2,000" files would be two classes only). Stores are cached in bench/cache, so a re-run only re-fits.

    python -m bench.stages --datasets rsscn7      # ~2 min on 2 cores, every variant; bench/results/stages.json
    python -m bench.stages --datasets flowers17   # ~1.5 min (6 representations; --variants NAME: all of them)
    python -m bench.stages --datasets cifar10     # ~3 min
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
import warnings

import numpy as np
import torch

from bench.common import ROOT, record, require_dataset
from finegrain.backbones import create_backbone
from finegrain.data import load_image_set
from finegrain.embed import Embedder, extract_to_store
from finegrain.heads import create_classifier
from finegrain.heads.probe import DEFAULT_CS
from finegrain.models import create_pooling, forward_stages, stage_view

BACKBONE = "efficientnet_lite0"
POOLINGS = ("gap", "gem", "stages", "stages:7")
CIFAR_TRAIN, CIFAR_TEST = 100, 200  # images a class
DATASETS = ("rsscn7", "flowers17", "cifar10")
VARIANTS = (2, 3, 4, 7)  # how many of the last stages (lite0 has 7)
CV_CS = (*DEFAULT_CS, 30.0, 100.0)  # L2-normalized rows want a larger C than the probe's standardized ones


def image_set(name: str):
    s = load_image_set(require_dataset(name))
    if name != "cifar10":
        return s
    keep, seen = [], {}
    for smp in sorted(s.samples, key=lambda smp: smp.path):
        cap = CIFAR_TRAIN if smp.split == "train" else CIFAR_TEST
        seen[(smp.split, smp.label)] = n = seen.get((smp.split, smp.label), 0) + 1
        if n <= cap:
            keep.append(smp)
    return dataclasses.replace(s, samples=keep)


def stage_widths(backbone) -> list[int]:
    n = len(stage_view(backbone.model).stages)
    with torch.no_grad():
        _, maps = forward_stages(backbone.model, torch.zeros(1, 3, 64, 64), n)
    return [m.shape[1] for m in maps]


def l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def representations(store, widths: list[int], split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """{name: X [N, D]} for gap, gem, the stored `stages` and the variants sliced from `stages:7`; labels [N]."""
    gap, y, _ = store.split(split, "gap")
    stored, _, _ = store.split(split, "stages")
    every, _, _ = store.split(split, "stages:7")
    ends = np.cumsum([0, *widths])
    blocks = [every[:, a:b] for a, b in zip(ends[:-1], ends[1:])]
    final = l2(gap)  # the final map's block
    out = {"gap": gap, "gem": store.split(split, "gem")[0], "stages": stored}
    for k in VARIANTS:
        out[f"last{k}"] = np.hstack(blocks[-k:])
        out[f"last{k}+final"] = np.hstack([*blocks[-k:], final])
    default = "last3+final" if create_pooling("stages").final else "last3"
    np.testing.assert_allclose(out[default], stored, atol=1e-5)  # the stored pooling is the slice it claims to be
    return out, y


def score(protocol: str, Xtr, ytr, Xte, yte) -> dict:
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    t0 = time.perf_counter()
    extra = {}
    if protocol == "raw":
        clf = LogisticRegression(max_iter=1000).fit(Xtr, ytr)
    elif protocol == "l2-cv3":
        cv = StratifiedKFold(3, shuffle=True, random_state=0)
        Xtr, Xte = l2(Xtr), l2(Xte)
        clf = LogisticRegressionCV(Cs=list(CV_CS), cv=cv, max_iter=1000).fit(Xtr, ytr)
        extra["C"] = float(clf.C_[0])
    else:
        Xtr, Xte = l2(Xtr), l2(Xte)
        clf = create_classifier("probe").fit(Xtr, ytr)
        extra["C"] = float(clf.C_)
    top1 = float(np.mean(clf.predict(Xte) == yte))
    return {"top1": round(top1, 4), **extra, "seconds": round(time.perf_counter() - t0, 1)}


def cost(backbone, reps: int = 5) -> dict:
    """Milliseconds a batch of 16 (224 px, fp32) takes through the extraction module, best of `reps`, interleaved:
    gap alone, and gap + stages (the same pass)."""
    x = torch.randn(16, 3, 224, 224)
    modules = {"gap": Embedder(backbone, ["gap"]).eval(), "gap+stages": Embedder(backbone, ["gap", "stages"]).eval()}
    best = dict.fromkeys(modules, float("inf"))
    for m in modules.values():
        m(x[:2])
    for _ in range(reps):
        for name, m in modules.items():
            t0 = time.perf_counter()
            m(x)
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: {"ms_per_batch16": round(best[name] * 1000, 1), "dims": m.dims} for name, m in modules.items()}


def run(name: str, backbone, widths: list[int], *, variants: bool) -> dict:
    out = os.path.join(ROOT, "bench", "cache", f"stages-{name}-lite0")
    r = extract_to_store(image_set(name), backbone, out, poolings=POOLINGS, precision="fp32", progress=False)
    train, ytr = representations(r.store, widths, "train")
    test, yte = representations(r.store, widths, "test")
    names = list(train) if variants else ["gap", "gem", "stages", "last3+final", "last7", "last7+final"]
    rows = {}
    for rep in names:
        protocols = ("raw", "l2-cv3", "l2-probe") if rep in ("gap", "stages", "last3+final") else ("raw", "l2-cv3")
        rows[rep] = {"dim": int(train[rep].shape[1])}
        for protocol in protocols:
            rows[rep][protocol] = score(protocol, train[rep], ytr, test[rep], yte)
        print(name, rep, rows[rep], flush=True)
    return {
        "n_train": len(ytr),
        "n_test": len(yte),
        "extract_seconds": round(r.seconds, 1),
        "n_extracted": r.n_extracted,
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated, of " + ", ".join(DATASETS))
    ap.add_argument("--variants", default="rsscn7", help="data sets scored on every variant")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # scikit-learn's notices of changing defaults
    backbone = create_backbone(BACKBONE)
    widths = stage_widths(backbone)
    timing = cost(backbone)
    print("cost", timing, flush=True)
    record("stages.json", "cost", {"backbone": BACKBONE, "stage_widths": widths, **timing})
    wanted = set(args.variants.split(","))
    for name in args.datasets.split(","):
        record("stages.json", name, run(name, backbone, widths, variants=name in wanted))


if __name__ == "__main__":
    main()
