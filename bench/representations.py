"""Accuracy of classifiers on frozen representations of cub100 (issue: representations, measurement 1).

Two extractions with `efficientnet_lite0`, each evaluated over
{1-NN, 10-NN, NCM, probe} x {raw, L2, CL2N, PCA-whiten-256 + L2} x {GAP, GeM}:
  * "timm-eval": the weights' own eval preprocessing (224, center crop 0.875), as in the hand-made anchors;
  * "finegrain": the recommended extraction: 256 px, full frame (crop 1.0), the mirrored image averaged in
    (`finegrain extract DATA --image-size 256 --crop-pct 1.0 --flip`).
Beside them, the hand-made baseline measured in the same run: scikit-learn LogisticRegression() with its
default C on raw GAP features of the timm-eval extraction. Train = cub100/train, test = cub100/test;
every choice (C of the probe, normalizer statistics) is made on train only.

Probe cells run over 3 seeds of the probe's C-selection split (mean ± std, per-seed values in the JSON); k-NN and
NCM are deterministic. Features are bf16 where the CPU runs bf16 natively; `--precision fp32` measures the table on
fp32 features (ONNX Runtime), what a CPU without native bf16 computes.

    python -m bench.representations            # about 15 minutes on 2 cores; stores are cached in bench/cache
    python -m bench.representations --precision fp32
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from bench.common import ROOT, record, require_dataset
from finegrain.backbones import create_backbone
from finegrain.data import load_image_set
from finegrain.embed import extract_to_store
from finegrain.evaluate.metrics import classification_metrics
from finegrain.evaluate.representations import fit_and_score, train_test_from_store
from finegrain.heads import create_classifier

CLASSIFIERS = {
    "1-NN": ("knn", {"n_neighbors": 1}),
    "10-NN": ("knn", {"n_neighbors": 10}),
    "NCM": ("ncm", {}),
    "probe": ("probe", {}),
}
NORMS = {"raw": "none", "L2": "l2", "CL2N": "cl2n", "PCA-whiten+L2": "pca-whiten:256"}
EXTRACTIONS = {
    "timm-eval": {"image_size": None, "crop_pct": None, "flip": False},
    "finegrain": {"image_size": 256, "crop_pct": 1.0, "flip": True},
}


def extract(
    name: str, data: str, image_size: int | None, crop_pct: float | None, flip: bool, precision: str = "auto"
) -> tuple[object, float]:
    """precision auto: bf16 where the CPU runs it natively (eager torch); fp32: ONNX Runtime, which computes fp32."""
    from finegrain.backbones import Preprocess

    backbone = create_backbone("efficientnet_lite0")
    pp = backbone.preprocess.to_dict()
    backbone.preprocess = Preprocess.from_dict(
        {**pp, "input_size": image_size or pp["input_size"], "crop_pct": crop_pct or pp["crop_pct"]}
    )
    suffix, runtime = ("-fp32", "onnx") if precision == "fp32" else ("", "torch")
    out = os.path.join(ROOT, "bench", "cache", f"cub100-lite0-{name}{suffix}")
    r = extract_to_store(
        load_image_set(data),
        backbone,
        out,
        poolings=("gap", "gem"),
        flip=flip,
        progress=True,
        precision=precision,
        runtime=runtime,
    )
    return r.store, r.seconds


def table(store, seeds: int = 3) -> dict:
    """Every cell; a probe cell over `seeds` seeds of its C-selection split (mean, std, per-seed values). k-NN and NCM
    have no random choice: one run each."""
    rows = {}
    for pooling in ("gap", "gem"):
        train, test, _ = train_test_from_store(store, pooling=pooling)
        for cname, (kind, kw) in CLASSIFIERS.items():
            for nname, norm in NORMS.items():
                if kind == "probe":
                    rows[f"{pooling}/{cname}/{nname}"] = _probe_cell(store, train, test, norm, seeds)
                    print(f"{pooling}/{cname}/{nname}", rows[f"{pooling}/{cname}/{nname}"], flush=True)
                    continue
                t0 = time.perf_counter()
                # "raw" means raw: k-NN and NCM then compare by Euclidean distance; on normalized features, cosine
                metric = {"metric": "l2" if nname == "raw" else "cosine"} if kind in ("knn", "ncm") else {}
                if kind == "knn" and nname == "raw":
                    metric["weights"] = "distance"  # exp(-d^2 / T) is a hard 1-NN at Euclidean scale
                clf = create_classifier(kind, **kw, **metric)
                m, _, _ = fit_and_score(clf, train, test, normalizer=norm, classes=store.classes)
                key = f"{pooling}/{cname}/{nname}"
                rows[key] = {
                    "top1": round(m["top1"], 4),
                    "mean_per_class": round(m["mean_per_class"], 4),
                    "seconds": round(time.perf_counter() - t0, 1),
                }
                if hasattr(clf, "C_"):
                    rows[key]["C"] = clf.C_
                print(key, rows[key], flush=True)
    return rows


def _probe_cell(store, train, test, norm: str, seeds: int) -> dict:
    t0, runs = time.perf_counter(), []
    for seed in range(seeds):
        clf = create_classifier("probe", random_state=seed)
        m, _, _ = fit_and_score(clf, train, test, normalizer=norm, classes=store.classes)
        runs.append({"top1": round(m["top1"], 4), "mean_per_class": round(m["mean_per_class"], 4), "C": clf.C_})
    top1 = np.array([r["top1"] for r in runs])
    return {
        "top1": round(float(top1.mean()), 4),
        "top1_std": round(float(top1.std(ddof=1)) if seeds > 1 else 0.0, 4),
        "mean_per_class": round(float(np.mean([r["mean_per_class"] for r in runs])), 4),
        "seeds": seeds,
        "per_seed": runs,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def hand_baseline(store) -> dict:
    from sklearn.linear_model import LogisticRegression

    train, test, _ = train_test_from_store(store, pooling="gap")
    clf = LogisticRegression(max_iter=2000).fit(train.X, train.y)
    scores = np.zeros((len(test.y), len(store.classes)))
    scores[:, clf.classes_] = clf.predict_proba(test.X)
    m = classification_metrics(scores, test.y)
    return {"top1": round(m["top1"], 4), "mean_per_class": round(m["mean_per_class"], 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(EXTRACTIONS), help="run one extraction's table only")
    ap.add_argument("--precision", choices=("auto", "fp32"), default="auto", help="fp32: what a CPU without bf16 gets")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of each probe's C-selection split")
    args = ap.parse_args()
    data = require_dataset("cub100")
    result = {}
    for name, opts in EXTRACTIONS.items():
        if args.only and name != args.only:
            continue
        store, seconds = extract(name, data, **opts, precision=args.precision)
        name = f"{name}-fp32" if args.precision == "fp32" else name
        meta = {
            "seconds": round(seconds, 1),
            "precision": store.meta["precision"],
            "runtime": store.meta.get("runtime"),
        }
        result[name] = {"extraction": {**opts, **meta}, "table": table(store, args.seeds)}
        if name.startswith("timm-eval"):
            result["hand_baseline_logreg_raw_gap"] = hand_baseline(store)
            print("hand baseline", result["hand_baseline_logreg_raw_gap"])
    best = max(
        ((n, k, v["top1"]) for n, r in result.items() if "table" in r for k, v in r["table"].items()),
        key=lambda t: t[2],
    )
    result["best"] = {"extraction": best[0], "config": best[1], "top1": best[2]}
    print("best", result["best"])
    for name, r in result.items():
        if "table" in r:
            record("representations.json", f"accuracy/{name}", r)
    key = "accuracy/summary-fp32" if args.precision == "fp32" else "accuracy/summary"
    record("representations.json", key, {k: v for k, v in result.items() if "table" not in v})


if __name__ == "__main__":
    main()
