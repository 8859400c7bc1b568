"""Learning from unlabeled images (issue 14): label propagation, self-training caps, the out-of-class guard,
`suggest`, and the bad inputs of `fit --unlabeled` / `finegrain suggest`. Real computations on small arrays."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from sklearn.datasets import make_moons

from finegrain.data import load_image_set
from finegrain.errors import FinegrainError
from finegrain.heads import create_classifier
from finegrain.recipe.unlabeled import unlabeled_paths
from finegrain.semi import (
    LabelPropagationProbe,
    SelfTrainingProbe,
    capped_pseudo_labels,
    suggest_to_label,
    write_suggestions,
)
from tests.conftest import COLOURS, fit_on_a_still_clock, write_class_images


def _moons(n=400, seed=0):
    """Two moons lifted to 3-D (x, y, 3): cosine neighbours are the plane's neighbours; not linearly separable."""
    X, y = make_moons(n, noise=0.04, random_state=seed)
    return np.hstack([X, np.full((n, 1), 3.0)]).astype(np.float32), y


def test_label_propagation_recovers_two_moons_where_a_linear_probe_cannot():
    X, y = _moons()
    lab = np.array([np.flatnonzero(y == 0)[0], np.flatnonzero(y == 1)[0]])  # one labelled point a moon
    unl = np.setdiff1d(np.arange(len(y)), lab)
    lp = LabelPropagationProbe(k=10, alpha=0.99, max_iter=200, guard="none").fit(X[lab], y[lab], X[unl])
    assert np.mean(lp.pseudo_labels_ == y[unl]) >= 0.97
    oracle = create_classifier("probe").fit(X, y)  # a linear probe with every label still cannot
    assert np.mean(oracle.predict(X) == y) < 0.92
    assert lp.report_["n_unlabeled"] == len(unl) == lp.report_["n_used"]
    assert 0 < lp.report_["mean_confidence"] <= 1 and lp.predict_proba(X).shape == (len(X), 2)


@pytest.mark.parametrize("head", [LabelPropagationProbe(k=10, guard="none"), SelfTrainingProbe(guard="none")],
                         ids=lambda h: type(h).__name__)  # fmt: skip
def test_semi_heads_take_scikit_learns_convention_and_sit_in_a_pipeline(head):
    """fit(X, y) with y = -1 on the unlabeled rows (as LabelSpreading takes it) is fit(X_lab, y, X_unlab); so the
    head is the last step of a Pipeline."""
    from sklearn.base import clone
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer

    X, y = _moons()
    y_semi = np.where(np.arange(len(y)) % 10 == 0, y, -1)
    apart = clone(head).fit(X[y_semi >= 0], y[y_semi >= 0], X[y_semi < 0])
    together = clone(head).fit(X, y_semi)
    np.testing.assert_allclose(together.predict_proba(X), apart.predict_proba(X), atol=1e-5)
    assert set(together.classes_) == {0, 1}  # -1 is not a class
    pipe = make_pipeline(Normalizer(), clone(head)).fit(X, y_semi)
    assert pipe.predict(X).shape == (len(X),) and pipe[-1].report_["n_unlabeled"] == int((y_semi < 0).sum())


def test_pseudo_label_caps_hold_per_class_and_keep_the_most_confident():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 5)) * 3
    logits[:, 0] += 2  # class 0 is predicted far more often than the others
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pseudo = capped_pseudo_labels(proba, threshold=0.6, cap=20)
    counts = np.bincount(pseudo[pseudo >= 0], minlength=5)
    assert counts.max() <= 20 and counts[0] == 20
    assert (proba.max(1)[pseudo >= 0] >= 0.6).all()
    rows0 = np.flatnonzero((proba.argmax(1) == 0) & (proba.max(1) >= 0.6))
    assert set(np.flatnonzero(pseudo == 0)) == set(rows0[np.argsort(-proba.max(1)[rows0])][:20])


def _clusters(n_classes, per_class, seed, centers):
    rng = np.random.default_rng(seed)
    X = np.concatenate([centers[c] + 0.35 * rng.normal(size=(per_class, centers.shape[1])) for c in range(n_classes)])
    return X.astype(np.float32), np.repeat(np.arange(n_classes), per_class)


def test_self_training_respects_its_cap_and_reports_what_it_used():
    centers = np.random.default_rng(1).normal(size=(6, 16))
    Xl, yl = _clusters(6, 2, 2, centers)
    Xu, _ = _clusters(6, 30, 3, centers)
    st = SelfTrainingProbe(cap=10, threshold=0.3).fit(Xl, yl, Xu)
    used = st.pseudo_labels_[st.pseudo_labels_ >= 0]
    assert np.bincount(used).max() <= 10 and st.report_["n_used"] == len(used) <= 60
    assert st.report_["cap"] == 10 and st.report_["n_unlabeled"] == len(Xu)


def test_the_out_of_class_guard_keeps_accuracy_when_half_the_pool_is_foreign():
    centers = np.random.default_rng(5).normal(size=(20, 24))  # classes 0-9 known, 10-19 foreign
    Xl, yl = _clusters(10, 3, 6, centers)
    Xin, _ = _clusters(10, 20, 7, centers)
    Xall, yall = _clusters(20, 20, 8, centers)
    Xout = Xall[yall >= 10]
    Xt, yt = _clusters(10, 20, 9, centers)
    Xu = np.concatenate([Xin, Xout])
    sup = max(np.mean(create_classifier(c).fit(Xl, yl).predict(Xt) == yt) for c in ("probe", "ncm"))
    lp = LabelPropagationProbe().fit(Xl, yl, Xu)
    assert np.mean(lp.predict(Xt) == yt) >= sup - 0.005
    foreign_used = (lp.pseudo_labels_[len(Xin) :] >= 0).sum()
    assert foreign_used <= 0.2 * len(Xout) and lp.report_["n_dropped_by_guard"] >= 0.8 * len(Xout)
    assert (lp.pseudo_labels_[: len(Xin)] >= 0).mean() >= 0.8  # in-class images are kept


def test_suggest_is_deterministic_for_a_seed_and_written_atomically(tmp_path):
    rng = np.random.default_rng(0)
    X, Xl = rng.normal(size=(200, 8)).astype(np.float32), rng.normal(size=(10, 8)).astype(np.float32)
    proba = rng.dirichlet(np.ones(4), size=200)
    for strategy in ("margin-kcenter", "typical"):
        b = suggest_to_label(X, proba, 25, X_lab=Xl, strategy=strategy, seed=3)
        assert np.array_equal(b, suggest_to_label(X, proba, 25, X_lab=Xl, strategy=strategy, seed=3))
        assert len(set(b.tolist())) == 25
    with pytest.raises(ValueError, match="strategy must be one of typical, margin-kcenter"):
        suggest_to_label(X, proba, 5, strategy="entropy")
    a = suggest_to_label(X, proba, 25, X_lab=Xl, seed=3)
    classes = ["a", "b", "c", "d"]
    path = write_suggestions(str(tmp_path / "s.csv"), [f"img{i}.jpg" for i in range(200)], proba, a, classes)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [f"img{i}.jpg" for i in a] and rows[0]["rank"] == "1"
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("semi")
    for c, name in enumerate(["red", "green", "blue"]):
        write_class_images(str(root / "data" / "train" / name), COLOURS[c], 4, seed=c)
        write_class_images(str(root / "data" / "test" / name), COLOURS[c], 2, seed=10 + c)
        write_class_images(str(root / "pool" / name), COLOURS[c], 3, seed=20 + c)
    (root / "empty").mkdir()
    shutil.copy(root / "data" / "train" / "red" / "000.jpg", root / "copied.jpg")
    return {k: str(root / k) for k in ("data", "pool", "empty")}


def test_unlabeled_folder_errors_are_one_clear_line(folders):
    image_set = load_image_set(folders["data"])
    assert len(unlabeled_paths(folders["pool"], image_set)) == 9
    for folder, words in (
        (folders["empty"], "has no images"),
        (folders["data"], "overlaps the labelled data"),
        (folders["data"] + "/train", "overlaps the labelled data"),
        (folders["data"] + "/nowhere", "does not exist"),
    ):
        with pytest.raises(FinegrainError, match=words):
            unlabeled_paths(folder, image_set)


@pytest.mark.parametrize("which", ["empty", "data"])
def test_cli_bad_unlabeled_folder_is_exit_2_with_one_line(folders, which, tmp_path, capsys):
    from finegrain.cli.main import main

    for argv in (
        ["suggest", folders["data"], "--unlabeled", folders[which], "--out", str(tmp_path / "s")],
        ["fit", folders["data"], "--unlabeled", folders[which], "--out", str(tmp_path / "f"), "--no-progress"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("finegrain: error: unlabeled folder"), err


def test_fit_with_unlabeled_images_scores_semi_candidates_on_validation_and_out_of_fold(folders, tmp_path):
    import json

    from finegrain.recipe import FitConfig
    from finegrain.recipe.candidates import val_scores
    from finegrain.recipe.fit import CandidateStore

    cfg = FitConfig(data=folders["data"], out=str(tmp_path / "fit"), budget_min=1.0, finetune=False,
                    ensemble=False, workers=0, bootstrap=20, unlabeled=folders["pool"])  # fmt: skip
    result = fit_on_a_still_clock(cfg)
    semi = [c for c in result.leaderboard if c.kind == "semi"]
    assert semi and all(0 <= c.val_top1 <= 1 for c in semi)
    # ranked like the frozen heads: out-of-fold over every labelled image (12), each predicted once by the model
    # the other folds (and the unlabeled pool) fitted; read back from disk as a resumed run reads it
    state = CandidateStore(cfg.out, cfg)
    frozen = next(c for c in state.candidates.values() if c.kind == "frozen")
    for c in semi:
        oof = state.oof[c.name]
        assert c.estimate == frozen.estimate and c.estimate.startswith("oof") and oof.shape == (12, 3)
        assert np.allclose(oof.sum(1), 1)
    y = _fold_labels(folders["data"], cfg)
    assert all((c.oof_top1, c.oof_mean_per_class) == val_scores(state.oof[c.name], y) for c in semi)
    assert result.chosen.score >= max(c.score for c in semi)  # the pick ranks them with everything else
    runs = json.loads((tmp_path / "fit" / "unlabeled.json").read_text())["runs"]
    assert runs and all(r["n_unlabeled"] == 9 and 0 <= r["n_used"] <= 9 for r in runs)
    assert (tmp_path / "fit" / "model").is_dir() and result.test is not None


def _fold_labels(data: str, cfg) -> np.ndarray:
    """fit's labelled images' classes in the order its folds keep: train, then val."""
    from finegrain.data import load_image_set
    from finegrain.train.data import make_splits

    splits = make_splits(load_image_set(data), val_fraction=cfg.val_fraction, seed=cfg.seed)
    return np.array([s.label for s in splits.train + splits.val])


def test_suggest_command_writes_the_same_csv_for_the_same_seed(folders, tmp_path, capsys):
    from finegrain.cli.main import main

    argv = ["suggest", folders["data"], "--unlabeled", folders["pool"], "-n", "4", "--workers", "0", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    first = (tmp_path / "a" / "suggestions.csv").read_text()
    assert first == (tmp_path / "b" / "suggestions.csv").read_text() and len(first.strip().splitlines()) == 5
    assert "4 of 9 unlabeled images to label next" in capsys.readouterr().out
    # The gallery beside the CSV: one thumbnail (a data URI, nothing loaded from elsewhere) per suggestion, in order.
    page = (tmp_path / "a" / "suggestions.html").read_text()
    ranks = [line.split(",")[0] for line in first.strip().splitlines()[1:]]
    assert page.count("<figure class='g'>") == 4 and page.count('src="data:image/') == 4
    assert [f"<b>#{r}</b>" in page for r in ranks] == [True] * 4
    assert sorted(ranks, key=lambda r: page.index(f"<b>#{r}</b>")) == ranks  # shown in rank order


def test_transductive_fit_uses_the_test_images_unlabeled_and_says_so(folders, tmp_path, capsys):
    import json

    from finegrain.cli.main import main

    out = tmp_path / "t"
    argv = ["fit", folders["data"], "--out", str(out), "--transductive", "--budget-min", "1", "--no-finetune",
            "--no-ensemble", "--workers", "0", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "TRANSDUCTIVE" in capsys.readouterr().out
    doc = json.loads((out / "fit.json").read_text())
    assert doc["transductive"] is True and "test" not in doc and doc["test_transductive"]["n"] == 6
    assert doc["test_note"].startswith("transductive: the 6 test images")
    runs = json.loads((out / "unlabeled.json").read_text())
    assert runs["n_files"] == 6  # no --unlabeled folder: the pool is the test images alone
    # Without a test split there is nothing to be transductive with: one clear error.
    from types import SimpleNamespace

    from finegrain.recipe import FitConfig
    from finegrain.recipe.fit import _with_test_images

    with pytest.raises(FinegrainError, match="no test split"):
        _with_test_images(FitConfig(transductive=True), [], SimpleNamespace(test=[]))
    assert _with_test_images(FitConfig(), ["a.jpg"], SimpleNamespace(test=[])) == ["a.jpg"]
