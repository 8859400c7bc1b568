"""`finegrain fit`: candidates chosen on validation inside the budget, one model folder out, resumable, honest."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import finegrain
from finegrain.errors import FinegrainError
from finegrain.recipe import FitConfig, fit
from tests.conftest import COLOURS, write_class_images


def _fit_cfg(data, out, **kw):
    kw.setdefault("budget_min", 1.0)
    kw.setdefault("finetune", False)
    kw.setdefault("workers", 0)
    kw.setdefault("bootstrap", 50)
    return FitConfig(data=data, out=str(out), **kw)


def test_fit_writes_the_model_leaderboard_and_reason_and_scores_test_once(train_data, tmp_path):
    result = fit(_fit_cfg(train_data, tmp_path / "fit"), progress=False)
    out = tmp_path / "fit"
    summary = json.loads((out / "fit.json").read_text())
    assert summary["chosen"] == result.chosen.name and "highest validation top-1" in summary["reason"]
    # the budget bounds the whole command: recorded, not asserted on the wall clock (no timing assertions in tests)
    assert summary["budget_min"] == 1.0 and summary["seconds"] > 0
    splits = summary["splits"]  # val carved from train; the test split untouched
    assert splits["train"] + splits["val"] == 36 and splits["val"] >= 3 and splits["test"] == 12
    with open(out / "leaderboard.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["name"] == result.leaderboard[0].name and len(rows) == len(result.leaderboard) >= 8
    assert result.chosen.val_top1 == max(float(r["val_top1"]) for r in rows)
    assert result.test is not None and result.test["n"] == 12 and 0 <= result.test["metrics"]["top1"] <= 1
    model = finegrain.load(str(out / "model"))
    paths = [os.path.join(root, f) for root, _, files in os.walk(os.path.join(train_data, "test")) for f in files]
    proba = model.predict_proba(sorted(paths))
    assert proba.shape == (12, 3) and np.allclose(proba.sum(1), 1, atol=1e-5)
    assert np.mean(proba.argmax(1) == np.repeat([0, 1, 2], 4)) >= 0.5  # classes blue, green, red; colours differ


def test_a_killed_fit_resumes_and_ends_with_the_same_choice(train_data, tmp_path):
    cmd = [sys.executable, "-m", "finegrain", "fit", train_data, "--budget-min", "2", "--no-finetune",
           "--workers", "0", "--no-progress"]  # fmt: skip
    whole = subprocess.run([*cmd, "--out", str(tmp_path / "whole")], capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "fit-state" / "candidates.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and len(json.loads(state.read_text())["candidates"]) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(json.loads(state.read_text())["candidates"])
    assert not (killed / "fit.json").exists() and done_before >= 3
    again = subprocess.run([*cmd, "--out", str(killed)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    first, second = (json.loads((p / "fit.json").read_text()) for p in (tmp_path / "whole", killed))
    assert second["chosen"] == first["chosen"] and second["val_top1"] == first["val_top1"]
    assert second["test"]["metrics"]["top1"] == pytest.approx(first["test"]["metrics"]["top1"])


def test_fit_refuses_data_it_cannot_choose_on(tmp_path):
    one = tmp_path / "one"
    write_class_images(str(one / "train" / "red"), COLOURS[0], 6, seed=0)
    with pytest.raises(FinegrainError, match="at least 2 classes"):
        fit(_fit_cfg(str(one), tmp_path / "o1"), progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FinegrainError):
        fit(_fit_cfg(str(empty), tmp_path / "o2"), progress=False)
    with pytest.raises(FinegrainError, match="budget_min must be positive"):
        fit(_fit_cfg(str(one), tmp_path / "o3", budget_min=0), progress=False)


def test_fit_warns_about_classes_too_small_to_validate_and_test_classes_never_trained(tmp_path, capsys):
    root = tmp_path / "data"
    for c, name in enumerate(["red", "green", "blue"]):
        write_class_images(str(root / "train" / name), COLOURS[c], 1 if name == "blue" else 8, seed=c)
        write_class_images(str(root / "test" / name), COLOURS[c], 2, seed=10 + c)
    write_class_images(str(root / "test" / "grey"), (128, 128, 128), 2, seed=20)
    result = fit(_fit_cfg(str(root), tmp_path / "fit"), progress=False)
    out = capsys.readouterr().out
    assert "too few images for a validation image (e.g. 'blue')" in out
    assert "no training image (e.g. 'grey')" in out
    assert result.test["n"] == 8 and len(json.loads((tmp_path / "fit" / "fit.json").read_text())["warnings"]) == 2


def test_a_rerun_with_other_settings_is_refused(train_data, tmp_path):
    fit(_fit_cfg(train_data, tmp_path / "fit", ensemble=False), progress=False)
    with pytest.raises(FinegrainError, match="other settings"):
        fit(_fit_cfg(train_data, tmp_path / "fit", seed=3), progress=False)
