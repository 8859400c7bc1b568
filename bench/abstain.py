"""Knowing when not to answer (issue 26): split-conformal coverage and set size, class-conditional coverage of the
few-shot classes of a long-tailed set, and unknown-class detection (near: bird species never trained on; far: CIFAR-10
photos), on the frozen features of bench.suite's hand baseline (lite0, timm eval view, GAP) with a default
scikit-learn probe (`LogisticRegression(max_iter=1000)`).

Protocol: the probe learns on the train split; the test split is cut in two at random (5 seeds), one half calibrates
(evaluate/conformal.py), the other is scored: empirical coverage, mean set size. cub100-LT is calibrated three ways:
marginal, class by class (the marginal threshold for a class with too few images) and by bands of training counts
(`count_bands`: within a factor of 2; what `fit` does on long-tailed data).

`fit`'s own model (`--fit`): the 5-minute models of bench.suite's runs (bench/cache/suite-fit, seeds 0-2 of cub100 and
cub100-LT), calibrated by fit on out-of-fold probabilities (conformal.json), scored on their run's test split. A
long-tailed run saved before count bands (class by class) is recalibrated from the same stored scores as `fit` now
does (bands of its out-of-fold labels' counts: the training counts). Unknowns: the probe and the k-NN
distance (k = 10, cosine; Sun et al. 2022) learn on cub100's first 50 species; test images of those 50 are known,
those of the other 50 (near) and CIFAR-10 test images (far) unknown; AUROC and the share of unknowns accepted when
95% of known images are (FPR at 95% TPR).

    python -m bench.abstain          # needs `python -m bench.suite --hand-only` (the stores in bench/cache)
    python -m bench.abstain --fit    # also fit's 5-minute models (needs bench.suite's runs)
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from bench.common import RESULTS, ROOT, command_line, machine, record
from finegrain.embed import FeatureStore
from finegrain.evaluate.conformal import Conformal, UnknownScore, count_bands, coverage_report, energy

STORES = os.path.join(ROOT, "bench", "cache", "suite-hand")
SUITE_RUNS = os.path.join(ROOT, "bench", "cache", "suite-fit")
FIT_RUNS = tuple(f"{d}-5min-seed{s}" for d in ("cub100", "cub100-lt10") for s in (0, 1, 2))
CALIBRATIONS = ("marginal", "class by class (marginal below n)", "bands of training counts")
SEEDS = (0, 1, 2, 3, 4)
FEW_SHOT = 10  # training images a class at most: the few-shot band of cub100-LT (its classes hold 3-30)


def _load(name: str, split: str):
    X, y, _ = FeatureStore.open(os.path.join(STORES, name)).split(split, "gap")
    return np.asarray(X, np.float32), np.asarray(y)


def _proba(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(test probabilities [N, C] of the probe fitted on train, test labels, train counts a class)."""
    X, y = _load(name, "train")
    Xt, yt = _load(name, "test")
    clf = LogisticRegression(max_iter=1000).fit(X, y)
    proba = np.zeros((len(yt), int(max(y.max(), yt.max())) + 1))
    proba[:, clf.classes_] = clf.predict_proba(Xt)
    return proba, yt, np.bincount(y, minlength=proba.shape[1])


def _conformal(calibration: str, counts: np.ndarray) -> Conformal:
    if calibration == CALIBRATIONS[1]:
        return Conformal("lac", classwise=True)
    return Conformal("lac", groups=count_bands(counts) if calibration == CALIBRATIONS[2] else None)


def coverage_rows(name: str, calibration: str = CALIBRATIONS[0]) -> dict:
    proba, y, counts = _proba(name)
    rows = {}
    for coverage in (0.9, 0.95):
        runs = []
        for seed in SEEDS:
            perm = np.random.default_rng(seed).permutation(len(y))
            cal, ev = perm[: len(y) // 2], perm[len(y) // 2 :]
            conf = _conformal(calibration, counts).fit(proba[cal], y[cal])
            runs.append(_coverage(conf.predict_set(proba[ev], coverage), y[ev], counts))
        rows[str(coverage)] = _mean_row(runs, coverage)
        print(name, calibration, coverage, rows[str(coverage)], flush=True)
    return {"method": "lac", "calibration": calibration, "seeds": list(SEEDS), "rows": rows}


def _coverage(members: np.ndarray, y: np.ndarray, counts: np.ndarray) -> dict:
    rep = coverage_report(members, y)
    few = [v for c, v in rep["per_class"].items() if counts[c] <= FEW_SHOT]
    return {"coverage": rep["coverage"], "mean_set_size": rep["mean_set_size"],
            "few_shot_coverage": float(np.mean(few)) if few else None}  # fmt: skip


def _mean_row(runs: list[dict], coverage: float) -> dict:
    mean = {k: float(np.mean([r[k] for r in runs])) for k in ("coverage", "mean_set_size")}
    few = [r["few_shot_coverage"] for r in runs if r["few_shot_coverage"] is not None]
    few_mean = float(np.mean(few)) if few else None
    return {**mean, "coverage_std": float(np.std([r["coverage"] for r in runs])),
            "gap_points": round(100 * (mean["coverage"] - coverage), 2), "few_shot_coverage": few_mean,
            "few_shot_gap_points": round(100 * (few_mean - coverage), 2) if few else None}  # fmt: skip


def fit_rows(runs=FIT_RUNS) -> dict:
    """fit's saved models (bench.suite's runs) on their test split: coverage and set size at 90% and 95%, few-shot
    coverage on long-tailed data, and the test top-1 (the suite's, as a check)."""
    from finegrain.evaluate.inference import predict_paths
    from finegrain.evaluate.predictor import load

    out: dict = {}
    for run in runs:
        folder = os.path.join(SUITE_RUNS, run)
        if not os.path.isfile(os.path.join(folder, "model", "conformal.json")):
            print("skipped (no calibrated model):", folder, flush=True)
            continue
        with open(os.path.join(folder, "splits.json")) as f:
            paths = json.load(f)["test"]
        predictor = load(os.path.join(folder, "model"), runtime="torch")
        conf = predictor.conformal
        counts = np.bincount(conf.labels_, minlength=conf.n_classes_)  # out-of-fold over train + val
        if conf.classwise:  # a long-tailed run saved before count bands: recalibrated as fit now does
            conf = Conformal.from_dict({**conf.to_dict(), "classwise": False, "groups": count_bands(counts).tolist()})
        pred = predict_paths(predictor, paths, progress=False)
        index = {c: i for i, c in enumerate(predictor.classes)}
        y = np.array([index[os.path.basename(os.path.dirname(paths[i]))] for i in pred.index])
        row = {"calibration": conf.calibration, "calibrated_on": len(conf.labels_), "test_images": len(y),
               "test_top1": float((pred.proba.argmax(1) == y).mean())}  # fmt: skip
        for coverage in (0.9, 0.95):
            row[str(coverage)] = _coverage(conf.predict_set(pred.proba, coverage), y, counts)
        out[run] = row
        print("fit", run, row, flush=True)
    for data in sorted({r.rsplit("-5min", 1)[0] for r in out}):
        seeds = [v for k, v in out.items() if k.startswith(data + "-5min")]
        out[data] = {str(c): _mean_row([s[str(c)] for s in seeds], c) for c in (0.9, 0.95)} | {"seeds": len(seeds)}
    return out


def _separation(known: np.ndarray, unknown: np.ndarray) -> dict:
    """AUROC of unknown-vs-known scores (higher = unknown) and the share of unknowns accepted at the score under
    which 95% of known images are (FPR at 95% TPR)."""
    truth = np.r_[np.zeros(len(known)), np.ones(len(unknown))]
    at95 = np.quantile(known, 0.95)
    return {"auroc": float(roc_auc_score(truth, np.r_[known, unknown])),
            "fpr_at_95_tpr": float(np.mean(unknown <= at95)), "n_unknown": int(len(unknown))}  # fmt: skip


def unknown_rows() -> dict:
    """Energy of the probe's logits (the reported score) and the k-NN distance, each: known = test images of the
    50 species trained on, near = the other 50 species', far = CIFAR-10's."""
    X, y = _load("cub100", "train")
    Xt, yt = _load("cub100", "test")
    far, _ = _load("cifar10-500", "test")
    clf = LogisticRegression(max_iter=1000).fit(X[y < 50], y[y < 50])
    det = UnknownScore(k=10, accept=0.95).fit(X[y < 50])
    scores = {"energy": lambda A: energy(clf.decision_function(A)), "knn10": det.score,
              "max_probability": lambda A: -clf.predict_proba(A).max(1)}  # fmt: skip
    out = {}
    for name, score in scores.items():
        known = score(Xt[yt < 50])
        for label, images in (("near", Xt[yt >= 50]), ("far", far)):
            out[f"{label}_{name}"] = _separation(known, score(images))
            print("unknown", label, name, out[f"{label}_{name}"], flush=True)
    out["near"], out["far"] = out["near_energy"], out["far_energy"]
    out["flag"] = flag_rows(clf, X[y < 50], y[y < 50], Xt[yt < 50], Xt[yt >= 50], far)
    return out


def flag_rows(clf, X, y, known, near, far) -> dict:
    """The flag a saved model raises (Conformal.is_unknown), set as `fit` sets it: the top probability under the
    level 95% of the training images reach out-of-fold (5 folds); the share of known test images it accepts and of
    near and far unknowns it flags."""
    from sklearn.base import clone
    from sklearn.model_selection import cross_val_predict

    oof = cross_val_predict(clone(clf), X, y, cv=5, method="predict_proba")
    conf = Conformal("lac").fit(oof, y - y.min())
    flagged = {name: float(conf.is_unknown(clf.predict_proba(A)).mean()) for name, A in
               (("known", known), ("near", near), ("far", far))}  # fmt: skip
    row = {"threshold": conf.unknown_threshold(), "known_accepted": 1 - flagged["known"],
           "near_flagged": flagged["near"], "far_flagged": flagged["far"]}  # fmt: skip
    print("unknown flag", row, flush=True)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fit", action="store_true", help="also score fit's 5-minute models from bench.suite's runs")
    args = ap.parse_args(argv)
    cub = coverage_rows("cub100")
    lt = {how: coverage_rows("cub100-lt10", how) for how in CALIBRATIONS}
    bands = lt[CALIBRATIONS[2]]["rows"]
    unknown = unknown_rows()
    headline = {
        "coverage_gap_90_points": cub["rows"]["0.9"]["gap_points"],
        "coverage_gap_95_points": cub["rows"]["0.95"]["gap_points"],
        "mean_set_size_95": round(cub["rows"]["0.95"]["mean_set_size"], 2),
        # the larger of the two few-shot gaps, with fit's calibration for long-tailed data
        "lt_few_coverage_gap_points": max((bands[c]["few_shot_gap_points"] for c in bands), key=abs),
        "near_unknown_auroc": round(unknown["near"]["auroc"], 4),
        "far_unknown_auroc": round(unknown["far"]["auroc"], 4),
    }
    doc = {"cub100": cub, "cub100-lt10": lt, "unknown": unknown, "command": command_line()}
    if args.fit:
        doc["fit"] = fit_rows()
        for data, key in (
            ("cub100", "fit_coverage_gap_{}_points"),
            ("cub100-lt10", "fit_lt_few_coverage_gap_{}_points"),
        ):
            for c in (0.9, 0.95):
                row = doc["fit"].get(data, {}).get(str(c))
                if row:
                    gap = row["gap_points"] if data == "cub100" else row["few_shot_gap_points"]
                    headline[key.format(int(100 * c))] = gap
    else:  # keep the last fit rows
        with open(os.path.join(RESULTS, "abstain.json")) as f:
            doc["fit"] = json.load(f).get("frozen-probe", {}).get("fit")
    print("headline", headline)
    record("abstain.json", "frozen-probe", {**doc, "headline": headline, "machine": machine()})


def abstain_section(data: dict) -> list[str]:
    """BENCHMARKS.md's table of `python -m bench.abstain`."""
    r = data.get("frozen-probe")
    if not r:
        return []
    out = ["## Knowing when not to answer: prediction sets and unknown classes (issue 26)", "",
           "Frozen lite0 GAP features (timm eval view), `LogisticRegression(max_iter=1000)` on train; the test split "
           "cut in two 5 times (seeds 0-4): one half calibrates split-conformal LAC sets (evaluate/conformal.py), "
           "the other is scored. Few-shot: cub100-LT classes with at most 10 training images.", "",
           "| data | calibration | nominal | coverage (mean of 5) | gap (points) | mean set size | few-shot coverage |",
           "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    runs = [("cub100", r["cub100"]), *(("cub100-LT", run) for run in r["cub100-lt10"].values())]
    for name, run in runs:
        for nominal, row in run["rows"].items():
            few = row.get("few_shot_coverage")
            how = run["calibration"]
            out.append(f"| {name} | {how} | {float(nominal):.2f} | {row['coverage']:.4f} | {row['gap_points']:+.2f} | "
                       f"{row['mean_set_size']:.2f} | {'' if few is None else f'{few:.4f}'} |")  # fmt: skip
    u = r["unknown"]
    out += ["", "Unknown classes, learned on cub100's first 50 species: the energy of the probe's logits (-logsumexp; "
            "Liu et al. 2020) and the distance to the 10th nearest training feature (cosine; Sun et al. 2022); "
            "known = those species' test images, near = the other 50 species', far = CIFAR-10's 10,000 test images.",
            "", "| unknowns | score | AUROC | accepted when 95% of known are (FPR at 95% TPR) |",
            "|---|---|---:|---:|"]  # fmt: skip
    for k in ("near", "far"):
        for name in ("energy", "knn10", "max_probability"):
            row = u.get(f"{k}_{name}")
            if row:
                out.append(f"| {k} ({row['n_unknown']} images) | {name} | {row['auroc']:.4f} | "
                           f"{row['fpr_at_95_tpr']:.4f} |")  # fmt: skip
    flag = u.get("flag")
    if flag:
        out += ["", "The flag a saved model raises (`predict --coverage`, `serve`, the page): the top probability "
                f"under the level 95% of the training images reach out-of-fold ({flag['threshold']:.3f}); it accepts "
                f"{flag['known_accepted']:.1%} of known test images and flags {flag['near_flagged']:.1%} of near and "
                f"{flag['far_flagged']:.1%} of far unknowns."]  # fmt: skip
    out += _fit_table(r.get("fit"))
    out += ["", f"Headline: `{json.dumps(r['headline'])}`. Command: `{r['command']}`", ""]
    return out


def _fit_table(fit: dict | None) -> list[str]:
    if not fit:
        return []
    out = ["", "`fit`'s own model at 5 minutes (bench.suite's runs, seeds 0-2), calibrated by `fit` on out-of-fold "
           "probabilities over its training images, scored on the test split (cub100-LT: by bands of training "
           "counts).", "",
           "| run | calibration | test top-1 | coverage at 90% (set size) | at 95% (set size) | few-shot 90% / 95% |",
           "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for run, row in fit.items():
        if "calibration" not in row:
            continue
        a, b = row["0.9"], row["0.95"]
        few = "" if a["few_shot_coverage"] is None else f"{a['few_shot_coverage']:.4f} / {b['few_shot_coverage']:.4f}"
        at = [f"{r['coverage']:.4f} ({r['mean_set_size']:.2f})" for r in (a, b)]
        out.append(f"| {run} | {row['calibration']} | {row['test_top1']:.4f} | {at[0]} | {at[1]} | {few} |")
    for data in ("cub100", "cub100-lt10"):
        if data in fit:
            a, b = fit[data]["0.9"], fit[data]["0.95"]
            fa, fb = a["few_shot_gap_points"], b["few_shot_gap_points"]
            few = "" if fa is None else f"{fa:+.2f} / {fb:+.2f} points"
            out.append(f"| {data}, mean of {fit[data]['seeds']} | | | {a['gap_points']:+.2f} points | "
                       f"{b['gap_points']:+.2f} points | {few} |")  # fmt: skip
    return out


if __name__ == "__main__":
    main()
