"""Everything `finegrain evaluate` reports about a set of predictions, on arrays (probabilities [N, C], labels [N]).

Headline numbers come with percentile bootstrap intervals (images resampled with replacement, the same
resamples for every metric), because a test set of a few thousand images moves top-1 by about a point.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from finegrain.evaluate.longtail import shot_accuracy
from finegrain.evaluate.metrics import classification_metrics, per_class_accuracy, true_class_rank


def most_confused_pairs(cm: np.ndarray, classes: Sequence[str], k: int = 10) -> list[dict]:
    """The k largest off-diagonal cells: true class, predicted class, count and share of the true class."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:k]
    out = []
    for t, p in zip(*np.unravel_index(flat, off.shape)):
        if off[t, p] == 0:
            break
        out.append(
            {
                "true": classes[t],
                "predicted": classes[p],
                "true_index": int(t),
                "predicted_index": int(p),
                "count": int(off[t, p]),
                "share_of_true": float(off[t, p] / max(cm[t].sum(), 1)),
            }
        )
    return out


def calibration(proba: np.ndarray, y: np.ndarray, n_bins: int = 15) -> dict:
    """Expected calibration error (Guo et al., 2017; equal-width confidence bins) and the reliability diagram."""
    conf = proba.max(1)
    correct = proba.argmax(1) == y
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = _bin_index(conf, n_bins)
    bins, ece = [], 0.0
    for b in range(n_bins):
        m = which == b
        n = int(m.sum())
        acc = float(correct[m].mean()) if n else None
        mean_conf = float(conf[m].mean()) if n else None
        if n:
            ece += n / len(y) * abs(acc - mean_conf)
        bins.append(
            {"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": n, "accuracy": acc, "confidence": mean_conf}
        )
    return {"ece": float(ece), "bins": bins, "n_bins": n_bins}


def _bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bins closed on the right, (lo, hi], the first one [0, hi]."""
    return np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)


def _ece_fast(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    which = _bin_index(conf, n_bins)
    gap = np.abs(np.bincount(which, correct, n_bins) - np.bincount(which, conf, n_bins))
    return float(gap.sum() / max(len(conf), 1))


def summarize(
    proba: np.ndarray,
    y: np.ndarray,
    classes: Sequence[str],
    *,
    train_counts: Sequence[int] | None = None,
    many: int = 100,
    few: int = 20,
    n_boot: int = 1000,
    seed: int = 0,
    ece_bins: int = 15,
    confused_k: int = 10,
) -> dict:
    """Probabilities [N, C] (rows sum to 1) and labels [N] -> the evaluation report as a JSON-ready dict.

    Headline: top-1, top-5, mean per-class accuracy (= balanced accuracy: the mean of per-class recalls),
    macro F1, ECE, and many/medium/few-shot accuracy when the training counts are known (Kang et al. thresholds:
    many > 100, few < 20 training images), each with a 95% percentile bootstrap interval.
    """
    proba, y = np.asarray(proba, dtype=np.float64), np.asarray(y)
    if len(y) == 0:
        raise ValueError("nothing to summarize: no predictions")
    n_classes = proba.shape[1]
    base = classification_metrics(proba, y)
    pred = proba.argmax(1)
    labels = np.arange(n_classes)  # every class, also those absent from y and pred
    cm = confusion_matrix(y, pred, labels=labels)
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    present = support > 0
    cal = calibration(proba, y, ece_bins)
    headline = {
        "top1": base["top1"],
        "top5": base["top5"],
        "mean_per_class": base["mean_per_class"],
        "balanced_accuracy": float(recall[present].mean()),  # balanced_accuracy_score, without its warning
        "macro_f1": float(f1[present].mean()),  # over the classes in y: an only-predicted class is not a zero
        "ece": cal["ece"],
    }
    shots = None
    if train_counts is not None:
        shots = partial(shot_accuracy, train_counts=train_counts, many=many, few=few)
        headline.update(shots(per_class_accuracy(y, pred, n_classes)))

    intervals = _bootstrap(proba, y, pred, n_classes, shots, n_boot=n_boot, seed=seed, ece_bins=ece_bins)
    return {
        "n": int(len(y)),
        "classes": list(classes),
        "metrics": headline,
        "intervals": intervals,
        "bootstrap": {"resamples": n_boot, "level": 0.95, "seed": seed},
        "shot_thresholds": {"many": f"> {many}", "few": f"< {few}"} if train_counts is not None else None,
        "per_class": _per_class_rows(classes, precision, recall, f1, support, train_counts),
        "confusion_matrix": cm.tolist(),
        "most_confused": most_confused_pairs(cm, list(classes), confused_k),
        "calibration": cal,
    }


def _per_class_rows(classes, precision, recall, f1, support, train_counts) -> list[dict]:
    """One JSON row a class: precision, recall, F1, support (and training images when known)."""
    return [
        {
            "class": c,
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
            **({"train_count": int(train_counts[i])} if train_counts is not None else {}),
        }
        for i, c in enumerate(classes)
    ]


def _bootstrap(proba, y, pred, n_classes, shots, *, n_boot, seed, ece_bins) -> dict[str, list[float]]:
    """95% percentile intervals of the headline metrics over `n_boot` resamples of the images.

    shots: per-class accuracy [C] -> the shot-group accuracies (shot_accuracy with the training counts), or None.
    """
    if n_boot <= 0 or len(y) == 0:
        return {}
    rng = np.random.default_rng(seed)
    rank = true_class_rank(proba, y)
    hit1, hit5 = rank < 1, rank < min(5, n_classes)
    conf = proba.max(1)
    stats: dict[str, list[float]] = {k: [] for k in ("top1", "top5", "mean_per_class", "ece")}
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        yy, h1 = y[idx], hit1[idx]
        stats["top1"].append(h1.mean())
        stats["top5"].append(hit5[idx].mean())
        total = np.bincount(yy, minlength=n_classes)
        hits = np.bincount(yy, h1, minlength=n_classes)
        with np.errstate(invalid="ignore", divide="ignore"):
            acc = np.where(total > 0, hits / np.maximum(total, 1), np.nan)
        stats["mean_per_class"].append(np.nanmean(acc))
        stats["ece"].append(_ece_fast(conf[idx], h1.astype(float), ece_bins))
        if shots is not None:
            for k, v in shots(acc).items():
                stats.setdefault(k, []).append(np.nan if v is None else v)
    out = {}
    for k, v in stats.items():
        v = np.asarray(v, dtype=float)
        v = v[~np.isnan(v)]
        out[k] = [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) else None
    return out
