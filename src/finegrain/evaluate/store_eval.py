"""Classifiers on a feature store (`finegrain knn | ncm | probe STORE`, and Python): fit on the store's train split,
score its test split, write metrics, predictions and (where it is small enough) a model folder. The training split in
memory when it fits; otherwise the streaming probe (`heads/stream_probe.py`, DDP under torchrun) or k-NN over an
IVF-PQ index of the memory map, re-ranked exactly from it."""

from __future__ import annotations

import os
from dataclasses import dataclass

from finegrain.config import EvalConfig, config_dict
from finegrain.errors import FinegrainError
from finegrain.runtime.distributed import torchrun_context


@dataclass(frozen=True)
class StoreEvalResult:
    """metrics (as written to metrics.json), the output folder, the model folder (None: not saved) and one line
    that says it (empty on a torchrun rank other than 0)."""

    metrics: dict
    out: str
    model_dir: str | None
    line: str


def evaluate_store(cfg: EvalConfig) -> StoreEvalResult:
    """cfg.classifier (knn | ncm | probe) on cfg.store: in memory when its training split fits, else from disk."""
    if cfg.classifier == "probe" and probe_solver(cfg) == "stream":
        return _stream_probe(cfg)
    if cfg.classifier == "knn" and probe_solver(cfg) != "lbfgs":  # lbfgs: the training split fits in RAM
        return _disk_knn(cfg)
    return _in_memory(cfg)


def _in_memory(cfg: EvalConfig) -> StoreEvalResult:
    """Fit the configured classifier on the store's train split (in memory), score the test split, write the outputs."""
    from finegrain.embed import FeatureStore
    from finegrain.evaluate.representations import (
        fit_and_score,
        fitted_state,
        train_test_from_store,
        write_outputs,
    )
    from finegrain.heads import create_classifier
    from finegrain.heads.to_model import save_store_model

    store = FeatureStore.open(cfg.store)
    pooling = cfg.pooling or store.poolings[0]
    train, test, test_name = train_test_from_store(
        store,
        pooling=pooling,
        train_split=cfg.train_split,
        test_split=cfg.test_split,
        test_size=cfg.test_size,
        seed=cfg.seed,
    )
    if len(set(train.y.tolist())) < 2:
        raise FinegrainError(
            f"{cfg.store}: the {cfg.train_split} split holds one class ({store.classes[int(train.y[0])]!r}); "
            "a classifier needs at least 2 classes"
        )
    if cfg.classifier == "knn":
        clf = create_classifier(
            "knn", n_neighbors=cfg.k, metric=cfg.metric, weights=cfg.weights, temperature=cfg.temperature
        )
    elif cfg.classifier == "ncm":
        clf = create_classifier("ncm", metric=cfg.metric)
    else:
        clf = create_classifier(cfg.classifier, random_state=cfg.seed)
    metrics, scores, norm = fit_and_score(clf, train, test, normalizer=cfg.norm, classes=store.classes)
    name = f"{cfg.classifier}{cfg.k if cfg.classifier == 'knn' else ''}-{cfg.norm}-{pooling}"
    out = cfg.out or os.path.join(cfg.store, "eval", name.replace(":", "_"))
    extra = {k: getattr(clf, k) for k in ("C_",) if hasattr(clf, k)}
    metrics = {**metrics, "classifier": name, "test_split": test_name, "n_train": len(train.y), **extra}
    model_dir = save_store_model(
        store, clf, norm, os.path.join(out, "model"), pooling=pooling, train_X=train.X, train_y=train.y,
        extra={"normalizer_name": cfg.norm, "metrics": {k: metrics[k] for k in ("top1", "mean_per_class")}},
    )  # fmt: skip
    write_outputs(
        out,
        metrics=metrics,
        config={**config_dict(cfg), "pooling": pooling, "out": out, "backbone": store.meta["backbone"]},
        test=test,
        scores=scores,
        classes=store.classes,
        state=fitted_state(norm, clf),
    )
    line = (
        f"{name}: top-1 {metrics['top1']:.4f}  top-5 {metrics['top5']:.4f}  "
        f"mean per-class {metrics['mean_per_class']:.4f}  (train {len(train.y)}, test {len(test.y)}) -> {out}; "
        f"model: {model_dir}"
    )
    return StoreEvalResult(metrics, out, model_dir, line)


def probe_solver(cfg: EvalConfig) -> str:
    """lbfgs when the training split fits in memory, else stream (`heads.stream_probe.choose_solver`)."""
    from finegrain.embed import FeatureStore
    from finegrain.heads.stream_probe import choose_solver

    store = FeatureStore.open(cfg.store)
    n_train = sum(e.split == cfg.train_split for e in store.index()) or len(store.index())
    return choose_solver(cfg.solver, n_train, store.dim_of(cfg.pooling))


def _stream_probe(cfg: EvalConfig) -> StoreEvalResult:
    """The streaming probe (heads/stream_probe.py) on features left on disk; DDP across ranks under torchrun."""
    import numpy as np

    from finegrain.embed import FeatureStore, create_normalizer
    from finegrain.evaluate.metrics import classification_metrics
    from finegrain.evaluate.representations import SplitData, fitted_state, scores_matrix, write_outputs
    from finegrain.heads.stream_probe import StreamingProbe, lazy_splits
    from finegrain.heads.to_model import save_store_model

    if cfg.norm not in ("none", "l2"):
        raise FinegrainError(f"--solver stream takes --norm l2 or none (row-wise), not {cfg.norm!r}")
    dist = torchrun_context("cpu")
    store = FeatureStore.open(cfg.store)
    pooling = cfg.pooling or store.poolings[0]
    train, test, test_name = lazy_splits(store, pooling, train_split=cfg.train_split, test_split=cfg.test_split,
                                         test_size=cfg.test_size, seed=cfg.seed)  # fmt: skip
    clf = StreamingProbe(normalize="l2" if cfg.norm == "l2" else None, random_state=cfg.seed).fit(*train[:2])
    if dist is not None:
        dist.close()
        if not dist.is_main:
            return StoreEvalResult({}, "", None, "")
    test_data = SplitData(test[0], test[1], test[2])
    scores = scores_matrix(clf, test[0], len(store.classes))
    # row-wise: nothing learned
    norm = create_normalizer(cfg.norm).fit(np.zeros((1, store.dim_of(pooling)), np.float32))
    name = f"probe-stream-{cfg.norm}-{pooling}"
    out = cfg.out or os.path.join(cfg.store, "eval", name)
    metrics = {**classification_metrics(scores, test[1]), "classifier": name, "test_split": test_name,
               "n_train": len(train[1]), "C_": clf.C_, "solver": "stream"}  # fmt: skip
    model_dir = save_store_model(store, clf, norm, os.path.join(out, "model"), pooling=pooling, train_X=None,
                                 train_y=train[1], extra={"normalizer_name": cfg.norm})  # fmt: skip
    write_outputs(out, metrics=metrics, test=test_data, scores=scores, classes=store.classes,
                  config={**config_dict(cfg), "pooling": pooling, "out": out, "backbone": store.meta["backbone"]},
                  state=fitted_state(norm, clf))  # fmt: skip
    line = (f"{name}: top-1 {metrics['top1']:.4f}  top-5 {metrics['top5']:.4f}  (train {len(train[1])}, "
            f"test {len(test[1])}, C {clf.C_}) -> {out}; model: {model_dir}")  # fmt: skip
    return StoreEvalResult(metrics, out, model_dir, line)


def _disk_knn(cfg: EvalConfig) -> StoreEvalResult:
    """k-NN on a store larger than memory: IVF-PQ over the training rows' memory map, re-ranked exactly from it.
    Writes metrics and predictions; no model folder (a k-NN model would copy the whole gallery)."""
    import numpy as np

    from finegrain.embed import FeatureStore
    from finegrain.evaluate.metrics import classification_metrics
    from finegrain.evaluate.representations import SplitData, write_outputs
    from finegrain.heads import create_classifier
    from finegrain.heads.stream_probe import lazy_splits

    if cfg.norm not in ("none", "l2"):
        raise FinegrainError(f"a store larger than memory takes --norm l2 or none (row-wise), not {cfg.norm!r}")
    store = FeatureStore.open(cfg.store)
    pooling = cfg.pooling or store.poolings[0]
    (Xtr, ytr, _), (Xte, yte, pte), test_name = lazy_splits(store, pooling, train_split=cfg.train_split,
        test_split=cfg.test_split, test_size=cfg.test_size, seed=cfg.seed)  # fmt: skip
    clf = create_classifier("knn", n_neighbors=cfg.k, metric=cfg.metric, weights=cfg.weights,
                            temperature=cfg.temperature, index="ivfpq").fit(Xtr, ytr)  # fmt: skip
    scores = np.zeros((len(yte), len(store.classes)))
    for start in range(0, len(yte), 4096):
        scores[start : start + 4096, clf.classes_] = clf.predict_proba(Xte[start : start + 4096])
    name = f"knn{cfg.k}-ivfpq-{cfg.norm}-{pooling}"
    out = cfg.out or os.path.join(cfg.store, "eval", name)
    metrics = {**classification_metrics(scores, yte), "classifier": name, "test_split": test_name, "n_train": len(ytr)}
    write_outputs(out, metrics=metrics, test=SplitData(None, yte, pte), scores=scores, classes=store.classes,
                  config={**config_dict(cfg), "pooling": pooling, "out": out}, state={})  # fmt: skip
    line = f"{name}: top-1 {metrics['top1']:.4f} (train {len(ytr)}, test {len(yte)}, IVF-PQ) -> {out}"
    return StoreEvalResult(metrics, out, None, line)
