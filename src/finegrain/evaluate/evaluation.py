"""`finegrain evaluate MODEL [MODEL...] DATA`: one model or an ensemble, with TTA, on a labelled split.

Writes to the output folder (each file atomically): metrics.json (the summary of evaluate/summary.py, the TTA,
timing, skipped files, the resolved settings), predictions.csv (path, true, predicted, probability, top-5),
confusion.csv, reliability.png (the reliability diagram), proba.npz (probabilities, labels, paths: what the
report and later analyses read) and config.yaml.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np

from finegrain.atomic import atomic_write, atomic_write_json, atomic_write_text
from finegrain.config import EvaluateConfig, load_splits
from finegrain.data import load_image_set
from finegrain.errors import FinegrainError
from finegrain.evaluate.inference import predict_paths
from finegrain.evaluate.plots import reliability_figure
from finegrain.evaluate.predictor import load
from finegrain.evaluate.summary import summarize
from finegrain.evaluate.tta import TTA


def samples_for_model(data: str, split: str, classes: Sequence[str], *, unknowns: list | None = None):
    """The `split` of a dataset, with labels re-indexed to the model's class order. `unknowns`: a list that receives
    the paths of images of classes the model does not know (scored for its unknown flag), instead of an error."""

    image_set = load_image_set(data)
    samples = image_set.split(split) if split in image_set.splits else None
    if samples is None:
        if image_set.splits == ["all"] and split in ("test", "all"):
            samples = image_set.split("all")
        else:
            raise FinegrainError(f"no split {split!r} in {data}; splits here: {', '.join(image_set.splits)}")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({image_set.classes[s.label] for s in samples} - index.keys())
    if unknown and unknowns is not None and len(unknown) < len({s.label for s in samples}):
        unknowns += [s.path for s in samples if image_set.classes[s.label] not in index]
        samples = [s for s in samples if image_set.classes[s.label] in index]
    elif unknown:
        raise FinegrainError(
            f"{len(unknown)} class(es) of {data} are unknown to the model (e.g. {unknown[0]!r}): "
            "evaluate on data with the classes it was trained on"
        )
    paths = [s.path for s in samples]
    labels = np.array([index[image_set.classes[s.label]] for s in samples], dtype=np.int64)
    train_counts = None
    if "train" in image_set.splits:
        counts = np.zeros(len(classes), dtype=np.int64)
        for s in image_set.split("train"):
            name = image_set.classes[s.label]
            if name in index:
                counts[index[name]] += 1
        train_counts = counts
    return paths, labels, train_counts


def scored_images(models: Sequence[str], paths: list[str], labels: np.ndarray, *, split: str, allow: bool):
    """The split contract: only images no model trained or validated on (as its run's splits.json records) are scored.

    Where some of `paths` were, the `test` split keeps the runs' recorded test images (a flat folder's seeded
    holdout); otherwise it is an error that says why, unless `allow` (then they are scored and counted).
    Returns (paths, labels [N], what metrics.json records about the choice).
    """
    records = [r for r in (load_splits(m) for m in models) if r is not None]
    info = {"split": split, "recorded_splits": [p for p, _ in records], "includes_training_images": False}
    seen = set().union(*(set(r.get("train", [])) | set(r.get("val", [])) for _, r in records))
    absolute = [os.path.abspath(p) for p in paths]
    overlap = [i for i, p in enumerate(absolute) if p in seen]
    if not overlap:
        return paths, labels, info
    if allow:
        return paths, labels, {**info, "includes_training_images": True, "training_images_scored": len(overlap)}
    test = set().union(*(set(r.get("test", [])) for _, r in records)) - seen
    keep = [i for i, p in enumerate(absolute) if p in test]
    if split == "test" and keep:
        note = f"the recorded test images of the run: {len(keep)} of the {len(paths)} found"
        return [paths[i] for i in keep], labels[keep], {**info, "selection": note}
    raise FinegrainError(
        f"{len(overlap)} of the {len(paths)} images to score trained or validated the model (recorded in "
        f"{records[0][0]}), e.g. {paths[overlap[0]]}: their scores would not be test scores; score the run's test "
        "images, or pass --allow-train-images to score them anyway (marked in metrics.json)"
    )


def evaluate_models(cfg: EvaluateConfig, *, progress: bool = True) -> dict:

    if not cfg.models:
        raise FinegrainError("give at least one model (a run folder of `finegrain train` or its model/ folder)")
    predictors = [load(m, device=cfg.device, runtime=cfg.runtime) for m in cfg.models]
    classes = predictors[0].classes
    tta = TTA.parse(cfg.tta, cfg.sizes)
    unknowns: list[str] = []  # images of classes the model does not know: scored for its unknown flag only
    paths, labels, data_counts = samples_for_model(cfg.data, cfg.split, classes, unknowns=unknowns)
    paths, labels, scored = scored_images(cfg.models, paths, labels, split=cfg.split, allow=cfg.allow_train_images)
    # training counts: what the model saw (saved with it) beats what the data folder holds
    meta_counts = predictors[0].meta.get("train_counts")
    train_counts = np.asarray(meta_counts) if meta_counts is not None else data_counts
    pred = predict_paths(
        predictors,
        paths,
        tta=tta,
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        precision=cfg.precision,
        progress=progress,
        desc="evaluate",
    )
    if len(pred.index) == 0:
        raise FinegrainError(f"none of the {len(paths)} images of {cfg.data} could be read")
    y = labels[pred.index]
    summary = summarize(
        pred.proba,
        y,
        classes,
        train_counts=train_counts,
        many=cfg.many,
        few=cfg.few,
        n_boot=cfg.bootstrap,
        seed=cfg.seed,
    )
    summary.update(
        {
            "models": list(cfg.models),
            "scored_images": scored,
            "tta": {"spec": tta.describe(), "views": tta.n_views(), **asdict(tta)},
            "seconds": round(pred.seconds, 2),
            "images_per_second": round(pred.images_per_second, 2),
            "engines": [n for p in predictors for m in getattr(p, "members", [p]) for n in m.engine_notes],
            "skipped": [{"path": p, "reason": r} for p, r in pred.skipped],
            "train_counts_from": "model" if meta_counts is not None else ("data" if data_counts is not None else None),
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
            "prediction_sets": set_coverage(predictors, pred.proba, y, train_counts, many=cfg.many, few=cfg.few),
        }
    )
    if unknowns:
        summary["unknown_classes"] = _unknown_detection(cfg, predictors, pred.proba, unknowns, progress=progress)
    if cfg.out:
        write_evaluation(cfg, summary, pred, paths, y, classes)
    return summary


def set_coverage(predictors, proba: np.ndarray, y: np.ndarray, train_counts=None, *, many=100, few=20) -> dict | None:
    """A calibrated model alone (fit's conformal.json): the empirical coverage and mean size of its prediction sets
    at 90% and 95% on these images (evaluate/conformal.py), per class and per shot band (when the training counts
    are known); None otherwise."""
    conformal = getattr(predictors[0], "conformal", None) if len(predictors) == 1 else None
    if conformal is None:
        return None
    from finegrain.data.longtail import GROUPS, shot_groups
    from finegrain.evaluate.conformal import coverage_report

    classes, out = predictors[0].classes, {}
    groups = None if train_counts is None else shot_groups(train_counts, many=many, few=few)
    for coverage in (0.9, 0.95):
        members = conformal.predict_set(proba, coverage)
        rep = coverage_report(members, y)
        sizes = members.sum(1)
        row = {"coverage": rep["coverage"], "mean_set_size": rep["mean_set_size"],
               "per_class": {classes[c]: {"coverage": v, "mean_set_size": float(sizes[y == c].mean()),
                                          "n": int((y == c).sum())} for c, v in rep["per_class"].items()}}  # fmt: skip
        if groups is not None:
            band = groups[y]
            hit = members[np.arange(len(y)), y]
            row["shot_bands"] = {
                f"{g}_shot": {"coverage": float(hit[band == g].mean()), "mean_set_size": float(sizes[band == g].mean()),
                              "n": int((band == g).sum())}
                for g in GROUPS if (band == g).any()
            }  # fmt: skip
        out[str(coverage)] = row
    return out


def _unknown_detection(cfg, predictors, known_proba: np.ndarray, unknowns: list[str], *, progress: bool) -> dict:
    """Images of classes the model does not know, against the known test images: AUROC of the unknown score (1 - the
    top probability) and the share of unknowns accepted where 95% of known images are (FPR at 95% TPR); with a
    calibrated model, the shares its flag accepts and flags."""
    from sklearn.metrics import roc_auc_score

    pred = predict_paths(predictors, unknowns, batch_size=cfg.batch_size, workers=cfg.workers,
                         precision=cfg.precision, progress=progress, desc="unknown classes")  # fmt: skip
    known, unknown = 1 - known_proba.max(1), 1 - pred.proba.max(1)
    truth = np.r_[np.zeros(len(known)), np.ones(len(unknown))]
    out = {"n_images": int(len(unknown)), "score": "1 - top probability",
           "auroc": float(roc_auc_score(truth, np.r_[known, unknown])) if len(unknown) else None,
           "fpr_at_95_tpr": float(np.mean(unknown <= np.quantile(known, 0.95))) if len(unknown) else None}  # fmt: skip
    conformal = getattr(predictors[0], "conformal", None) if len(predictors) == 1 else None
    if conformal is not None and conformal.unknown_threshold() is not None and len(unknown):
        out["flag"] = {"known_accepted": float(1 - conformal.is_unknown(known_proba).mean()),
                       "unknown_flagged": float(conformal.is_unknown(pred.proba).mean())}  # fmt: skip
    return out


def write_evaluation(cfg: EvaluateConfig, summary: dict, pred, paths, y, classes) -> None:
    import yaml

    os.makedirs(cfg.out, exist_ok=True)
    atomic_write_text(os.path.join(cfg.out, "config.yaml"), yaml.safe_dump(summary["config"], sort_keys=False))
    atomic_write_json(os.path.join(cfg.out, "metrics.json"), summary)
    kept = [paths[i] for i in pred.index]
    top = np.argsort(-pred.proba, axis=1)[:, :5]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "true", "predicted", "probability", "correct", "top5"])
    for path, t, row, p in zip(kept, y, top, pred.proba):
        w.writerow(
            [path, classes[t], classes[row[0]], f"{p[row[0]]:.6f}", int(row[0] == t), "|".join(classes[j] for j in row)]
        )
    atomic_write_text(os.path.join(cfg.out, "predictions.csv"), buf.getvalue())

    def _npz(f):
        np.savez_compressed(f, proba=pred.proba, y=y, paths=np.asarray(kept), classes=np.asarray(classes))

    atomic_write(os.path.join(cfg.out, "proba.npz"), _npz)

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["true \\ predicted", *classes])
    for name, row in zip(classes, summary["confusion_matrix"]):
        w.writerow([name, *row])
    atomic_write_text(os.path.join(cfg.out, "confusion.csv"), buf.getvalue())

    fig = reliability_figure(summary["calibration"])
    atomic_write(os.path.join(cfg.out, "reliability.png"), lambda f: fig.savefig(f, format="png", dpi=100))


def evaluate_sweep(cfg: EvaluateConfig, *, progress: bool = True, say=print) -> dict:
    """The test-resolution sweep: one evaluation per size of cfg.sweep (each in cfg.out/<size>/) and sweep.json;
    `say` gets a table line a size. Returns {size: {top1, top1_ci95, mean_per_class}}."""
    import dataclasses

    if cfg.sizes:
        raise FinegrainError("use --sweep or --sizes, not both")
    rows = {}
    say("size  top-1   [95% interval]      mean per-class")
    for size in TTA.parse("none", list(cfg.sweep)).sizes:  # checked as --sizes is
        sub = dataclasses.replace(cfg, sizes=(size,), sweep=(), out=os.path.join(cfg.out, str(size)))
        s = evaluate_models(sub, progress=progress)
        m, ci = s["metrics"], s["intervals"].get("top1") or [float("nan")] * 2
        rows[str(size)] = {"top1": m["top1"], "top1_ci95": ci, "mean_per_class": m["mean_per_class"]}
        say(f"{size:4d}  {m['top1']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]  {m['mean_per_class']:.4f}")
    atomic_write_json(os.path.join(cfg.out, "sweep.json"), {"tta": cfg.tta, "sizes": rows})
    return rows
