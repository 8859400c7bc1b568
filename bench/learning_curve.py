"""The learning curve of a finished `fit` run's frozen features: how much does a probe gain from more training images?

Issue 23 asks whether, on a large training set, extraction time is better spent on more images or on another view.
This measures the first half of that trade on features `fit` already extracted: the fit's best probe head (by
pooling and normalizer) refitted with its C on 1/4, 1/2 and all of fit's train split (stratified, seeded subsets),
scored on fit's validation split (never the test split), beside the best out-of-fold gain a second view brought.

    python -m bench.learning_curve bench/cache/suite-fit/cifar10-500-10min-seed0
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from bench.common import command_line, record
from finegrain.embed import FeatureStore
from finegrain.recipe.candidates import HEADS, fit_head, val_scores
from finegrain.recipe.frozen import _features

FRACTIONS = (0.25, 0.5, 1.0)


def _subset(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a stratified subset: `fraction` of each class's images (at least one), seeded."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        keep.append(rng.choice(idx, max(1, round(fraction * len(idx))), replace=False))
    return np.sort(np.concatenate(keep))


def curve(run: str, view: str, pooling: str, head_name: str, *, seed: int = 0) -> dict[str, float]:
    """Validation top-1 of one head refitted on FRACTIONS of fit's train split of one view's features."""
    store = FeatureStore.open(os.path.join(run, "features", view))
    Xtr, ytr = _features(store, "train", pooling)
    Xva, yva = _features(store, "val", pooling)
    head = next(h for h in HEADS if h[0] == head_name)
    out = {}
    for f in FRACTIONS:
        idx = _subset(ytr, f, seed)
        norm, clf = fit_head(head, Xtr[idx], ytr[idx], seed=seed)
        proba = np.zeros((len(yva), int(ytr.max()) + 1))
        proba[:, clf.classes_] = clf.predict_proba(norm.transform(Xva))
        out[f"{f:g}"] = round(val_scores(proba, yva)[0], 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a finished fit folder (its features/ and leaderboard.csv)")
    args = ap.parse_args()
    with open(os.path.join(args.run, "fit.json")) as f:
        summary = json.load(f)
    import csv

    with open(os.path.join(args.run, "leaderboard.csv"), newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] == "frozen" and "+la" not in r["name"]]
    by_view: dict[str, float] = {}
    for r in rows:
        view = r["name"].split("/")[0]
        by_view[view] = max(by_view.get(view, 0.0), float(r["score_top1"] or 0))
    first = next(iter(summary["views"]))
    best_first = max((r for r in rows if r["name"].startswith(first + "/")), key=lambda r: float(r["score_top1"]))
    _, pooling, head = best_first["name"].split("/")
    result = {
        "run": args.run,
        "first_view": first,
        "head": best_first["name"],
        "val_top1_by_train_fraction": curve(args.run, first, pooling, head),
        "best_score_by_view": by_view,  # each view's best frozen head, on fit's estimate (out-of-fold)
        "command": command_line(),
    }
    print(json.dumps(result, indent=1))
    record("learning_curve.json", os.path.basename(os.path.normpath(args.run)), result)


if __name__ == "__main__":
    main()
