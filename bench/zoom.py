"""Look closer (issue 25): does a second pass on the attention box, at the same resolution, add to the full view? Per
data set and frozen backbone: one extraction of the zoom view (models/zoom.py: decoded at twice the view's side, the
full view is the first pass, the zoom the second; GeM pooling, full frame, flip-averaged: fit's best frozen view, 256
px for lite0, 260 px for lite2; fp32). From the same pass: the full view alone, the zoom alone, the two concatenated
(each half L2-normalized) and the two probes' probabilities averaged, each with finegrain's probe (L2 features,
`LogisticProbe`, C chosen on its own validation carve). Seeds: 0 is the data set's own split, 1 and 2 stratified re-
draws of train/test with the same sizes. Gains are paired (the same split), mean and std over the seeds.

Inference cost: images a second of the zoom view over the plain view (the same backbone, side, flip and engine:
torch), from image files, over the same images, measured side by side in one run.

The class-conditional map (`--cam`, lite0 on cub100, seed 0): the box placed by the CAM of the class an out-of-fold
probe predicts (5 folds of the training images; the test images use the probe on all of them), against the
class-agnostic map on the same split.

    python -m bench.zoom                       # cub100 and flowers17, lite0 and lite2, 3 seeds, the cost ratio
    python -m bench.zoom --datasets flowers17 --backbones efficientnet_lite0 --no-cam
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

from bench.common import ROOT, record, require_dataset

CACHE = os.path.join(ROOT, "bench", "cache", "zoom")
BACKBONES = {"efficientnet_lite0": 256, "efficientnet_lite2": 260}
SEEDS = (0, 1, 2)
POOLING = "gem"
PRECISION = "fp32"  # as fit's stores (ONNX Runtime computes fp32): bf16 features scored 1.2 points lower here
REPS = ("full", "zoom", "full+zoom concat", "full+zoom proba")


def _backbone(name: str, size: int, zoom: bool):
    from finegrain.backbones import create_backbone
    from finegrain.models.zoom import ZOOM_FACTOR

    backbone = create_backbone(name)
    backbone.preprocess = backbone.preprocess.with_geometry(size * (ZOOM_FACTOR if zoom else 1), 1.0)
    return backbone


def extract(dataset: str, name: str, size: int, *, subset=None, head=None, tag: str = "", pooling: str = POOLING):
    """(X [N, 2D] full | zoom, y [N], splits [N], paths) of the zoom view of a data set (cached in bench/cache/zoom);
    `head`: (weights, bias) of a linear head on the full view's GAP whose predicted class's CAM places the box."""
    from finegrain.data import ImageSet, load_image_set
    from finegrain.embed import extract_to_store

    images = load_image_set(require_dataset(dataset))
    if subset is not None:
        images = ImageSet(images.root, images.classes, [s for s in images.samples if s.path in subset])
    out = os.path.join(CACHE, f"{dataset}-{name}-{size}-{PRECISION}{tag}")
    store = extract_to_store(images, _backbone(name, size, zoom=True), out, poolings=("gap", "gem"), flip=True,
                             zoom=True if head is None else head, runtime="torch", precision=PRECISION,
                             progress=False).store  # fmt: skip
    rows = [(e.path, e.label, e.split, e.row) for e in store.index()]
    feats = store.features(pooling)
    return (np.asarray(feats[[r[3] for r in rows]], np.float32), np.array([r[1] for r in rows]),
            np.array([r[2] for r in rows]), [r[0] for r in rows])  # fmt: skip


def representations(X: np.ndarray) -> dict[str, np.ndarray]:
    from sklearn.preprocessing import normalize

    d = X.shape[1] // 2
    full, zoom = normalize(X[:, :d]), normalize(X[:, d:])
    return {"full": full, "zoom": zoom, "full+zoom concat": np.hstack([full, zoom]) / np.sqrt(2)}


def split(y: np.ndarray, splits: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows): the data set's own split for seed 0, a stratified re-draw of the same sizes else."""
    if seed == 0:
        return np.flatnonzero(splits != "test"), np.flatnonzero(splits == "test")
    rows = np.arange(len(y))
    return tuple(train_test_split(rows, test_size=int((splits == "test").sum()), stratify=y, random_state=seed))


def score(X: np.ndarray, y: np.ndarray, tr: np.ndarray, te: np.ndarray) -> dict[str, float]:
    """Test top-1 of each representation's probe (and of the two single views' probabilities averaged)."""
    from finegrain.heads import LogisticProbe

    reps, out, proba = representations(X), {}, {}
    for rep, Z in reps.items():
        clf = LogisticProbe().fit(Z[tr], y[tr])
        proba[rep] = clf.predict_proba(Z[te])
        out[rep] = float((clf.classes_[proba[rep].argmax(1)] == y[te]).mean())
    avg = (proba["full"] + proba["zoom"]) / 2
    out["full+zoom proba"] = float((clf.classes_[avg.argmax(1)] == y[te]).mean())
    return out


def inference_ratio(dataset: str, name: str, size: int, n: int = 192) -> dict:
    """Images a second of the plain view and of the zoom view, over the same n images from files (torch engine)."""
    import tempfile

    from finegrain.data import ImageSet, load_image_set
    from finegrain.embed import extract_to_store

    images = load_image_set(require_dataset(dataset))
    images = ImageSet(images.root, images.classes, images.samples[:: max(1, len(images.samples) // n)][:n])
    pace = {}
    for _ in range(2):  # twice, alternating, the better of each (the machine drifts)
        for zoom in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                extract_to_store(images, _backbone(name, size, zoom), tmp, poolings=(POOLING,), flip=True, zoom=zoom,
                                 runtime="torch", precision=PRECISION, progress=False)  # fmt: skip
                ips = len(images.samples) / (time.perf_counter() - t0)
            key = "zoom" if zoom else "plain"
            pace[key] = max(pace.get(key, 0.0), ips)
    return {"plain_images_per_s": pace["plain"], "zoom_images_per_s": pace["zoom"],
            "cost_ratio": pace["plain"] / pace["zoom"], "images": len(images.samples)}  # fmt: skip


def cam_variant(dataset: str, name: str, size: int, X: np.ndarray, y: np.ndarray, splits, paths) -> dict:
    """Seed 0: the box from the CAM of an out-of-fold probe's predicted class vs the class-agnostic box."""
    from finegrain.heads import LogisticProbe

    G, _, _, _ = extract(dataset, name, size, pooling="gap")
    gap_full = G[:, : G.shape[1] // 2]  # the head reads the full view's GAP: its logits are the CAM's average
    tr, te = split(y, splits, 0)
    parts = []
    for k, (a, b) in enumerate(StratifiedKFold(5, shuffle=True, random_state=0).split(tr, y[tr])):
        clf = LogisticProbe().fit(gap_full[tr[a]], y[tr[a]])
        parts.append(({paths[i] for i in tr[b]}, clf, f"-cam{k}"))
    clf = LogisticProbe().fit(gap_full[tr], y[tr])
    parts.append(({paths[i] for i in te}, clf, "-camtest"))
    rows: dict[str, np.ndarray] = {}
    for subset, clf, tag in parts:
        W, b = _full_head(clf, len(np.unique(y)))
        Xs, _, _, ps = extract(dataset, name, size, subset=subset, head=(W, b), tag=tag)
        rows.update(zip(ps, Xs))
    Xc = np.stack([rows[p] for p in paths])
    return {"class_agnostic": score(X, y, tr, te), "cam_oof": score(Xc, y, tr, te)}


def _full_head(clf, n_classes: int):
    W = np.zeros((n_classes, clf.coef_.shape[1]), np.float32)
    b = np.full(n_classes, -1e9, np.float32)
    W[clf.classes_], b[clf.classes_] = clf.coef_, clf.intercept_
    return W, b


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["cub100", "flowers17"])
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    ap.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    ap.add_argument("--no-cam", action="store_true", help="skip the class-conditional map (lite0 on cub100)")
    args = ap.parse_args(argv)
    for dataset in args.datasets:
        for name in args.backbones:
            size = BACKBONES[name]
            t0 = time.perf_counter()
            X, y, splits, paths = extract(dataset, name, size)
            seconds = time.perf_counter() - t0
            per_seed = {str(s): score(X, y, *split(y, splits, s)) for s in args.seeds}
            gains = {rep: [100 * (r[rep] - r["full"]) for r in per_seed.values()] for rep in REPS[1:]}
            gain = {rep: {"mean": float(np.mean(g)), "std": float(np.std(g, ddof=1)) if len(g) > 1 else 0.0}
                    for rep, g in gains.items()}  # fmt: skip
            row = {"dataset": dataset, "backbone": name, "view": f"full{size}-flip, zoom decode x2", "pooling": POOLING,
                   "seeds": per_seed, "extract_seconds": seconds, "gain_points": gain,
                   "mean": {rep: float(np.mean([r[rep] for r in per_seed.values()])) for rep in REPS},
                   "inference": inference_ratio(dataset, name, size)}  # fmt: skip
            if dataset == "cub100" and name == "efficientnet_lite0" and not args.no_cam:
                row["cam"] = cam_variant(dataset, name, size, X, y, splits, paths)
            print(dataset, name, {k: round(v, 4) for k, v in row["mean"].items()}, row["gain_points"],
                  row["inference"], row.get("cam"), flush=True)  # fmt: skip
            record("zoom.json", f"{dataset}/{name}", row)
    _headline()


def _headline() -> None:
    from bench.common import RESULTS

    with open(os.path.join(RESULTS, "zoom.json")) as f:
        data = json.load(f)
    cub = [v for k, v in data.items() if k.startswith("cub100/")]
    if not cub:
        return
    best = max(cub, key=lambda r: max(r["gain_points"][rep]["mean"] for rep in REPS[2:]))
    rep = max(REPS[2:], key=lambda r: best["gain_points"][r]["mean"])
    record("zoom.json", "headline", {
        "cub100_zoom_gain_points_mean": best["gain_points"][rep]["mean"],
        "cub100_zoom_gain_points_std": best["gain_points"][rep]["std"],
        "zoom_inference_cost_ratio": best["inference"]["cost_ratio"],
        "best": f"{best['backbone']} {rep}",
    })  # fmt: skip


def zoom_section(data: dict) -> list[str]:
    """BENCHMARKS.md's table of `python -m bench.zoom`."""
    rows = [v for k, v in data.items() if "/" in k]
    if not rows:
        return []
    out = [
        "## Look closer: the zoom view (issue 25)",
        "",
        "One extraction per data set and backbone of the zoom view (models/zoom.py): the image decoded at twice the "
        "view's side, the full view (first pass, GeM, full frame + flip) and the box of its class-agnostic "
        "attention map cut from the full-resolution decode (second pass). finegrain's probe (L2, `LogisticProbe`) "
        "on each; seed 0 is the data set's split, seeds 1-2 stratified re-draws of the same sizes. Gains are "
        "paired, over the full view of the same pass, in points.",
        "",
        "| data | backbone | full | zoom | full + zoom (concat) | full + zoom (proba) | gain concat (mean ± std) "
        "| gain proba | inference cost (zoom / plain, images/s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for r in rows:
        m, g, inf = r["mean"], r["gain_points"], r["inference"]
        gains = [f"{g[k]['mean']:+.2f} ± {g[k]['std']:.2f}" for k in ("full+zoom concat", "full+zoom proba")]
        pace = f"{inf['cost_ratio']:.2f}x ({inf['plain_images_per_s']:.1f} / {inf['zoom_images_per_s']:.1f})"
        cells = [r["dataset"], r["backbone"], *(f"{m[k]:.4f}" for k in REPS), *gains, pace]
        out.append("| " + " | ".join(cells) + " |")
        if r.get("cam"):
            c, a = r["cam"]["cam_oof"], r["cam"]["class_agnostic"]
            notes.append(
                f"{r['dataset']}, {r['backbone']}, seed 0: the box from the CAM of the class an out-of-fold probe "
                f"predicts against the class-agnostic map: full + zoom (concat) {c['full+zoom concat']:.4f} vs "
                f"{a['full+zoom concat']:.4f}, zoom alone {c['zoom']:.4f} vs {a['zoom']:.4f}."
            )
    out += ["", *notes] if notes else []
    commands = sorted({r["command"] for r in rows if r.get("command")})
    out += ["", "Rows measured by: " + "; ".join(f"`{c}`" for c in commands)] if commands else []
    head = data.get("headline")
    if head:
        shown = {k: v for k, v in head.items() if k not in ("command", "machine")}
        out += ["", f"Headline (the best combination over every row above): `{json.dumps(shown)}`"]
    return out + [""]


if __name__ == "__main__":
    main()
