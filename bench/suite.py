"""The development suite (issue 23): `finegrain fit` from a cold start on several data sets and seeds at one budget,
each run beside the hand baseline measured in the same invocation.

Hand baseline: `efficientnet_lite0` with its weights' eval preprocessing (the timm eval transform: 224 px, bicubic,
centre crop 0.875), fp32 GAP features (what a hand-written timm script computes), scikit-learn
`LogisticRegression(max_iter=1000)` with its default C, trained on every training image of the data set (fit's
train + val) and scored on the test split. It depends on neither the budget nor fit's seed: measured once per data
set per invocation (its features are kept in bench/cache/suite-hand/<data set>) and recorded beside every fit row.

    python -m bench.suite --budget 10 --seeds 0                   # the six data sets, one seed
    python -m bench.suite --budget 5 --seeds 0 1 2 --datasets cub100 rsscn7
    python -m bench.suite --budget 5 --no-hindsight               # skip scoring every candidate on test afterwards
    python -m bench.suite --hand-only                             # the hand baselines alone
    python -m bench.suite --budget 1 --datasets mine --data mine=/path/to/folder   # another folder or CSV manifest

Rows go to bench/results/suite.json under "<data set>/<budget>min/seed<seed>" (hand baselines under
"<data set>/hand"); its "headline" is recomputed from every recorded row on each run. `python -m bench.report`
renders the table into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np

from bench.common import RESULTS, record
from bench.fit import CACHE, _hindsight, _manifest

DATASETS = ("cub100", "cifar10-500", "flowers17", "rsscn7", "cub100-5shot", "cub100-lt10")
RESULTS_FILE = "suite.json"
HAND_BACKBONE = "efficientnet_lite0"
HAND_PRECISION = "fp32"
OVER_BUDGET_GRACE_S = 5.0  # a run is over budget when its wall clock passes the budget by more than this


def resolve(name: str, paths: dict[str, str] | None = None) -> tuple[str | None, str]:
    """(data folder or CSV manifest, "") for a suite data set name, or (None, why) when its data is absent here."""
    if paths and name in paths:
        return paths[name], ""
    if name not in DATASETS:
        return None, f"unknown data set {name!r}: one of {', '.join(DATASETS)}, or give its path with --data NAME=PATH"
    try:
        return _manifest(name), ""
    except SystemExit as e:  # bench.common.require_dataset: the shared folder is not beside this checkout
        return None, str(e)


def hand_baseline(data: str, cache: str, *, workers: int | None = None) -> dict:
    """The hand baseline on one data set: top-1 and mean per-class accuracy on its test split (the test images
    that decode, as fit scores them) and how much it learned from."""
    from sklearn.linear_model import LogisticRegression

    from finegrain.backbones import create_backbone
    from finegrain.data import load_image_set
    from finegrain.embed import extract_to_store
    from finegrain.errors import FinegrainError
    from finegrain.evaluate.metrics import classification_metrics

    image_set = load_image_set(data)
    t0 = time.perf_counter()
    kw = {"poolings": ("gap",), "flip": False, "precision": HAND_PRECISION, "runtime": "torch", "progress": False}
    try:
        result = extract_to_store(image_set, create_backbone(HAND_BACKBONE), cache, num_workers=workers, **kw)
    except FinegrainError:  # a store of another preprocessing or version: extract anew
        result = extract_to_store(
            image_set, create_backbone(HAND_BACKBONE), cache, num_workers=workers, overwrite=True, **kw
        )
    store = result.store
    held = sorted({e.split for e in store.index()})
    if "test" not in held:
        raise ValueError(f"{data} has no test split to score the hand baseline on (splits: {', '.join(held)})")
    parts = [store.split(s, "gap") for s in held if s != "test"]
    X, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    Xt, yt, _ = store.split("test", "gap")
    clf = LogisticRegression(max_iter=1000).fit(X, y)
    scores = np.zeros((len(yt), len(image_set.classes)))
    scores[:, clf.classes_] = clf.predict_proba(Xt)
    m = classification_metrics(scores, yt)
    return {
        "top1": m["top1"],
        "mean_per_class": m["mean_per_class"],
        "n_train": int(len(y)),
        "n_test": int(len(yt)),
        "features_reused": result.n_extracted == 0,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def fit_row(data: str, out: str, *, budget: float, seed: int, hand: dict, hindsight: bool = True, **options) -> dict:
    """`finegrain fit` from a cold start (a fresh `out`, no feature cache) and its row beside `hand`.
    `options`: other FitConfig fields (the test's fast settings); the suite itself runs fit's defaults."""
    from finegrain.recipe import FitConfig, fit

    shutil.rmtree(out, ignore_errors=True)
    cfg = FitConfig(data=data, out=out, budget_min=budget, seed=seed, **options)
    t0 = time.perf_counter()
    result = fit(cfg, progress=False)
    wall = time.perf_counter() - t0
    with open(os.path.join(out, "fit.json"), encoding="utf-8") as f:
        summary = json.load(f)
    top1 = result.test["metrics"]["top1"]
    row = {
        "budget_min": budget, "seed": seed,
        "test_top1": top1, "test_top1_interval": (result.test.get("intervals") or {}).get("top1"),
        "test_mean_per_class": result.test["metrics"]["mean_per_class"],
        "hand_top1": hand["top1"], "hand_mean_per_class": hand["mean_per_class"],
        "gain_points": round(100 * (top1 - hand["top1"]), 2),
        "wall_s": round(wall, 1), "budget_used_fraction": round(wall / (60 * budget), 3),
        "over_budget": wall > 60 * budget + OVER_BUDGET_GRACE_S,
        "chosen": result.chosen.name, "chosen_estimate": result.chosen.estimate,
        "chosen_score_top1": result.chosen.score_top1, "selection": summary["selection"],
        "skipped_candidates": summary.get("skipped_candidates", []),
        "best_in_hindsight": None, "best_in_hindsight_top1": None, "loss_to_best_points": None,
    }  # fmt: skip
    if hindsight:
        scores = _hindsight(cfg, result)
        best = max(scores, key=scores.get)
        chosen = scores.get(result.chosen.name, top1)
        row.update(best_in_hindsight=best, best_in_hindsight_top1=scores[best], chosen_hindsight_top1=chosen)
        row["loss_to_best_points"] = round(100 * (scores[best] - chosen), 2)
    return row


def _min(values: list[float]) -> float | None:
    return round(min(values), 2) if values else None


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 2) if values else None


def headline(rows: dict[str, dict]) -> dict:
    """The issue's headline figures from recorded fit rows ({key: row}); None where not measured."""
    runs = list(rows.values())

    def at(budget: float, seed: int | None = None) -> list[dict]:
        return [r for r in runs if r["budget_min"] == budget and (seed is None or r["seed"] == seed)]

    ten0, five = at(10, 0), at(5)
    gains5: dict[str, list[float]] = {}
    for r in five:
        gains5.setdefault(r["dataset"], []).append(r["gain_points"])
    top1_5 = {r["dataset"]: r["test_top1"] for r in at(5, 0)}
    steps = [100 * (r["test_top1"] - top1_5[r["dataset"]]) for r in ten0 if r["dataset"] in top1_5]
    losses = [r["loss_to_best_points"] for r in at(10) if r["dataset"] == "cub100"]
    losses = [v for v in losses if v is not None]
    return {
        "datasets": sorted({r["dataset"] for r in runs}),
        "min_gain_over_hand_points_10min": _min([r["gain_points"] for r in ten0]),
        "mean_gain_over_hand_points_10min": _mean([r["gain_points"] for r in ten0]),
        "min_mean_gain_over_hand_points_5min": _min([float(np.mean(g)) for g in gains5.values()]),
        "worst_seed_gain_points_5min": _min([r["gain_points"] for r in five]),
        "min_budget_used_fraction": round(min(r["budget_used_fraction"] for r in runs), 3) if runs else None,
        "over_budget_runs": sum(bool(r["over_budget"]) for r in runs) if runs else None,
        "min_gain_10min_over_5min_points": _min(steps),
        "cub100_max_loss_to_best_points_10min": round(max(losses), 2) if losses else None,
        "runs": sorted(rows),
    }


def fit_rows(data: dict) -> dict[str, dict]:
    """The fit rows of a suite.json (not the hand baselines, not the headline)."""
    return {k: v for k, v in data.items() if k.count("/") == 2 and "/seed" in k}


def update_headline(results: str = RESULTS) -> dict:
    """Recompute suite.json's headline from every recorded row; returns it."""
    from finegrain.atomic import atomic_write_json

    path = os.path.join(results, RESULTS_FILE)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    data["headline"] = headline(fit_rows(data))
    atomic_write_json(path, data)
    return data["headline"]


def run_suite(names: list[str], *, budget: float | None, seeds: list[int], hindsight: bool = True,
              hand_only: bool = False, paths: dict[str, str] | None = None, results: str = RESULTS,
              cache: str = CACHE, workers: int | None = None, **fit_options) -> dict[str, dict]:  # fmt: skip
    """Every data set x seed: the hand baseline once, then a cold-start fit per seed, each row recorded as it ends.
    `paths` adds or overrides data sets (name -> folder or CSV manifest). Returns {key: row}; data sets absent here
    are skipped with their reason printed."""
    rows: dict[str, dict] = {}
    for name in names:
        data, why = resolve(name, paths)
        if data is None:
            print(f"suite: skipping {name}: {why}", flush=True)
            continue
        hand = hand_baseline(data, os.path.join(cache, "suite-hand", name), workers=workers)
        print(f"suite: {name} hand baseline top-1 {hand['top1']:.4f} ({hand['seconds']:.0f} s)", flush=True)
        record(RESULTS_FILE, f"{name}/hand", {"dataset": name, **hand}, results=results)
        rows[f"{name}/hand"] = hand
        for seed in [] if hand_only else seeds:
            key = f"{name}/{budget:g}min/seed{seed}"
            out = os.path.join(cache, "suite-fit", f"{name}-{budget:g}min-seed{seed}")
            row = {"dataset": name, **fit_row(data, out, budget=budget, seed=seed, hand=hand, hindsight=hindsight,
                                              workers=workers, **fit_options)}  # fmt: skip
            print(f"suite: {key}: {json.dumps({k: v for k, v in row.items() if k != 'skipped_candidates'})}")
            record(RESULTS_FILE, key, row, results=results)
            rows[key] = row
    if any("/seed" in k for k in rows):
        print("suite: headline", json.dumps(update_headline(results), indent=1), flush=True)
    return rows


def _data_option(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--data takes NAME=PATH (a folder or a CSV manifest), got {text!r}")
    return name, os.path.abspath(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, help="fit's budget in minutes (not needed with --hand-only)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="fit seeds (default: 0)")
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), help=f"default: {' '.join(DATASETS)}")
    ap.add_argument("--data", type=_data_option, action="append", default=[], metavar="NAME=PATH",
                    help="a data set by path (a folder or CSV manifest), run when --datasets names it")  # fmt: skip
    ap.add_argument("--no-hindsight", action="store_true", help="skip scoring every candidate on test after the run")
    ap.add_argument("--hand-only", action="store_true", help="measure the hand baselines only")
    args = ap.parse_args(argv)
    if not args.hand_only and (args.budget is None or args.budget <= 0):
        ap.error("--budget M (minutes, > 0) is needed unless --hand-only")
    rows = run_suite(args.datasets, budget=args.budget, seeds=args.seeds, hindsight=not args.no_hindsight,
                     hand_only=args.hand_only, paths=dict(args.data))  # fmt: skip
    if not rows:
        raise SystemExit("suite: no data set could be run (see the reasons above)")


if __name__ == "__main__":
    main()
