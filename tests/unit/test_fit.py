"""`finegrain fit`: candidates chosen on validation inside the budget, one model folder out, resumable, honest."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import finegrain
from finegrain.errors import FinegrainError
from finegrain.recipe import FitConfig, fit
from tests.conftest import COLOURS, fit_on_a_still_clock, write_class_images


def _fit_cfg(data, out, **kw):
    kw.setdefault("budget_min", 3.0)  # tiny data finishes in seconds: the budget never binds, even on a busy CPU
    kw.setdefault("finetune", False)
    kw.setdefault("workers", 0)
    kw.setdefault("bootstrap", 50)
    kw.setdefault("backbones", "efficientnet_lite0")  # the other backbones' views: tests of their own
    return FitConfig(data=data, out=str(out), **kw)


def test_fit_writes_the_model_leaderboard_and_reason_and_scores_test_once(train_data, tmp_path):
    options = {k: v for k, v in vars(_fit_cfg(train_data, tmp_path / "fit")).items() if k not in ("data", "out")}
    result = finegrain.fit(train_data, out=str(tmp_path / "fit"), progress=False, **options)  # the public API
    out = tmp_path / "fit"
    summary = json.loads((out / "fit.json").read_text())
    assert summary["chosen"] == result.chosen.name and "5-fold out-of-fold top-1 over all 36" in summary["reason"]
    # the budget bounds the whole command: recorded, not asserted on the wall clock (no timing assertions in tests)
    assert summary["budget_min"] == 3.0 and summary["seconds"] > 0
    splits = summary["splits"]  # val carved from train; the test split untouched
    assert splits["train"] + splits["val"] == 36 and splits["val"] >= 3 and splits["test"] == 12
    with open(out / "leaderboard.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["name"] == result.leaderboard[0].name and len(rows) == len(result.leaderboard) >= 8
    # chosen on the out-of-fold estimate (no fine-tune here: every row is cross-validated), not the validation split
    assert {r["estimate"] for r in rows} == {"oof-5"} and summary["estimate"] == "oof-5"
    assert float(rows[0]["score_top1"]) == float(rows[0]["oof_top1"]) == max(float(r["oof_top1"]) for r in rows)
    assert summary["oof_top1"] == result.chosen.oof_top1 == pytest.approx(float(rows[0]["oof_top1"]), abs=1e-4)
    assert result.test is not None and result.test["n"] == 12 and 0 <= result.test["metrics"]["top1"] <= 1
    model = finegrain.load(str(out / "model"))
    paths = [os.path.join(root, f) for root, _, files in os.walk(os.path.join(train_data, "test")) for f in files]
    proba = model.predict_proba(sorted(paths))
    assert proba.shape == (12, 3) and np.allclose(proba.sum(1), 1, atol=1e-5)
    assert np.mean(proba.argmax(1) == np.repeat([0, 1, 2], 4)) >= 0.5  # classes blue, green, red; colours differ
    # the result holds the loaded model (on fit's engine), the leaderboard and the test score
    assert result.test_top1 == summary["test"]["metrics"]["top1"] and result.classes == model.classes
    assert getattr(model, "members", [model])[0].runtime == "auto"  # finegrain.load's default, as on the CLI
    # prediction sets, calibrated on the chosen candidate's out-of-fold probabilities (evaluate/conformal.py)
    calib = json.loads((out / "model" / "conformal.json").read_text())
    assert calib["calibrated_on"] == "out-of-fold" and len(calib["scores"]) == 36
    sets = model.predict_set(sorted(paths), 0.9)
    assert all(s and s[0][0] == model.classes[int(np.argmax(p))] for s, p in zip(sets, proba))  # top-1 first
    # the unknown flag: the top probability under the level 95% of the out-of-fold images reach
    answers = model.answers(proba, 0.9)
    level = np.quantile(calib["top_proba"], 0.05)
    assert [a["unknown"] for a in answers] == [bool(p.max() < level) for p in proba]
    import shutil

    from finegrain.evaluate.evaluation import EvaluateConfig, evaluate_models
    from tests.conftest import write_class_images

    with_unknown = tmp_path / "with-unknown"  # the test split plus a class the model never saw
    shutil.copytree(train_data, with_unknown)
    write_class_images(str(with_unknown / "test" / "grey"), (128, 128, 128), 5, seed=7)
    ev = evaluate_models(EvaluateConfig(models=(str(out / "model"),), data=str(with_unknown), bootstrap=20, workers=0))
    at90 = ev["prediction_sets"]["0.9"]  # evaluate reports the sets' empirical coverage and size on the test split
    assert 0 <= at90["coverage"] <= 1 and 1 <= at90["mean_set_size"] <= 3 and ev["n"] == 12
    assert set(at90["per_class"]) == {"blue", "green", "red"} and at90["shot_bands"]["few_shot"]["n"] == 12
    fit_at90 = summary["test"]["prediction_sets"]["0.9"]  # fit's own test pass records them too (its engine's)
    assert fit_at90["coverage"] == pytest.approx(at90["coverage"], abs=1 / 12 + 1e-9)
    unknown = ev["unknown_classes"]  # the grey images: scored for the unknown flag only, not in the accuracy
    assert unknown["n_images"] == 5 and 0 <= unknown["auroc"] <= 1 and 0 <= unknown["flag"]["unknown_flagged"] <= 1
    assert np.allclose(result.predict_proba(sorted(paths)), proba, atol=1e-4)
    # the report of a fit folder leads with its choice and leaderboard, and scores the model as fit did
    from finegrain.report.run_report import build_run_report

    html = open(build_run_report(str(out), progress=False, gallery=2, bootstrap=20)).read()
    assert html.index('id="fit"') < html.index('id="data"') and result.chosen.name in html and "regime ?" not in html
    assert 'id="sets"' in html and "Classes least covered at 90%" in html  # the calibrated model's sets
    reported = json.loads((out / "report-metrics.json").read_text())["metrics"]["top1"]
    assert reported == pytest.approx(result.test_top1)


def test_fit_in_python_refuses_an_unknown_option_in_one_line(tmp_path):
    with pytest.raises(FinegrainError, match="unknown option.s. epochz for FitConfig; valid: .*backbone"):
        finegrain.fit(str(tmp_path), out=str(tmp_path / "f"), epochz=3)
    assert not (tmp_path / "f").exists()


def test_the_budget_is_driven_by_the_injected_clock_not_the_wall_clock(train_data, tmp_path):
    """A clock on which every reading is 40 s after the last (no wall clock): the budget is spent at once, yet the
    first view's first head is scored, the model saved and tested, and every other view is reported as skipped."""
    from finegrain.recipe.fit import Clock

    ticks = iter(range(0, 10**6, 40))
    result = fit(_fit_cfg(train_data, tmp_path / "fit"), progress=False, clock=Clock(1.0, now=lambda: next(ticks)))
    summary = json.loads((tmp_path / "fit" / "fit.json").read_text())
    first = next(iter(summary["views"]))
    assert {c.params.get("view") for c in result.leaderboard if c.kind == "frozen"} == {first}
    skipped = {s["view"] for s in summary["skipped_candidates"] if "view" in s}
    later = {v for v, g in summary["views"].items() if g.get("late") or g.get("fallback_of")}  # tried in their place
    assert skipped == set(summary["views"]) - {first} - later
    assert result.test["n"] == 12 and (tmp_path / "fit" / "model").is_dir()


def test_a_killed_fit_resumes_and_ends_with_the_same_choice(train_data, tmp_path):
    cmd = [sys.executable, "-m", "finegrain", "fit", train_data, "--budget-min", "2", "--no-finetune",
           "--workers", "0", "--no-progress"]  # fmt: skip
    whole = subprocess.run([*cmd, "--out", str(tmp_path / "whole")], capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    killed = tmp_path / "killed"
    # killed at a known point: right after the 3rd scored candidate is saved (finegrain/faults.py)
    env = {**os.environ, "FINEGRAIN_KILL_AT": "candidate:3"}
    proc = subprocess.run([*cmd, "--out", str(killed)], env=env, capture_output=True, timeout=300)
    state = killed / "fit-state" / "candidates.json"
    done_before = len(json.loads(state.read_text())["candidates"])
    assert proc.returncode == -signal.SIGKILL and not (killed / "fit.json").exists() and done_before == 3
    again = subprocess.run([*cmd, "--out", str(killed)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    first, second = (json.loads((p / "fit.json").read_text()) for p in (tmp_path / "whole", killed))
    assert "resuming the fit" in again.stdout and len(second["resumed"]["candidates"]) >= done_before  # and says so
    assert first["resumed"] == {"candidates": [], "views": []}
    assert second["chosen"] == first["chosen"] and second["val_top1"] == first["val_top1"]
    assert second["estimate"] == "oof-5" and second["oof_top1"] == first["oof_top1"]  # OOF probabilities resumed
    assert second["test"]["metrics"]["top1"] == pytest.approx(first["test"]["metrics"]["top1"])


def test_fit_refuses_data_it_cannot_choose_on(tmp_path):
    one = tmp_path / "one"
    write_class_images(str(one / "train" / "red"), COLOURS[0], 6, seed=0)
    with pytest.raises(FinegrainError, match="at least 2 classes"):
        fit_on_a_still_clock(_fit_cfg(str(one), tmp_path / "o1"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FinegrainError):
        fit_on_a_still_clock(_fit_cfg(str(empty), tmp_path / "o2"))
    with pytest.raises(FinegrainError, match="budget_min must be positive"):
        fit_on_a_still_clock(_fit_cfg(str(one), tmp_path / "o3", budget_min=0))


def test_fit_warns_about_classes_too_small_to_validate_and_test_classes_never_trained(tmp_path, capsys):
    root = tmp_path / "data"
    for c, name in enumerate(["red", "green", "blue"]):
        write_class_images(str(root / "train" / name), COLOURS[c], 1 if name == "blue" else 8, seed=c)
        write_class_images(str(root / "test" / name), COLOURS[c], 2, seed=10 + c)
    write_class_images(str(root / "test" / "grey"), (128, 128, 128), 2, seed=20)
    result = fit_on_a_still_clock(_fit_cfg(str(root), tmp_path / "fit"))
    out = capsys.readouterr().out
    assert "too few images for a validation image (e.g. 'blue')" in out
    assert "no training image (e.g. 'grey')" in out
    assert result.test["n"] == 8 and len(json.loads((tmp_path / "fit" / "fit.json").read_text())["warnings"]) == 2


def test_one_image_a_class_gets_the_documented_choice_said_so_and_a_working_model(tmp_path, capsys):
    root = tmp_path / "data"
    for c, name in enumerate(["red", "green", "blue"]):
        write_class_images(str(root / "train" / name), COLOURS[c], 1, seed=c)
        write_class_images(str(root / "test" / name), COLOURS[c], 3, seed=10 + c)
    result = fit_on_a_still_clock(_fit_cfg(str(root), tmp_path / "fit"))
    out = capsys.readouterr().out
    assert "no validation possible" in out and "documented choice" in out
    summary = json.loads((tmp_path / "fit" / "fit.json").read_text())  # strict JSON: no NaN for unscored values
    assert summary["chosen"] == "full256-flip/gem/ncm-cl2n" and summary["estimate"] == "none"
    assert summary["val_top1"] is None and summary["selection"].startswith("none: no validation possible")
    assert summary["splits"] == {"train": 3, "val": 0, "test": 9}
    with open(tmp_path / "fit" / "leaderboard.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["name"] == summary["chosen"] and row["score_top1"] == "" and row["val_top1"] == ""
    # the saved model is the CL2N nearest class mean of the three training images: each predicts its own class
    model = finegrain.load(str(tmp_path / "fit" / "model"))
    train = [str(root / "train" / n / "000.jpg") for n in ("blue", "green", "red")]
    assert list(model.predict_proba(train).argmax(1)) == [0, 1, 2]
    assert result.test["n"] == 9 and result.test["metrics"]["top1"] >= 0.5  # discs of three colours


def test_one_image_a_class_with_unlabeled_images_propagates_labels_by_the_same_rule(tmp_path):
    root, pool = tmp_path / "data", tmp_path / "pool"
    for c, name in enumerate(["red", "green", "blue"]):
        write_class_images(str(root / "train" / name), COLOURS[c], 1, seed=c)
        write_class_images(str(root / "test" / name), COLOURS[c], 2, seed=10 + c)
        write_class_images(str(pool / name), COLOURS[c], 3, seed=20 + c)  # labels unread: only the files
    fit_on_a_still_clock(_fit_cfg(str(root), tmp_path / "fit", unlabeled=str(pool)))
    summary = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert summary["chosen"] == "full256-flip/gem/lp-l2" and summary["estimate"] == "none"
    assert "label propagation (literature defaults) over the 9 unlabeled images" in summary["reason"]
    spec = json.loads((tmp_path / "fit" / "model" / "model.json").read_text())
    assert "unlabeled" in json.dumps(spec)  # the model says it learned from the unlabeled images


def test_a_rerun_with_other_settings_is_refused(train_data, tmp_path):
    fit_on_a_still_clock(_fit_cfg(train_data, tmp_path / "fit", ensemble=False))
    with pytest.raises(FinegrainError, match="other settings"):
        fit_on_a_still_clock(_fit_cfg(train_data, tmp_path / "fit", seed=3))


def test_fit_saves_out_of_fold_probabilities_that_cover_every_training_image_once(train_data, tmp_path):
    from finegrain.data import load_image_set
    from finegrain.recipe.candidates import val_scores
    from finegrain.recipe.fit import CandidateStore
    from finegrain.train.data import make_splits

    cfg = _fit_cfg(train_data, tmp_path / "fit", ensemble=False)
    result = fit_on_a_still_clock(cfg)
    splits = make_splits(load_image_set(train_data), val_fraction=cfg.val_fraction, seed=cfg.seed)
    y = np.array([s.label for s in splits.train + splits.val])  # the order fit's folds keep: train, then val
    state = CandidateStore(cfg.out, cfg)  # read back from disk, as a resumed run reads it
    frozen = [c for c in state.candidates.values() if c.kind == "frozen"]
    assert frozen and all(c.estimate == "oof-5" for c in frozen) and set(state.oof) == {c.name for c in frozen}
    for c in frozen:
        oof = state.oof[c.name]
        # one row per training image (train + val, 36), each predicted once by the model of the other folds
        assert oof.shape == (36, 3) and np.allclose(oof.sum(1), 1)
        assert (c.oof_top1, c.oof_mean_per_class) == val_scores(oof, y)
    assert result.chosen.oof_top1 == max(c.oof_top1 for c in result.leaderboard)


def test_folds_are_stratified_and_each_image_is_held_out_once():
    from finegrain.recipe.oof import make_folds, n_folds

    y = np.repeat([0, 1, 2], [10, 7, 3])
    folds = make_folds([f"{i}.jpg" for i in range(len(y))], y, seed=0)
    assert folds.k == 3 and folds.estimate == "oof-3"  # fewer than 5: a class has 3 images
    assert sorted(np.bincount(folds.fold)) == [6, 7, 7] and set(folds.fold[y == 2]) == {0, 1, 2}
    assert n_folds(np.repeat([0, 1], [9, 9])) == 5 and n_folds(np.array([0, 0, 1])) == 0
    assert make_folds(["a", "b", "c"], np.array([0, 0, 1]), seed=0) is None  # a class with one image: no OOF


def test_a_fold_refits_the_probe_with_the_C_its_single_fit_chose():
    from finegrain.recipe.candidates import HEADS, class_proba, fit_head
    from finegrain.recipe.oof import fixed_params, head_fit_predict, make_folds, oof_loop

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    X = (rng.normal(size=(60, 8)) + 1.5 * np.eye(3, 8)[y]).astype(np.float32)
    head = next(h for h in HEADS if h[0] == "probe-l2")
    _, clf = fit_head(head, X, y, seed=0)
    fixed = fixed_params(clf)
    assert fixed == {"Cs": (clf.C_,)}
    folds = make_folds([str(i) for i in range(60)], y, seed=0)
    fit_predict = head_fit_predict(head, fixed=fixed, seed=0, n_classes=3)
    oof = oof_loop(fit_predict, X, folds, n_classes=3, time_left=lambda: 1e9)
    held = folds.fold == 0
    norm, fold_clf = fit_head(head, X[~held], y[~held], seed=0, fixed=fixed)
    assert fold_clf.C_ == clf.C_ and np.allclose(oof[held], class_proba(fold_clf, norm.transform(X[held]), 3))
    assert oof_loop(fit_predict, X, folds, n_classes=3, time_left=lambda: -1.0) is None  # no time


def test_pick_ranks_cross_validated_candidates_out_of_fold_and_a_fine_tune_on_the_same_val_images():
    from finegrain.recipe.candidates import Candidate, pick

    def frozen(name, oof, val):
        return Candidate(name, "frozen", val, val, 1.0, {"source": name}, oof_top1=oof, oof_mean_per_class=oof,
                         estimate="oof-5")  # fmt: skip

    steady, lucky = frozen("a/gem/probe-l2", 0.90, 0.85), frozen("b/gap/probe-raw", 0.88, 0.89)
    assert pick([lucky, steady]) == (steady, None)  # the validation split alone would have taken `lucky`
    weak_ft = Candidate("finetune", "finetune", 0.84, 0.84, 60.0)
    assert pick([lucky, steady, weak_ft]) == (steady, weak_ft)
    strong_ft = Candidate("finetune", "finetune", 0.86, 0.86, 60.0)  # beats `steady` on the same val images
    assert pick([lucky, steady, strong_ft]) == (strong_ft, steady)


def test_a_distilled_student_is_chosen_only_averaged_with_its_teacher():
    from finegrain.recipe.candidates import Candidate, pick
    from finegrain.recipe.unlabeled import MEMBER_ONLY, with_teacher

    y = np.array([0, 1, 2, 0, 1, 2])
    eye = np.eye(3)
    p_teacher, p_student = eye[[0, 1, 2, 0, 0, 0]], eye[[0, 1, 2, 0, 1, 1]]  # 4/6 and 5/6 right
    teacher = Candidate("eval/gem/lp-l2", "semi", 4 / 6, 4 / 6, 2.0, {"source": "eval/gem"}, oof_top1=0.8,
                        oof_mean_per_class=0.8, estimate="oof-5")  # fmt: skip
    student = Candidate("distill", "finetune", 5 / 6, 5 / 6, 100.0, {"source": "distill", "member_only": MEMBER_ONLY})
    both, proba = with_teacher(student, p_student, teacher, p_teacher, y)
    assert both.members == [teacher.name, "distill"] and np.allclose(proba, (p_teacher + p_student) / 2)
    assert both.kind == "ensemble" and both.estimate == "val" and 4 / 6 <= both.val_top1 <= 5 / 6
    # the student alone beats the teacher on the validation split, but is never chosen alone
    assert pick([teacher, student]) == (teacher, None)
    chosen, challenger = pick([teacher, student, both])
    assert chosen is (both if both.val_score > teacher.val_score else teacher)
    assert "distill" not in {chosen.name, challenger.name}


def test_a_validation_only_challenger_within_its_noise_does_not_displace_the_out_of_fold_leader():
    """A fine-tune that wins the validation split by 2 images of 100 (standard error of the paired difference ~3
    images) keeps the out-of-fold leader; one that wins by 12 displaces it."""
    from finegrain.recipe.candidates import Candidate, paired_difference, pick

    y = np.repeat(np.arange(10), 10)
    eye = np.eye(10)
    wrong = (y + 1) % 10

    def proba(right: np.ndarray) -> np.ndarray:
        return eye[np.where(right, y, wrong)]

    rng = np.random.default_rng(0)
    leader_right = rng.random(100) < 0.8
    leader = Candidate("eval/gem/probe-l2", "frozen", float(leader_right.mean()), 0.0, 1.0, {"source": "eval/gem"},
                       oof_top1=0.85, oof_mean_per_class=0.85, estimate="oof-5")  # fmt: skip
    close_right, far_right = leader_right.copy(), leader_right.copy()
    flips = np.flatnonzero(~leader_right)
    close_right[flips[:4]] = True  # 4 images it gets right that the leader misses ...
    close_right[np.flatnonzero(leader_right)[:2]] = False  # ... and 2 the other way: +2 images
    far_right[flips[:12]] = True  # +12 images
    probas = {leader.name: proba(leader_right)}
    for name, right in (("close", close_right), ("far", far_right)):
        probas[name] = proba(right)
    close = Candidate("close", "finetune", float(close_right.mean()), 0.0, 60.0)
    far = Candidate("far", "finetune", float(far_right.mean()), 0.0, 60.0)
    diff, se = paired_difference(probas["close"], probas[leader.name], y)
    assert diff == pytest.approx(0.02) and se > diff
    assert pick([leader, close]) == (close, leader)  # the plain comparison would take it
    assert pick([leader, close], probas, y) == (leader, close)  # within its noise: the out-of-fold leader stays
    assert pick([leader, far], probas, y) == (far, leader)  # beyond it: displaced
    # +3 images: 1.75 standard errors, enough alone; as the best of 8 validation-only candidates it must win by
    # sqrt(2 ln 8) = 2.04 (the best of many noisy scores is high for being chosen)
    mid_right = leader_right.copy()
    mid_right[flips[:3]] = True
    probas["mid"] = proba(mid_right)
    mid = Candidate("mid", "finetune", float(mid_right.mean()), 0.0, 60.0)
    diff, se = paired_difference(probas["mid"], probas[leader.name], y)
    assert 1.0 < diff / se < 2.0
    assert pick([leader, mid], probas, y) == (mid, leader)
    others = [Candidate(f"weak{i}", "finetune", 0.5, 0.0, 60.0) for i in range(7)]
    probas |= {c.name: proba(np.zeros(100, bool)) for c in others}
    assert pick([leader, mid, *others], probas, y) == (leader, mid)


def test_fit_prices_a_test_pass_by_its_distinct_trunks():
    """Two heads on one view cost one extraction of it at test time; a head on another view or a fine-tune adds
    theirs."""
    from finegrain.recipe.candidates import Candidate
    from finegrain.recipe.costs import CostModel, trunks

    def head(name, view):
        return Candidate(name, "frozen", 0.9, 0.9, 1.0, {"view": view, "source": view})

    cands = {c.name: c for c in (head("a", "eval"), head("b", "eval"), head("c", "full256-flip"))}
    cands["ft"] = Candidate("ft", "finetune", 0.9, 0.9, 9.0, {"view": "eval"})
    for name, members in (("ab", ["a", "b"]), ("abc", ["a", "b", "c"]), ("a-ft", ["a", "ft"])):
        cands[name] = Candidate(name, "ensemble", 0.9, 0.9, 1.0, {}, members)
    assert trunks(cands["ab"], cands) == {("eval", "eval")}
    assert len(trunks(cands["abc"], cands)) == 2 and len(trunks(cands["a-ft"], cands)) == 2
    costs = CostModel(None, {}, 0, None)  # the cost model alone: measured paces given, nothing extracted
    costs.setup.update({"eval": 2.0, "full256-flip": 2.0})
    costs.spi.update({"eval": 0.01, "full256-flip": 0.03})
    assert costs.candidate_cost(cands["ab"], cands, 100) == pytest.approx(costs.candidate_cost(cands["a"], cands, 100))
    assert costs.candidate_cost(cands["abc"], cands, 100) == pytest.approx(3.0 + 5.0)


def test_another_backbones_view_is_priced_with_the_leaders_test_pass_as_its_partner():
    """A view of a second backbone is worth most in an ensemble with the leader so far: its price counts the
    leader's test pass (given), else the costliest extracted view's, never the cheapest one's (issue 23)."""
    from finegrain.recipe.costs import CostModel

    views = {
        "eval": {"backbone": "a", "flip": False},
        "full256-flip": {"backbone": "a", "flip": True},
        "b-eval": {"backbone": "b", "flip": False},
    }
    costs = CostModel(None, views, 1000, None)
    costs.setup.update({"eval": 2.0, "full256-flip": 2.0, "b-eval": 1.0})
    costs.spi.update({"eval": 0.01, "full256-flip": 0.03, "b-eval": 0.02})
    own = 1.0 + 1000 * 0.02 + (1.0 + 100 * 0.02)
    assert costs.view_cost("b-eval", 100) == pytest.approx(own + 2.0 + 100 * 0.03)  # the costliest view, not eval
    assert costs.view_cost("b-eval", 100, partner=7.5) == pytest.approx(own + 7.5)
    assert costs.view_cost("full256-flip", 100, partner=7.5) == pytest.approx(2.0 + 30.0 + 5.0 + 7.5)  # one too


def test_backbones_parse_and_an_unknown_one_is_a_one_line_error(train_data, tmp_path, capsys):
    from finegrain.cli.main import main
    from finegrain.recipe.candidates import parse_backbones

    both = ["efficientnet_lite0", "efficientnet_lite2"]
    assert parse_backbones("efficientnet_lite0, efficientnet_lite2", "x") == both
    assert parse_backbones("", "efficientnet_lite0")[0] == "efficientnet_lite0"  # the default set starts with it
    code = main(["fit", train_data, "--out", str(tmp_path / "f"), "--backbones", "efficientnet_lite0,nonet_9"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nonet_9" in err[0] and not (tmp_path / "f" / "fit.json").exists()


def test_small_images_get_a_view_at_their_own_scale_on_the_leaderboard(tmp_path):
    """32 px images: fit adds a view at a resolution derived from theirs (112 px, about a quarter of the 224 px
    eval view's compute), scored out-of-fold like every other."""
    from finegrain.recipe.candidates import low_res_view

    assert low_res_view(32) == 112 and low_res_view(500) is None and low_res_view(8) == 64
    root = tmp_path / "small"
    for c, (name, colour) in enumerate(zip(["red", "green", "blue"], COLOURS)):
        write_class_images(str(root / "train" / name), colour, 10, seed=c, size=(32, 32))
        write_class_images(str(root / "test" / name), colour, 3, seed=100 + c, size=(32, 32))
    result = fit_on_a_still_clock(_fit_cfg(str(root), tmp_path / "fit"))
    summary = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert summary["native_short_side"] == 32 and summary["views"]["low112-flip"]["image_size"] == 112
    low = [c for c in result.leaderboard if c.params.get("view") == "low112-flip"]
    assert low and all(c.estimate == "oof-5" for c in low)


def test_late_higher_resolution_views_come_after_the_others_best_backbone_first():
    """Time a run would leave unspent goes to a 1.25x view of each backbone, tried only in the late pass (after the
    fine-tune), the backbone whose frozen candidates score best first; small images get none (no upsampling)."""
    from types import SimpleNamespace

    from finegrain.recipe.candidates import Candidate, views_for
    from finegrain.recipe.frozen import FrozenStage

    names = ["efficientnet_lite0", "mobilenetv2_100"]
    views = views_for(names, 400)
    late = [v for v in views if views[v].get("late")]
    assert late == ["full320-flip", "mobilenetv2-full288-flip", "zoom256-flip"]
    assert views["full320-flip"]["image_size"] == 320 and views["zoom256-flip"]["zoom"]  # look closer: late too
    assert not any(v.get("late") or v.get("zoom") for v in views_for(names, 32).values())
    stage = FrozenStage.__new__(FrozenStage)
    stage.views = views
    mnv2 = Candidate("mobilenetv2-full224-flip/gem/probe-l2", "frozen", 0.9, 0.9, 1.0, {"backbone": names[1]})
    lite0 = Candidate("eval/gem/probe-l2", "frozen", 0.8, 0.8, 1.0, {"backbone": names[0]})
    stage.state = SimpleNamespace(candidates={c.name: c for c in (mnv2, lite0)})
    assert not set(late) & set(stage._order(late=False))
    assert stage._order(late=True)[-3:] == ["mobilenetv2-full288-flip", "full320-flip", "zoom256-flip"]
    # the zoom view decodes at twice its side and runs its trunk twice: priced as 2 passes of 256 px (+ flip)
    from finegrain.recipe.costs import CostModel

    assert stage.backbone("zoom256-flip").preprocess.input_size == 512 and stage.passes("zoom256-flip")["zoom"]
    costs = CostModel(None, views, 100, stage.backbone)
    assert costs._cost_units("zoom256-flip") == pytest.approx(2 * costs._cost_units("full256-flip"))


def test_the_reason_states_the_validation_only_candidates_margin_with_its_sign():
    from types import SimpleNamespace

    from finegrain.recipe.candidates import Candidate
    from finegrain.recipe.fit import _margin

    y = np.arange(10) % 2
    eye = np.eye(2)
    oof = Candidate("a", "frozen", 0.9, 0.9, 1.0, oof_top1=0.9, oof_mean_per_class=0.9, estimate="oof-5")
    ft = Candidate("ft", "finetune", 0.7, 0.7, 1.0)
    state = SimpleNamespace(
        probas={"a": eye[np.where(np.arange(10) < 9, y, 1 - y)], "ft": eye[np.where(np.arange(10) < 7, y, 1 - y)]}
    )
    assert _margin(oof, ft, state, y).startswith("validation-only minus out-of-fold candidate: -20.0 points")
    assert _margin(ft, oof, state, y).startswith("validation-only minus out-of-fold candidate: -20.0 points")


def test_a_later_views_heads_leave_its_ensemble_with_the_leader_a_test_pass(train_data, tmp_path):
    """While a later view's heads are scored, fit keeps the test pass of that view's ensemble with the leader (and
    the refit) free: a head that would eat into it is skipped, saying why (issue 23: a slow view's heads took the
    time, and every ensemble with it was dropped as unaffordable)."""
    from finegrain.data import load_image_set
    from finegrain.recipe.candidates import HEADS, Candidate
    from finegrain.recipe.fit import CandidateStore, Clock
    from finegrain.recipe.frozen import FrozenStage

    cfg = _fit_cfg(train_data, tmp_path / "fit")
    t = [0.0]
    clock = Clock(1.0, now=lambda: t[0])
    stage = FrozenStage(cfg, load_image_set(cfg.data), CandidateStore(cfg.out, cfg), clock, progress=False)
    first, later = list(stage.views)[:2]
    for v in (first, later):
        stage.costs.setup[v], stage.costs.spi[v] = 1.0, 0.1
    assert stage._pair_reserve(later, 100) == 0.0  # no leader yet: the first view's heads keep the usual reserve
    leader = Candidate(f"{first}/gem/probe-l2", "frozen", 0.9, 0.9, 1.0, {"view": first, "backbone": "x"})
    stage.state.add(leader, np.zeros((2, 3)))
    keep = stage._pair_reserve(later, 100)
    assert keep == pytest.approx(2 * (1.0 + 100 * 0.1) + 20.0)  # both test passes and the refit
    assert stage._pair_reserve(first, 100) == pytest.approx(1.0 + 100 * 0.1 + 20.0)  # the leader's own view: once

    stage._keep = keep
    assert stage.reserve(100) == keep
    t[0] = 60.0 - (keep + 4.0)  # 4 s over the kept time: under it, with the 5 s margin
    stage._score(later, "gem", HEADS[0], None, np.zeros(2, int), 100, None)
    assert f"{later}/gem/probe-l2" not in stage.state.candidates
    assert "ensemble with the leader" in stage.skipped[-1]["why"]

    # the leader is what fit would pick now, ensembles included: two heads on two other views that err apart lead
    # as their ensemble, and a later view's heads keep the test pass of that ensemble grown by the view (3 views;
    # issue 23, flowers17 at 10 minutes: keeping the best single head's view left a 4-view leader unaffordable)
    third = list(stage.views)[2]
    stage.costs.setup[third], stage.costs.spi[third] = 1.0, 0.1
    y = np.arange(10) % 3
    right, wrong = np.eye(3)[y] * 0.9 + 0.05, np.eye(3)[(y + 1) % 3] * 0.55 + np.eye(3)[y] * 0.45
    stage._y_val = y
    stage.state = CandidateStore(str(tmp_path / "fit2"), cfg)
    for view, bad in ((first, np.arange(10) >= 8), (third, np.arange(10) < 2)):  # each wrong on 2 other images
        params = {"view": view, "backbone": "x", "source": f"{view}/gap"}
        cand = Candidate(f"{view}/gap/probe-l2", "frozen", 0.8, 0.8, 1.0, params)
        stage.state.add(cand, np.where(bad[:, None], wrong, right))
    lead, _ = stage.leader()
    assert lead.kind == "ensemble" and lead.score[0] == 1.0
    assert stage._pair_reserve(later, 100) == pytest.approx(3 * (1.0 + 100 * 0.1) + 20.0)
    assert stage.view_cost(later, 100) >= 2 * (1.0 + 100 * 0.1) + stage.test_cost(later, 100)  # its partner: both


def test_a_view_that_does_not_fit_gives_way_to_its_cheaper_variant(train_data, tmp_path):
    """A view after the first that costs more than the time left is replaced by its first cheaper variant that fits
    (small images: the same backbone at the low-resolution side, with then without its flip); the variants are never
    tried for themselves, and a view whose variant ran is done (issue 23: cifar10-500 used 55-59% of 5 minutes)."""
    from finegrain.data import load_image_set
    from finegrain.recipe.candidates import views_for
    from finegrain.recipe.fit import CandidateStore, Clock
    from finegrain.recipe.frozen import FrozenStage

    views = views_for(["efficientnet_lite0", "mobilenetv2_100"], 32)
    assert views["mobilenetv2-low112-flip"] == {"backbone": "mobilenetv2_100", "image_size": 112, "crop_pct": 1.0,
                                                "flip": True, "fallback_of": "mobilenetv2-full224-flip"}  # fmt: skip
    assert not views["mobilenetv2-full224"]["flip"] and "low112-flip" in views and "fallback_of" not in views["eval"]
    assert [v for v in views if views[v].get("fallback_of") == "mobilenetv2-full224-flip"] == [
        "mobilenetv2-low112-flip", "mobilenetv2-low112", "mobilenetv2-full224"]  # fmt: skip

    cfg = _fit_cfg(train_data, tmp_path / "fit")
    t = [0.0]
    stage = FrozenStage(cfg, load_image_set(cfg.data), CandidateStore(cfg.out, cfg), Clock(1.0, now=lambda: t[0]),
                        progress=False)  # fmt: skip
    stage.views = views
    stage.costs.views = views
    stage.head_seconds["low112-flip"] = 0.0  # the first view: done
    stage.costs.setup["low112-flip"], stage.costs.spi["low112-flip"] = 0.0, 0.01
    assert "mobilenetv2-low112-flip" not in stage._order(late=True)
    big = stage.view_cost("mobilenetv2-full224-flip", 100)
    low = stage.view_cost("mobilenetv2-low112-flip", 100)
    lowest = stage.view_cost("mobilenetv2-low112", 100)
    assert lowest < low < big / 2  # a quarter of the pixels (the partner's test pass is the same in both)
    t[0] = 60.0 - 20.0 - (low + big) / 2  # between the two prices
    assert stage._fallback("mobilenetv2-full224-flip", 100) == "mobilenetv2-low112-flip"
    assert "mobilenetv2-full224-flip" in stage.untried(100) and not stage._ran("mobilenetv2-full224-flip")
    stage.head_seconds["mobilenetv2-low112-flip"] = 1.0
    assert stage._ran("mobilenetv2-full224-flip") and "mobilenetv2-full224-flip" not in stage.untried(100)
    t[0] = 60.0 - 20.0 - (lowest + low) / 2  # only the low side without its flip fits
    stage.head_seconds.pop("mobilenetv2-low112-flip")
    assert stage._fallback("mobilenetv2-full224-flip", 100) == "mobilenetv2-low112"
    t[0] = 60.0 - 20.0 - lowest / 2  # nothing fits
    assert stage._fallback("lite0-none", 100) is None and stage._fallback("full256-flip", 100) is None


def test_a_later_view_scores_only_the_heads_within_noise_of_the_best_so_far(train_data, tmp_path):
    """The (pooling, head) pairs rank alike across views: after the first view, only those within 2 standard errors
    of the best pair's estimate (at least 1 point, at least 3 pairs) are scored, and the view is priced with their
    time; a view whose heads are not all scored yet (a resumed run) informs nothing."""
    from finegrain.data import load_image_set
    from finegrain.recipe.candidates import HEADS, POOLINGS, Candidate
    from finegrain.recipe.fit import CandidateStore, Clock
    from finegrain.recipe.frozen import FrozenStage

    cfg = _fit_cfg(train_data, tmp_path / "fit")
    stage = FrozenStage(cfg, load_image_set(cfg.data), CandidateStore(cfg.out, cfg), Clock(1.0), progress=False)
    every = {(p, h[0]) for p in POOLINGS for h in HEADS}
    assert stage._kept_heads() == every and stage._heads_seconds() is None
    stage.n_trainval = 2000
    scores = {("gem", "probe-raw"): 0.90, ("gem", "probe-l2"): 0.895, ("gap", "probe-raw"): 0.89,
              ("gem", "ncm-pcaw"): 0.885, ("stages", "knn10-l2"): 0.64}  # fmt: skip
    for (pooling, head), top1 in scores.items():
        params = {"view": "eval", "pooling": pooling, "head": head}
        cand = Candidate(f"eval/{pooling}/{head}", "frozen", top1, top1, 10.0 if head.startswith("probe") else 2.0,
                         params, oof_top1=top1, oof_mean_per_class=top1, estimate="oof-5")  # fmt: skip
        stage.state.candidates[cand.name] = cand
    assert stage._kept_heads() == every  # the eval view is not scored through (resumed): all of them
    stage.head_seconds["eval"] = 50.0
    within = 2 * np.sqrt(2 * 0.9 * 0.1 / 2000)  # 1.9 points
    assert within > 0.015
    assert stage._kept_heads() == {k for k, v in scores.items() if v >= 0.9 - within}  # 4 of 5; the kNN is dropped
    assert stage._heads_seconds() == pytest.approx(3 * 10.0 + 2.0)
    stage.n_trainval = 10**6  # a tight estimate: still at least 1 point and 3 pairs
    assert stage._kept_heads() == {("gem", "probe-raw"), ("gem", "probe-l2"), ("gap", "probe-raw")}


@pytest.mark.parametrize("rank_by", ["mean_per_class", "top1"])
def test_a_long_tailed_fit_calibrates_its_sets_by_bands_of_training_counts(rank_by, tmp_path):
    """fit's conformal.json (recipe/fit.py `_save_calibration`) from the chosen candidate's out-of-fold
    probabilities: on long-tailed data (ranked by mean per-class accuracy) classes are calibrated in bands of
    training counts (evaluate/conformal.py `count_bands`), so the 6 rare classes share a threshold of their own;
    on balanced data one marginal threshold."""
    from types import SimpleNamespace as NS

    from scipy.special import softmax

    from finegrain.evaluate.conformal import Conformal
    from finegrain.recipe.candidates import Candidate
    from finegrain.recipe.fit import Choice, _save_calibration

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(9), np.r_[np.full(3, 40), np.full(6, 5)])
    proba = softmax(rng.normal(size=(len(y), 9)) + 3 * np.eye(9)[y], axis=1)
    samples = [NS(label=int(c)) for c in y]
    chosen = Candidate("a", "frozen", 0.9, 0.9, 1.0, oof_top1=0.9, oof_mean_per_class=0.9, estimate="oof-5",
                       rank_by=rank_by)  # fmt: skip
    splits = NS(train=samples[::2], val=samples[1::2])
    counts = np.bincount([s.label for s in splits.train + splits.val])  # FitContext.train_counts: train + val
    ctx = NS(store=NS(oof={"a": proba}, probas={}), splits=splits, train_counts=counts)
    _save_calibration(ctx, Choice([chosen], chosen, "best", NS(y=y)), str(tmp_path))
    saved = json.loads((tmp_path / "conformal.json").read_text())
    conf = Conformal.from_dict(saved)
    assert saved["calibrated_on"] == "out-of-fold" and len(saved["scores"]) == len(y)
    if rank_by == "mean_per_class":
        assert saved["groups"] == [5] * 3 + [2] * 6 and conf.calibration == "by 2 groups of classes"
        levels = conf.thresholds(0.9)
        assert len(set(levels[:3])) == len(set(levels[3:])) == 1 and levels[0] != levels[3]
    else:
        assert saved["groups"] is None and conf.calibration == "marginal"
