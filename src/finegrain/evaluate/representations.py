"""Classifiers on stored representations: fit on one split, score another (the layer above the metrics core)."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np

from finegrain.atomic import atomic_write, atomic_write_json, atomic_write_text
from finegrain.data.splits import stratified_split
from finegrain.embed.normalize import create_normalizer
from finegrain.embed.store import FeatureStore
from finegrain.errors import FinegrainError
from finegrain.evaluate.metrics import classification_metrics


@dataclass
class SplitData:
    X: np.ndarray  # [N, D]
    y: np.ndarray  # [N]
    paths: list[str]


def train_test_from_store(
    store: FeatureStore,
    *,
    pooling: str | None = None,
    train_split: str = "train",
    test_split: str | None = None,
    test_size: float = 0.2,
    seed: int = 0,
) -> tuple[SplitData, SplitData, str]:
    """The fitting and scoring splits of a store. With no split folders, a stratified seeded holdout of "all"."""
    splits = sorted({e.split for e in store.index()})
    if splits == ["all"]:
        X, y, paths = store.split("all", pooling)
        tr, te = stratified_split(y, test_size=test_size, seed=seed)
        if len(te) == 0:
            raise FinegrainError("too few images to hold any out for testing: add images or a test/ folder")
        return (
            SplitData(X[tr], y[tr], [paths[i] for i in tr]),
            SplitData(X[te], y[te], [paths[i] for i in te]),
            f"holdout of 'all' (test_size={test_size}, seed={seed})",
        )
    if test_split is None:
        test_split = next((s for s in ("test", "val") if s in splits and s != train_split), None)
        if test_split is None:
            raise FinegrainError(f"no test or val split in {store.root} (splits: {splits}); pass --test-split")
    Xtr, ytr, ptr = store.split(train_split, pooling)
    Xte, yte, pte = store.split(test_split, pooling)
    return SplitData(Xtr, ytr, ptr), SplitData(Xte, yte, pte), test_split


def scores_matrix(clf, X: np.ndarray, n_classes: int) -> np.ndarray:
    """predict_proba [N, C_fit] -> [N, n_classes] indexed by class id (classes absent from training get 0)."""
    proba = clf.predict_proba(X)
    out = np.zeros((len(X), n_classes), dtype=np.float64)
    out[:, np.asarray(clf.classes_, dtype=np.int64)] = proba
    return out


def fit_and_score(
    clf, train: SplitData, test: SplitData, *, normalizer: str = "none", classes: list[str]
) -> tuple[dict, np.ndarray, object]:
    """Fit `normalizer` then `clf` on train only, score test. Returns (metrics, scores [N, C], fitted normalizer)."""
    norm = create_normalizer(normalizer).fit(train.X)
    clf.fit(norm.transform(train.X), train.y)
    scores = scores_matrix(clf, norm.transform(test.X), len(classes))
    metrics = classification_metrics(scores, test.y)
    return metrics, scores, norm


def write_predictions(path: str, test: SplitData, scores: np.ndarray, classes: list[str], k: int = 5) -> None:
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "true", "pred", "score", f"top{k}"])
    top = np.argsort(-scores, axis=1)[:, :k]
    for p, y, row, s in zip(test.paths, test.y, top, scores):
        w.writerow([p, classes[y], classes[row[0]], f"{s[row[0]]:.4f}", "|".join(classes[j] for j in row)])
    atomic_write_text(path, buf.getvalue())


def fitted_state(normalizer, clf) -> dict[str, np.ndarray]:
    """Learned arrays of a fitted normalizer and classifier (attributes ending in `_`), for np.savez.

    k-NN's gallery is the training split of the store itself, so it is not copied; everything else is.
    """
    out = {f"normalizer.{k}": np.asarray(v) for k, v in normalizer.get_state().items()}
    for k, v in vars(clf).items():
        if k.endswith("_") and not k.startswith("_") and isinstance(v, np.ndarray | float | int | np.number):
            out[f"classifier.{k}"] = np.asarray(v)
    return out


def write_outputs(
    out_dir: str,
    *,
    metrics: dict,
    config: dict,
    test: SplitData,
    scores: np.ndarray,
    classes: list[str],
    state: dict[str, np.ndarray] | None = None,
) -> None:
    """metrics.json, config.json, predictions.csv and (when given) the fitted state as model.npz, all atomic."""
    os.makedirs(out_dir, exist_ok=True)
    if state:
        atomic_write(os.path.join(out_dir, "model.npz"), lambda f: np.savez(f, classes=np.array(classes), **state))
    atomic_write_json(os.path.join(out_dir, "metrics.json"), metrics)
    atomic_write_json(os.path.join(out_dir, "config.json"), config)
    write_predictions(os.path.join(out_dir, "predictions.csv"), test, scores, classes)
