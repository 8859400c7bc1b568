"""Evaluation: TTA views, the metrics summary (against scikit-learn), inference with ensembles, FixRes, the CLI."""

import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import finegrain
from finegrain.backbones import Preprocess
from finegrain.cli.main import main
from finegrain.errors import FinegrainError
from finegrain.evaluate.summary import calibration, summarize
from finegrain.evaluate.tta import TTA, image_views


# ---- TTA -------------------------------------------------------------------------------------------------------------
def test_tta_parse_and_view_counts():
    assert TTA.parse("none").n_views() == 1
    assert TTA.parse("flip").n_views() == 2
    assert TTA.parse("5crop").n_views() == 5 and TTA.parse("flip+5crop").n_views() == 10
    assert TTA.parse("10crop").n_views() == 10 and TTA.parse("10crop,flip").n_views() == 10
    assert TTA.parse("flip", "224,256").n_views() == 4
    assert TTA.parse("flip+5crop", [224]).describe() == "5crop+flip @ 224"
    for bad in ["mirror", "3crop"]:
        with pytest.raises(FinegrainError):
            TTA.parse(bad)
    with pytest.raises(FinegrainError):
        TTA.parse("flip", "224,abc")


def test_image_views_geometry():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8))
    pre = Preprocess(input_size=64, crop_pct=0.875)
    plain = pre.pil_to_uint8(img)
    v1 = image_views(img, pre, TTA())
    assert v1.shape == (1, 3, 64, 64) and torch.equal(v1[0], plain)
    v5 = image_views(img, pre, TTA(crops=5))
    assert v5.shape == (5, 3, 64, 64)
    assert torch.equal(v5[0], plain)  # the centre crop of FiveCrop is the eval view
    assert len({v.numpy().tobytes() for v in v5}) == 5  # corners differ
    v10 = image_views(img, pre, TTA(crops=10))
    assert torch.equal(v10[5:], v10[:5].flip(-1))
    vf = image_views(img, pre, TTA(flip=True))
    assert torch.equal(vf[1], plain.flip(-1))


# ---- metrics summary -------------------------------------------------------------------------------------------------
def _random_predictions(n=400, c=6, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 2.0 * np.eye(c)[y] * rng.random((n, 1))
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return proba, y


def test_summary_matches_scikit_learn():
    from sklearn.metrics import (
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
        top_k_accuracy_score,
    )

    proba, y = _random_predictions()
    classes = [f"c{i}" for i in range(6)]
    s = summarize(proba, y, classes, n_boot=200)
    pred = proba.argmax(1)
    assert s["metrics"]["top1"] == pytest.approx(np.mean(pred == y))
    assert s["metrics"]["top5"] == pytest.approx(top_k_accuracy_score(y, proba, k=5))
    assert s["metrics"]["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert s["metrics"]["mean_per_class"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert s["metrics"]["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    p, r, f, sup = precision_recall_fscore_support(y, pred, zero_division=0)
    np.testing.assert_allclose([c["precision"] for c in s["per_class"]], p)
    np.testing.assert_allclose([c["recall"] for c in s["per_class"]], r)
    np.testing.assert_allclose([c["f1"] for c in s["per_class"]], f)
    np.testing.assert_array_equal(s["confusion_matrix"], confusion_matrix(y, pred))
    worst = s["most_confused"][0]
    cm = confusion_matrix(y, pred)
    np.fill_diagonal(cm, 0)
    assert worst["count"] == cm.max() and cm[worst["true_index"], worst["predicted_index"]] == cm.max()


def test_summary_keeps_classes_absent_from_labels_and_predictions():
    proba, y = _random_predictions(n=300, c=4)
    proba = np.concatenate([proba, np.zeros((len(y), 2))], axis=1)  # classes 4, 5: never true, never predicted
    s = summarize(proba, y, list("abcdef"), n_boot=0)
    assert np.shape(s["confusion_matrix"]) == (6, 6) and np.sum(s["confusion_matrix"]) == len(y)
    assert [c["support"] for c in s["per_class"][4:]] == [0, 0]
    assert all(c[k] == 0.0 for c in s["per_class"][4:] for k in ("precision", "recall", "f1"))  # zero_division=0
    four = summarize(proba[:, :4], y, list("abcd"), n_boot=0)["metrics"]
    assert s["metrics"]["macro_f1"] == four["macro_f1"]  # macro over the classes that occur in the labels
    assert s["metrics"]["balanced_accuracy"] == four["balanced_accuracy"]
    with pytest.raises(ValueError, match="no predictions"):
        summarize(np.zeros((0, 3)), np.zeros(0, dtype=int), list("abc"))


def test_bootstrap_intervals_bracket_the_estimate_and_shrink_with_more_data():
    proba, y = _random_predictions(n=200)
    small = summarize(proba, y, list("abcdef"), n_boot=300, seed=1)
    proba4, y4 = _random_predictions(n=3200, seed=2)
    big = summarize(proba4, y4, list("abcdef"), n_boot=300, seed=1)
    for s in (small, big):
        for k in ("top1", "top5", "mean_per_class", "ece"):
            lo, hi = s["intervals"][k]
            assert lo <= s["metrics"][k] <= hi
    width = lambda s: s["intervals"]["top1"][1] - s["intervals"]["top1"][0]  # noqa: E731
    assert width(big) < 0.5 * width(small)  # ~1/sqrt(16) in theory


def test_calibration_ece_by_hand():
    # two bins used: 0.9-confident rows right 3 of 4 times (gap 0.15), 0.6-confident rows right 1 of 2 (gap 0.1)
    proba = np.array([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 2)
    y = np.array([0, 0, 0, 1, 0, 1])
    cal = calibration(proba, y, n_bins=10)
    assert cal["ece"] == pytest.approx(4 / 6 * 0.15 + 2 / 6 * 0.1)
    used = [b for b in cal["bins"] if b["count"]]
    assert [b["count"] for b in used] == [2, 4] and used[1]["accuracy"] == pytest.approx(0.75)


def test_shot_groups_in_summary():
    proba, y = _random_predictions(n=300, c=3)
    s = summarize(proba, y, ["a", "b", "c"], train_counts=[150, 50, 5], n_boot=100)
    acc = [np.mean(proba.argmax(1)[y == c] == c) for c in range(3)]
    assert s["metrics"]["many_shot"] == pytest.approx(acc[0])
    assert s["metrics"]["medium_shot"] == pytest.approx(acc[1])
    assert s["metrics"]["few_shot"] == pytest.approx(acc[2])
    assert s["per_class"][2]["train_count"] == 5


# ---- inference, ensembles, evaluate ----------------------------------------------------------------------------------
def _test_paths(data):
    return sorted(
        os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(data, "test")) for f in fs if f.endswith(".jpg")
    )


def test_predict_paths_tta_ensemble_and_bad_files(trained_run, train_data, tmp_path):
    from finegrain.evaluate.inference import predict_paths

    predictor = finegrain.load(trained_run, runtime="torch")
    paths = _test_paths(train_data)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(open(paths[0], "rb").read()[:200])
    plain = predict_paths(predictor, paths, workers=0, precision="fp32")
    np.testing.assert_allclose(plain.proba, predictor.predict_proba(paths), atol=1e-5)
    flip = predict_paths(predictor, paths + [str(bad)], tta=TTA(flip=True), workers=0, precision="fp32")
    assert len(flip.index) == len(paths) and flip.skipped[0][0] == str(bad)
    np.testing.assert_allclose(flip.proba.sum(1), 1.0, atol=1e-5)
    assert not np.allclose(flip.proba, plain.proba)  # the mirrored view changes something
    # the API's TTA path and the dataset path agree
    np.testing.assert_allclose(flip.proba, predictor.predict_proba(paths, tta="flip"), atol=1e-5)
    twice = predict_paths([predictor, finegrain.load(trained_run, runtime="torch")], paths, workers=0, precision="fp32")
    np.testing.assert_allclose(twice.proba, plain.proba, atol=1e-5)
    assert twice.models == 2


def test_ensemble_members_must_share_classes(trained_run, train_data, tmp_path):
    from finegrain.evaluate.inference import predict_paths

    a = finegrain.load(trained_run, runtime="torch")
    b = finegrain.load(trained_run, runtime="torch")
    b.spec = b.spec.replace(classes=tuple(reversed(b.classes)))
    with pytest.raises(FinegrainError, match="same classes"):
        predict_paths([a, b], _test_paths(train_data)[:2], workers=0)


def test_cli_evaluate_writes_consistent_outputs(trained_run, train_data, tmp_path, capsys):
    out = tmp_path / "ev"
    rc = main(["evaluate", trained_run, train_data, "--out", str(out), "--tta", "flip", "--bootstrap", "200",
               "--workers", "0", "--no-progress"])  # fmt: skip
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert m["n"] == len(rows) == 12
    assert m["metrics"]["top1"] == pytest.approx(np.mean([int(r["correct"]) for r in rows]))
    assert m["tta"]["views"] == 2 and m["train_counts_from"] == "model"
    assert m["metrics"]["many_shot"] is None and m["metrics"]["few_shot"] is not None  # 12 train images a class
    npz = np.load(out / "proba.npz")
    assert npz["proba"].shape == (12, 3) and (out / "config.yaml").exists()
    confusion = list(csv.reader(open(out / "confusion.csv")))
    assert len(confusion) == 4 and sum(int(v) for row in confusion[1:] for v in row[1:]) == 12
    assert Image.open(out / "reliability.png").size[0] > 100
    assert "top1" in capsys.readouterr().out


def test_cli_evaluate_bad_input_is_one_line(trained_run, tmp_path, capsys):
    rc = main(["evaluate", trained_run, str(tmp_path / "nowhere"), "--no-progress"])
    assert rc == 2 and capsys.readouterr().err.count("\n") == 1
    rc = main(["evaluate", trained_run, str(tmp_path), "--tta", "spin", "--no-progress"])
    assert rc == 2 and "unknown TTA" in capsys.readouterr().err


# ---- FixRes ----------------------------------------------------------------------------------------------------------
def test_fixres_adapts_batchnorm_and_head_and_saves(trained_run, train_data, tmp_path):
    from finegrain.evaluate.evaluation import samples_for_model
    from finegrain.evaluate.fixres import fix_resolution, save_predictor

    predictor = finegrain.load(trained_run, runtime="torch")
    paths, labels, _ = samples_for_model(train_data, "train", predictor.classes)
    bn_only = fix_resolution(predictor, paths, labels, 96, head_epochs=0, workers=0)
    both = fix_resolution(predictor, paths, labels, 96, head_epochs=2, workers=0)
    name = "backbone.model.bn2.running_mean"
    before = predictor.model.state_dict()
    assert not torch.allclose(bn_only.model.state_dict()[name], before[name])
    assert torch.equal(bn_only.model.head.weight, predictor.model.head.weight)  # head untouched without epochs
    first = "backbone.model.bn1.running_mean"  # only the BatchNorm before pooling moves, unless asked for all
    assert torch.equal(bn_only.model.state_dict()[first], before[first])
    every = fix_resolution(predictor, paths, labels, 96, head_epochs=0, workers=0, bn_layers="all")
    assert not torch.equal(every.model.state_dict()[first], before[first])
    assert not torch.equal(both.model.head.weight, predictor.model.head.weight)
    assert bn_only.preprocess.input_size == 96 and predictor.preprocess.input_size == 64  # the original is intact
    save_predictor(both, str(tmp_path / "fixed"))
    again = finegrain.load(str(tmp_path / "fixed"), runtime="torch")
    assert again.preprocess.input_size == 96 and again.meta["fixres"]["size"] == 96
    test = _test_paths(train_data)
    np.testing.assert_allclose(again.predict_proba(test), both.predict_proba(test), atol=1e-5)


def test_cli_fixres(trained_run, train_data, tmp_path, capsys):
    rc = main(["fixres", trained_run, train_data, "--size", "80", "--out", str(tmp_path / "f"), "--head-epochs", "1"])
    assert rc == 0 and finegrain.load(str(tmp_path / "f"), runtime="torch").preprocess.input_size == 80


def test_checkpoints_of_a_run_load_and_ensemble(trained_run, train_data):
    from finegrain.evaluate.inference import predict_paths

    paths = _test_paths(train_data)
    final = finegrain.load(trained_run, runtime="torch")
    last = finegrain.load(os.path.join(trained_run, "checkpoint-last.pt"), runtime="torch")
    best = finegrain.load(os.path.join(trained_run, "best.safetensors"), runtime="torch")
    assert last.meta["weights"] == "checkpoint-last.pt" and last.classes == final.classes
    # without a validation split the last epoch is the model: all three hold the same weights here
    np.testing.assert_allclose(last.predict_proba(paths), final.predict_proba(paths), atol=1e-5)
    ens = predict_paths([final, last, best], paths, workers=0, precision="fp32")
    assert ens.models == 3 and np.allclose(ens.proba, final.predict_proba(paths), atol=1e-5)
    with pytest.raises(FinegrainError):
        finegrain.load(os.path.join(trained_run, "config.yaml"), runtime="torch")


def test_cli_resolution_sweep(trained_run, train_data, tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = main(["evaluate", trained_run, train_data, "--out", str(out), "--sweep", "64,96", "--bootstrap", "50",
               "--workers", "0", "--no-progress"])  # fmt: skip
    assert rc == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert list(sweep["sizes"]) == ["64", "96"]
    at96 = json.loads((out / "96" / "metrics.json").read_text())
    assert at96["tta"]["sizes"] == [96] and at96["metrics"]["top1"] == sweep["sizes"]["96"]["top1"]
    assert main(["evaluate", trained_run, train_data, "--sweep", "64", "--sizes", "64", "--no-progress"]) == 2
