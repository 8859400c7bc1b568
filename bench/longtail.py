"""Long-tailed recognition benchmarks (issue: long tail).

cub   cub100 made long-tailed (ρ = 10, 30 → 3 images a class) on frozen `efficientnet_lite0` representations
      (the recommended extraction of bench/representations.py): CE probe vs cRT, τ-norm, LWS, post-hoc logit
      adjustment, NCM. τ is chosen on a balanced validation split (5 images a class from the training images the
      long-tailed subset left out), never on test; test = the balanced cub100 test split.

  python -m bench.longtail cub
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from bench.common import ROOT, record, require_dataset
from finegrain.data import Sample
from finegrain.embed import FeatureStore, create_normalizer
from finegrain.heads import create_classifier
from finegrain.heads.decoupled import LinearHead, LogitAdjusted, TauNormalized, choose_tau

STORE = os.path.join(ROOT, "bench", "cache", "cub100-lite0-finegrain")
TAUS = [round(t, 2) for t in np.linspace(0.0, 2.0, 11)]


def _shots(y_true, y_pred, counts, many, few) -> dict:
    from finegrain.evaluate.longtail import shot_accuracy

    return {k: round(float(v), 4) for k, v in shot_accuracy(y_true, y_pred, counts, many=many, few=few).items()}


def cub(args) -> None:
    from finegrain.data.longtail import describe_counts, make_longtailed

    require_dataset("cub100")
    if not os.path.exists(os.path.join(STORE, "index.csv")):
        raise SystemExit(f"needs {STORE}: run python -m bench.representations first")
    store = FeatureStore.open(STORE)
    entries = store.index()
    feats = store.features("gem")
    train = [e for e in entries if e.split == "train"]
    samples = [Sample(e.path, e.label, "train") for e in train]
    lt = make_longtailed(samples, imbalance_ratio=args.rho, seed=args.seed, n_max=30)
    chosen = {s.path for s in lt}
    rng = np.random.default_rng(args.seed)
    val_rows = []
    for c in range(len(store.classes)):
        rest = [e.row for e in train if e.label == c and e.path not in chosen]
        val_rows += rng.permutation(rest)[: args.val_per_class].tolist()
    tr_rows = [e.row for e in train if e.path in chosen]
    ytr = np.array([e.label for e in train if e.path in chosen])
    label_of_row = {e.row: e.label for e in entries}
    yval = np.array([label_of_row[r] for r in val_rows])
    test = [e for e in entries if e.split == "test"]
    norm = create_normalizer("l2").fit(np.asarray(feats[tr_rows]))
    Xtr, Xval = norm.transform(np.asarray(feats[tr_rows])), norm.transform(np.asarray(feats[val_rows]))
    Xte, yte = norm.transform(np.asarray(feats[[e.row for e in test]])), np.array([e.label for e in test])
    counts = np.bincount(ytr, minlength=len(store.classes))

    results = {}

    def report(name, clf, extra=None):
        pred = clf.predict(Xte)
        per_class = [np.mean(pred[yte == c] == c) for c in range(len(store.classes))]
        results[name] = {
            "top1": round(float(np.mean(pred == yte)), 4),
            "mean_per_class": round(float(np.mean(per_class)), 4),
            **_shots(yte, pred, counts, args.many, args.few),
            **(extra or {}),
        }
        print(name, results[name], flush=True)

    t0 = time.perf_counter()
    probe = create_classifier("probe").fit(Xtr, ytr)
    report("CE probe", probe, {"C": probe.C_})
    report("NCM", create_classifier("ncm").fit(Xtr, ytr))
    tau, _ = choose_tau(lambda t: TauNormalized(probe, tau=t), TAUS, Xval, yval)
    report("tau-norm", TauNormalized(probe, tau=tau).fit(), {"tau": tau})
    tau, _ = choose_tau(lambda t: LogitAdjusted(probe, tau=t, class_counts=counts), TAUS, Xval, yval)
    report("logit adjustment (post-hoc)", LogitAdjusted(probe, tau=tau, class_counts=counts).fit(), {"tau": tau})
    report("cRT (class-balanced re-training)", LinearHead(sampler="class-balanced", weight_decay=2e-2).fit(Xtr, ytr))
    report("LWS (learnable weight scaling)", LinearHead(scales_only=True, init=probe).fit(Xtr, ytr))
    record(
        "longtail.json",
        "cub100_lt",
        {
            "imbalance_ratio": args.rho,
            "seed": args.seed,
            "counts": describe_counts(counts),
            "shot_thresholds": {"many": f"> {args.many}", "few": f"< {args.few}"},
            "val_per_class": args.val_per_class,
            "features": "efficientnet_lite0, GeM, 256 px full frame, flip-averaged, L2",
            "methods": results,
            "seconds": round(time.perf_counter() - t0, 1),
        },
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("cub")
    p.add_argument("--rho", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-per-class", type=int, default=5)
    p.add_argument("--many", type=int, default=20, help="many-shot: more than this many training images")
    p.add_argument("--few", type=int, default=10, help="few-shot: fewer than this many training images")
    args = ap.parse_args()
    {"cub": cub}[args.what](args)


if __name__ == "__main__":
    main()
