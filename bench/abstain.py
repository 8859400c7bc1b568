"""Knowing when not to answer (issue 26): split-conformal coverage and set size, class-conditional coverage of the
few-shot classes of a long-tailed set, and unknown-class detection (near: bird species never trained on; far: CIFAR-10
photos), on the frozen features of bench.suite's hand baseline (lite0, timm eval view, GAP) with a default
scikit-learn probe (`LogisticRegression(max_iter=1000)`).

Protocol: the probe learns on the train split; the test split is cut in two at random (5 seeds), one half calibrates
(evaluate/conformal.py), the other is scored: empirical coverage, mean set size. Unknowns: the probe and the k-NN
distance (k = 10, cosine; Sun et al. 2022) learn on cub100's first 50 species; test images of those 50 are known,
those of the other 50 (near) and CIFAR-10 test images (far) unknown; AUROC and the share of unknowns accepted when
95% of known images are (FPR at 95% TPR).

    python -m bench.abstain          # needs `python -m bench.suite --hand-only` (the stores in bench/cache)
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from bench.common import ROOT, command_line, machine, record
from finegrain.embed import FeatureStore
from finegrain.evaluate.conformal import Conformal, UnknownScore, coverage_report, energy

STORES = os.path.join(ROOT, "bench", "cache", "suite-hand")
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


def coverage_rows(name: str, *, classwise: bool = False) -> dict:
    proba, y, counts = _proba(name)
    rows = {}
    for coverage in (0.9, 0.95):
        runs = []
        for seed in SEEDS:
            perm = np.random.default_rng(seed).permutation(len(y))
            cal, ev = perm[: len(y) // 2], perm[len(y) // 2 :]
            conf = Conformal("lac", classwise=classwise).fit(proba[cal], y[cal])
            rep = coverage_report(conf.predict_set(proba[ev], coverage), y[ev])
            few = [v for c, v in rep["per_class"].items() if counts[c] <= FEW_SHOT]
            runs.append({"coverage": rep["coverage"], "mean_set_size": rep["mean_set_size"],
                         "few_shot_coverage": float(np.mean(few)) if few else None})  # fmt: skip
        mean = {k: float(np.mean([r[k] for r in runs])) for k in ("coverage", "mean_set_size")}
        few = [r["few_shot_coverage"] for r in runs if r["few_shot_coverage"] is not None]
        few_mean = float(np.mean(few)) if few else None
        rows[str(coverage)] = {
            **mean, "coverage_std": float(np.std([r["coverage"] for r in runs])),
            "gap_points": round(100 * (mean["coverage"] - coverage), 2), "few_shot_coverage": few_mean,
            "few_shot_gap_points": round(100 * (few_mean - coverage), 2) if few else None,
        }  # fmt: skip
        print(name, "classwise" if classwise else "marginal", coverage, rows[str(coverage)], flush=True)
    return {"method": "lac", "classwise": classwise, "seeds": list(SEEDS), "rows": rows}


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


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    cub = coverage_rows("cub100")
    lt = {"marginal": coverage_rows("cub100-lt10"), "classwise": coverage_rows("cub100-lt10", classwise=True)}
    unknown = unknown_rows()
    headline = {
        "coverage_gap_90_points": cub["rows"]["0.9"]["gap_points"],
        "coverage_gap_95_points": cub["rows"]["0.95"]["gap_points"],
        "mean_set_size_95": round(cub["rows"]["0.95"]["mean_set_size"], 2),
        "lt_few_coverage_gap_points": lt["classwise"]["rows"]["0.9"]["few_shot_gap_points"],
        "near_unknown_auroc": round(unknown["near"]["auroc"], 4),
        "far_unknown_auroc": round(unknown["far"]["auroc"], 4),
    }
    print("headline", headline)
    doc = {"cub100": cub, "cub100-lt10": lt, "unknown": unknown, "headline": headline, "command": command_line()}
    record("abstain.json", "frozen-probe", {**doc, "machine": machine()})


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
    runs = [("cub100", r["cub100"]), ("cub100-LT", r["cub100-lt10"]["marginal"]),
            ("cub100-LT", r["cub100-lt10"]["classwise"])]  # fmt: skip
    for name, run in runs:
        for nominal, row in run["rows"].items():
            few = row.get("few_shot_coverage")
            how = "class by class (marginal below n)" if run["classwise"] else "marginal"
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
    out += ["", f"Headline: `{json.dumps(r['headline'])}`. Command: `{r['command']}`", ""]
    return out


if __name__ == "__main__":
    main()
