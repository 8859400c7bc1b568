"""`finegrain report RUN`: one self-contained HTML page about a training run.

Sections: data summary (class-count histogram), resolved config, learning curves, metrics with bootstrap intervals
and the reliability diagram, confusion-matrix heatmap, per-class accuracy against training frequency, most-confused
pairs with example images, CAM gallery, nearest training images for mistakes, and a 2-D map of the representations.
One pass over the test split gives the model's probabilities and pooled features; one over train gives the
features the nearest-neighbour gallery searches.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile

import numpy as np
import yaml

from finegrain.atomic import atomic_write_json
from finegrain.data import load_image
from finegrain.errors import FinegrainError
from finegrain.evaluate.evaluation import samples_for_model, scored_images, set_coverage
from finegrain.evaluate.inference import predict_paths
from finegrain.evaluate.longtail import per_class_vs_frequency_plot
from finegrain.evaluate.plots import new_figure, reliability_figure
from finegrain.evaluate.predictor import load
from finegrain.evaluate.summary import summarize
from finegrain.evaluate.tta import TTA
from finegrain.explain import explain_images, overlay
from finegrain.heads.index import build_index
from finegrain.report.html import (
    Section,
    escape,
    figure_to_img,
    pil_to_img,
    png_to_img,
    raw_table,
    render_report,
    table,
)


def features_and_proba(predictor, paths, *, batch_size=32, workers=None, progress=False, desc="report"):
    """One plain pass: pooled features [N, D], probabilities [N, C], kept positions [N], skipped [(path, why)]. An
    ensemble of several trunks has no single feature space: its probabilities, and the features of its first member
    (for the map and the nearest training images)."""
    kw = dict(batch_size=batch_size, workers=workers, channels_last=False, progress=progress, desc=desc)
    several = len(getattr(predictor, "runners", ())) > 1
    p = predict_paths(predictor.members[0] if several else predictor, paths, features=True, **kw)
    if not len(p.index):
        raise FinegrainError("no image of the split could be read")
    if several:
        whole = predict_paths(predictor, [paths[i] for i in p.index], **kw)  # decodes the same files
        return p.features[whole.index], whole.proba, p.index[whole.index], p.skipped + whole.skipped
    return p.features, p.proba, p.index, p.skipped


def _thumb(path, size=128) -> str:
    try:
        return pil_to_img(load_image(path, min_side=size), alt=os.path.basename(path), max_side=size)
    except Exception:  # noqa: BLE001 - an unreadable file shows as text, the report still renders
        return escape(f"(unreadable: {os.path.basename(path)})")


def _short(name: str) -> str:
    return name.split(".", 1)[1] if "." in name and name.split(".", 1)[0].isdigit() else name


# ---- sections ------------------------------------------------------------------------------------------------------
def _data_section(classes, train_counts, n_test, skipped) -> Section:
    rows = [["classes", len(classes)], ["test images evaluated", n_test]]
    body = ""
    if train_counts is not None:
        counts = np.asarray(train_counts)
        rows += [
            ["training images", int(counts.sum())],
            ["images per class (min / median / max)", f"{counts.min()} / {int(np.median(counts))} / {counts.max()}"],
            ["imbalance ratio (max / min)", round(float(counts.max() / max(counts.min(), 1)), 2)],
        ]
        fig = new_figure(7.5, 3.2)
        ax = fig.add_subplot()
        order = np.argsort(-counts, kind="stable")
        ax.bar(np.arange(len(counts)), counts[order], width=1.0, color="tab:blue")
        ax.set_xlabel("classes, sorted by training images")
        ax.set_ylabel("training images")
        ax.set_title("class-count histogram", fontsize=10)
        fig.tight_layout()
        body = figure_to_img(fig, alt="class-count histogram")
    rows.append(["files skipped (unreadable)", len(skipped)])
    html = table(["statistic", "value"], rows) + body
    if skipped:
        html += "<h3>Skipped files</h3>" + table(["file", "reason"], [[p, r] for p, r in skipped[:50]])
    return Section("data", "Data", html)


def _config_section(run) -> Section:
    path = os.path.join(run, "config.yaml")
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else "(no config.yaml in the run folder)"
    return Section("config", "Resolved config", f"<pre>{escape(text)}</pre>")


def _fit_section(fit: dict, run: str) -> Section:
    """A `fit` folder's choice first: what was chosen and why, its estimate and test score, the time, the
    leaderboard (best 20 rows) and what was skipped."""
    test = (fit.get("test") or {}).get("metrics") or {}
    rows = [
        ["chosen", fit["chosen"]],
        ["selected by", f"{fit.get('estimate')} top-1 {fit.get('score_top1', float('nan')):.4f}"],
        ["reason", fit.get("reason", "")],
        ["test top-1 (scored once, at the end)", test.get("top1")],
        ["time", f"{fit.get('seconds', 0) / 60:.1f} of {fit.get('budget_min')} min"],
    ]
    html = table(["", ""], rows)
    path = os.path.join(run, "leaderboard.csv")
    if os.path.exists(path):
        with open(path, encoding="utf-8", newline="") as f:
            board = list(csv.DictReader(f))
        cols = ["name", "kind", "estimate", "score_top1", "val_top1", "oof_top1", "seconds"]
        html += f"<h3>Leaderboard ({len(board)} candidates, best 20)</h3>"
        html += table(cols, [[_number(r.get(c)) for c in cols] for r in board[:20]])
    skipped = fit.get("skipped_candidates") or []
    if skipped:
        html += f"<h3>Skipped ({len(skipped)})</h3>"
        html += table(["candidate or view", "why"], [[s.get("candidate") or s.get("view"), s["why"]] for s in skipped])
    return Section("fit", "fit: the choice and its leaderboard", html)


def _number(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def _curves_section(run) -> Section:
    path = os.path.join(run, "metrics.csv")
    tuned = os.path.join(run, "candidates", "finetune", "metrics.csv")  # a fit folder: its fine-tune's curves
    path = tuned if not os.path.exists(path) and os.path.exists(tuned) else path
    if not os.path.exists(path):
        return Section("curves", "Learning curves", "<p>No metrics.csv in the run folder.</p>")
    rows = list(csv.DictReader(open(path, encoding="utf-8")))
    ep = [int(r["epoch"]) for r in rows]

    def col(k):
        return [float(r[k]) if r.get(k) not in (None, "", "nan") else np.nan for r in rows]

    fig = new_figure(9, 3.4)
    a1, a2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    a1.plot(ep, col("train_loss"), marker="o", label="train loss")
    if not np.all(np.isnan(col("val_loss"))):
        a1.plot(ep, col("val_loss"), marker="o", label="val loss")
    a2.plot(ep, col("train_top1"), marker="o", label="train top-1")
    if not np.all(np.isnan(col("val_top1"))):
        a2.plot(ep, col("val_top1"), marker="o", label="val top-1")
    for a, t in ((a1, "loss"), (a2, "accuracy")):
        a.set_xlabel("epoch")
        a.set_title(t, fontsize=10)
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    return Section("curves", "Learning curves", figure_to_img(fig, alt="learning curves"))


def _metrics_section(summary) -> Section:
    m, ci = summary["metrics"], summary["intervals"]
    names = {
        "top1": "top-1",
        "top5": "top-5",
        "mean_per_class": "mean per-class (balanced) accuracy",
        "macro_f1": "macro F1",
        "ece": "expected calibration error",
        "many_shot": "many-shot accuracy",
        "medium_shot": "medium-shot accuracy",
        "few_shot": "few-shot accuracy",
    }
    rows = []
    for k, label in names.items():
        if k in m:
            lo_hi = ci.get(k)
            rows.append([label, m[k], f"{lo_hi[0]:.4f} – {lo_hi[1]:.4f}" if lo_hi else None])
    fig = reliability_figure(summary["calibration"])
    n_boot = summary["bootstrap"]["resamples"]
    html = table(["metric", "value", f"95% interval ({n_boot} bootstrap resamples)"], rows) + figure_to_img(
        fig, alt="reliability diagram"
    )
    return Section("metrics", "Metrics", html)


def _sets_section(sets: dict) -> Section:
    """A calibrated model's prediction sets on the scored images: coverage and mean size at 90% and 95%, by shot
    band, and the classes least covered at 90% (evaluate.evaluation.set_coverage)."""
    rows = []
    for nominal, row in sets.items():
        rows.append([f"{float(nominal):.0%}", "all classes", row["coverage"], row["mean_set_size"], None])
        for band, b in row.get("shot_bands", {}).items():
            rows.append([f"{float(nominal):.0%}", band.replace("_", "-"), b["coverage"], b["mean_set_size"], b["n"]])
    html = ("<p>The set a calibrated model gives holds the true class with the stated probability (split-conformal, "
            "calibrated by fit on out-of-fold probabilities; on long-tailed data by bands of training counts): "
            "what it held on these images.</p>")  # fmt: skip
    html += table(["nominal coverage", "classes", "coverage", "mean set size", "images"], rows)
    worst = sorted(sets["0.9"]["per_class"].items(), key=lambda kv: (kv[1]["coverage"], kv[0]))[:10]
    html += "<h3>Classes least covered at 90%</h3>" + table(
        ["class", "coverage", "mean set size", "test images"],
        [[_short(c), r["coverage"], r["mean_set_size"], r["n"]] for c, r in worst],
    )
    return Section("sets", "Prediction sets", html)


def _confusion_section(summary, classes) -> Section:
    cm = np.asarray(summary["confusion_matrix"], dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = min(11.0, 3 + 0.08 * len(classes))
    fig = new_figure(size, size * 0.9)
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if len(classes) <= 30:
        ax.set_xticks(range(len(classes)), [_short(c) for c in classes], rotation=90, fontsize=7)
        ax.set_yticks(range(len(classes)), [_short(c) for c in classes], fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.tight_layout()
    worst = sorted(summary["per_class"], key=lambda r: (r["recall"], r["class"]))[:10]
    rows = [[_short(r["class"]), r["precision"], r["recall"], r["f1"], r["support"]] for r in worst]
    html = figure_to_img(fig, alt="confusion matrix") + "<h3>Weakest classes</h3>"
    html += table(["class", "precision", "recall", "F1", "test images"], rows)
    return Section("confusion", "Confusion matrix", html)


def _frequency_section(summary, train_counts) -> Section:
    if train_counts is None:
        return Section("frequency", "Accuracy against training frequency", "<p>Training counts unknown.</p>")
    acc = [r["recall"] if r["support"] else np.nan for r in summary["per_class"]]
    many = int(summary["shot_thresholds"]["many"].split()[-1])
    few = int(summary["shot_thresholds"]["few"].split()[-1])
    with tempfile.TemporaryDirectory() as d:
        path = per_class_vs_frequency_plot(acc, train_counts, os.path.join(d, "f.png"), many=many, few=few)
        png = path.read_bytes()
    return Section("frequency", "Accuracy against training frequency", png_to_img(png, alt="per-class accuracy"))


def _confused_section(summary, classes, test_paths, y, pred, train_by_class) -> Section:
    rows = []
    for pair in summary["most_confused"][:8]:
        t, p = pair["true_index"], pair["predicted_index"]
        wrong = [i for i in np.nonzero((y == t) & (pred == p))[0][:2]]
        example = train_by_class.get(p, [])[:1]
        rows.append(
            [
                _short(pair["true"]),
                _short(pair["predicted"]),
                pair["count"],
                " ".join(_thumb(test_paths[i], 112) for i in wrong),
                " ".join(_thumb(e, 112) for e in example) or "–",
            ]
        )
    if not rows:
        return Section("confused", "Most-confused pairs", "<p>No mistakes on this split.</p>")
    header = ["true class", "predicted as", "times", "test images (true class)", "training image of the prediction"]
    return Section(
        "confused", "Most-confused pairs", raw_table(header, [[escape(c) for c in r[:3]] + r[3:] for r in rows])
    )


def _cam_section(predictor, test_paths, y, pred, n) -> Section:
    wrong = list(np.nonzero(pred != y)[0][: n // 2])
    right = list(np.nonzero(pred == y)[0][: n - len(wrong)])
    cells = []
    for i in wrong + right:
        try:
            (e,) = explain_images(predictor, [test_paths[i]])
        except Exception:  # noqa: BLE001 - skip an unreadable image, keep the gallery
            continue
        ok = "✓" if pred[i] == y[i] else "✗"
        caption = (
            f"{ok} {_short(e.predicted)} ({e.probability:.2f}); true {_short(predictor.classes[y[i]])} [{e.method}]"
        )
        img = pil_to_img(overlay(e.view, e.heatmap, e.box), alt=caption, max_side=160)
        cells.append(f"<figure class='g'>{img}<figcaption>{escape(caption)}</figcaption></figure>")
    style = "<style>.g{display:inline-block;margin:4px;width:170px;vertical-align:top;font-size:11px}</style>"
    return Section("cam", "Where the model looks (CAM gallery)", style + "".join(cells) or "<p>No images.</p>")


def _neighbours_section(test_paths, test_feats, y, pred, train_paths, train_feats, train_y, classes, n) -> Section:
    if train_feats is None or not len(train_feats):
        return Section("neighbours", "Nearest training images of mistakes", "<p>No training split to search.</p>")
    mistakes = np.nonzero(pred != y)[0][:n]
    index = build_index(np.asarray(train_feats, np.float32), metric="cosine", backend="numpy")
    _, near = index.search(np.asarray(test_feats[mistakes], np.float32), min(5, len(train_feats)))
    rows = []
    for i, nn in zip(mistakes, near):
        cells = [
            f"<figure class='g'>{_thumb(train_paths[j], 96)}<figcaption>{escape(_short(classes[train_y[j]]))}"
            "</figcaption></figure>"
            for j in nn
        ]
        rows.append(
            [
                f"{_thumb(test_paths[i], 112)}<br>true {escape(_short(classes[y[i]]))}<br>"
                f"predicted {escape(_short(classes[pred[i]]))}",
                "".join(cells),
            ]
        )
    if not rows:
        return Section("neighbours", "Nearest training images of mistakes", "<p>No mistakes on this split.</p>")
    return Section(
        "neighbours",
        "Nearest training images of mistakes",
        raw_table(["mistake", "5 nearest training images (cosine, the model's pooled features)"], rows),
    )


def _map_section(feats, y, pred, classes, max_points, seed) -> Section:
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(feats), min(max_points, len(feats)), replace=False))
    x = feats[idx] / np.maximum(np.linalg.norm(feats[idx], axis=1, keepdims=True), 1e-12)
    if len(x) >= 10:
        x = PCA(n_components=min(50, x.shape[1], len(x) - 1), random_state=seed).fit_transform(x)
        perplexity = float(min(30, max(2, (len(x) - 1) // 3)))
        xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
        how = "t-SNE of the L2-normalised pooled features (PCA to 50 first)"
    else:
        xy = PCA(n_components=2).fit_transform(x) if len(x) > 2 else np.zeros((len(x), 2))
        how = "PCA of the L2-normalised pooled features"
    fig = new_figure(7, 6)
    ax = fig.add_subplot()
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    ok = pred[idx] == y[idx]
    ax.scatter(xy[ok, 0], xy[ok, 1], c=[cmap(v % 20) for v in y[idx][ok]], s=8, alpha=0.8, label="correct")
    ax.scatter(xy[~ok, 0], xy[~ok, 1], c="black", marker="x", s=14, label="mistake")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8)
    ax.set_title(f"{len(idx)} test images, coloured by true class", fontsize=10)
    fig.tight_layout()
    return Section("map", "Map of the representations", f"<p>{escape(how)}.</p>" + figure_to_img(fig, alt="2-D map"))


def _test_pass(run, predictor, data, split, tta, progress, allow_train_images=False):
    """The split's kept paths, labels [N], features [N, D], probabilities [N, C] (with TTA when asked), skipped
    files, the data folder's training counts and which images were scored (the split contract of `scored_images`)."""

    paths, labels, data_counts = samples_for_model(data, split, predictor.classes)
    paths, labels, scored = scored_images([run], paths, labels, split=split, allow=allow_train_images)
    feats, proba, index, skipped = features_and_proba(predictor, paths, progress=progress, desc="report: test")
    if tta and tta != "none":
        proba = predict_paths(predictor, [paths[i] for i in index], tta=TTA.parse(tta), progress=progress).proba
    return [paths[i] for i in index], labels[index], feats, proba, skipped, data_counts, scored


def _train_pass(predictor, data, max_train, seed, progress):
    """Training paths, labels and features (a seeded subset of at most max_train images)."""

    tp, ty, _ = samples_for_model(data, "train", predictor.classes)
    if len(tp) > max_train:
        keep = np.sort(np.random.default_rng(seed).choice(len(tp), max_train, replace=False))
        tp, ty = [tp[i] for i in keep], ty[keep]
    train_feats, _, tidx, _ = features_and_proba(predictor, tp, progress=progress, desc="report: train")
    return [tp[i] for i in tidx], ty[tidx], train_feats


def _by_class(paths: list[str], y: np.ndarray) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for p, c in zip(paths, y):
        out.setdefault(int(c), []).append(p)
    return out


# ---- the report ----------------------------------------------------------------------------------------------------
def _subtitle(fit: dict | None, predictor, split: str, n: int, m: dict) -> str:
    what = f"fit chose {fit['chosen']}" if fit else (
        f"{predictor.meta.get('backbone')} · regime {predictor.meta.get('regime', '?')}"
    )  # fmt: skip
    return f"{what} · {split} split, {n} images · top-1 {m['top1']:.3f} · mean per-class {m['mean_per_class']:.3f}"


def _fit_summary(run: str) -> dict | None:
    """fit.json of a `fit` output folder (None for a training run)."""
    path = os.path.join(run, "fit.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def build_run_report(
    run: str,
    *,
    data: str | None = None,
    out: str | None = None,
    split: str = "test",
    tta: str = "none",
    gallery: int = 12,
    max_map_points: int = 2000,
    max_train: int = 5000,
    bootstrap: int = 1000,
    seed: int = 0,
    progress: bool = True,
    allow_train_images: bool = False,
) -> str:
    cfg_path = os.path.join(run, "config.yaml")
    run_cfg = yaml.safe_load(open(cfg_path, encoding="utf-8")) if os.path.exists(cfg_path) else {}
    fit = _fit_summary(run)
    # a fit folder's model is scored on the engine fit's test pass used: one model, one score
    predictor = load(run, runtime=run_cfg.get("runtime", "torch") if fit else "torch")
    data = data or run_cfg.get("data")
    if not data:
        raise FinegrainError(f"{run} has no config.yaml naming its data: pass --data FOLDER")
    test_paths, y, feats, proba, skipped, data_counts, scored = _test_pass(
        run, predictor, data, split, tta, progress, allow_train_images
    )
    classes, pred = predictor.classes, proba.argmax(1)
    counts = predictor.meta.get("train_counts")
    train_counts = np.asarray(counts) if counts is not None else data_counts
    summary = summarize(proba, y, classes, train_counts=train_counts, n_boot=bootstrap, seed=seed)
    sets = set_coverage([predictor], proba, y, train_counts)
    summary |= {"tta": tta, "scored_images": scored, "prediction_sets": sets}
    train_paths, train_y, train_feats = [], np.zeros(0, int), None
    if data_counts is not None:
        train_paths, train_y, train_feats = _train_pass(predictor, data, max_train, seed, progress)
    train_by_class = _by_class(train_paths, train_y)

    sections = [_fit_section(fit, run)] if fit else []
    sections += [
        _data_section(classes, train_counts, len(y), skipped),
        _config_section(run),
        _curves_section(run),
        _metrics_section(summary),
        *([_sets_section(summary["prediction_sets"])] if summary["prediction_sets"] else []),
        _confusion_section(summary, classes),
        _frequency_section(summary, train_counts),
        _confused_section(summary, classes, test_paths, y, pred, train_by_class),
        _cam_section(predictor, test_paths, y, pred, gallery),
        _neighbours_section(test_paths, feats, y, pred, train_paths, train_feats, train_y, classes, gallery),
        _map_section(feats, y, pred, classes, max_map_points, seed),
    ]
    out = out or os.path.join(run, "report.html")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write_json(os.path.splitext(out)[0] + "-metrics.json", summary)
    m = summary["metrics"]
    subtitle = _subtitle(fit, predictor, split, len(y), m)
    return render_report(
        f"finegrain report: {os.path.basename(os.path.abspath(run))}", sections, out, subtitle=subtitle
    )
