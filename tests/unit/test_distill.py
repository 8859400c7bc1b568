"""Distillation-based self-training (semi/distill.py): the loss, a student pulled toward its teacher's soft labels on
unlabeled images, and `finegrain train DATA --unlabeled DIR`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from finegrain.config import TrainConfig
from finegrain.data import load_image_set
from finegrain.recipe.unlabeled import unlabeled_paths
from finegrain.semi.distill import DistillTrainer, Teacher, distillation_loss
from tests.conftest import COLOURS, write_class_images

TINY = dict(backbone="test_efficientnet", pretrained=False, image_size=32, batch_size=8, workers=0, lr=0.05,
            warmup_epochs=0.0, val_fraction=0.25, regime="last:1", cache_views=1)  # fmt: skip


def test_distillation_loss_is_t_squared_kl_of_the_softened_distributions():
    s = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    t = torch.tensor([[1.0, 1.0, 0.0], [-2.0, 0.0, 2.0]])
    for T in (1.0, 2.0, 4.0):
        q = torch.softmax(t / T, 1)
        p = torch.softmax(s / T, 1)
        expected = T * T * (q * (q.log() - p.log())).sum(1).mean()
        assert torch.allclose(distillation_loss(s, t, temperature=T), expected, atol=1e-6)
    assert distillation_loss(t, t, temperature=2.0).abs() < 1e-6  # a student equal to its teacher: no loss


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    for c, name in enumerate(["red", "green", "blue"]):
        write_class_images(str(root / "pool" / name), COLOURS[c], 4, seed=40 + c)
    (root / "empty").mkdir()
    return {"pool": str(root / "pool"), "empty": str(root / "empty")}


def _student_on_pool(trainer: DistillTrainer) -> torch.Tensor:
    """The trained student's probabilities [M, C] on the first cached view of the unlabeled images."""
    cache = trainer.unlabeled_cache
    trainer.model.eval()
    with torch.no_grad():
        return torch.softmax(trainer.steps.forward(cache.views[0].float()), dim=1)


def test_a_student_moves_toward_its_teachers_soft_labels_on_unlabeled_images(train_data, pool, tmp_path):
    paths = unlabeled_paths(pool["pool"], load_image_set(train_data))
    # A teacher that calls every unlabeled image mostly "green" (class 1), whatever its colour: only the distillation
    # term can teach the student that, so the student trained with it must agree with the teacher more.
    logits = np.tile([0.0, 3.0, 0.0], (len(paths), 1))
    target = torch.softmax(torch.tensor(logits, dtype=torch.float32), dim=1)
    kl = {}
    for weight in (0.0, 5.0):
        teacher = Teacher(logits, np.ones(len(paths), bool), {"method": "fixture"})
        cfg = TrainConfig(data=train_data, out=str(tmp_path / f"w{weight}"), epochs=4, seed=0, **TINY)
        trainer = DistillTrainer(cfg, paths, teacher=teacher, weight=weight, temperature=1.0, progress=False)
        trainer.fit()
        p = _student_on_pool(trainer)
        kl[weight] = float((target * (target.log() - p.log())).sum(1).mean())
        doc = json.loads((tmp_path / f"w{weight}" / "unlabeled.json").read_text())
        assert doc["n_used"] == len(paths) == doc["n_files"] and doc["weight"] == weight
    assert kl[5.0] < 0.5 * kl[0.0], kl


def test_train_with_unlabeled_images_distils_from_a_label_propagation_teacher(train_data, pool, tmp_path, capsys):
    from finegrain.cli.main import main

    out = tmp_path / "run"
    opts = [f"{k}={v}" for k, v in TINY.items() if k != "regime"]
    assert main(["train", train_data, "--out", str(out), "--unlabeled", pool["pool"], "--regime", "last:1",
                 "--no-progress", "epochs=1", *opts]) == 0  # fmt: skip
    doc = json.loads((out / "unlabeled.json").read_text())
    assert doc["method"] == "distillation" and doc["teacher"] == "label-propagation"
    assert doc["n_unlabeled"] == 12 and 0 <= doc["n_used"] <= 12 and doc["temperature"] == 2.0
    assert (out / "model").is_dir() and "test top-1" in capsys.readouterr().out


@pytest.mark.parametrize(("which", "words"), [("empty", "has no images"), ("data", "overlaps the labelled data")])
def test_train_with_a_bad_unlabeled_folder_is_one_clear_line(train_data, pool, which, words, tmp_path, capsys):
    from finegrain.cli.main import main

    folder = train_data if which == "data" else pool[which]
    assert main(["train", train_data, "--out", str(tmp_path / "t"), "--unlabeled", folder, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("finegrain: error: unlabeled folder") and words in err[0], err


def test_train_with_unlabeled_images_needs_a_cached_regime(train_data, pool, tmp_path, capsys):
    from finegrain.cli.main import main

    argv = ["train", train_data, "--out", str(tmp_path / "f"), "--unlabeled", pool["pool"], "--regime", "full",
            "--no-progress", "backbone=test_efficientnet", "pretrained=false", "workers=0"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs regime head or last:K" in err[0], err


def test_fit_scores_a_distilled_student_as_a_candidate_when_the_budget_allows(tmp_path, monkeypatch):
    from finegrain.recipe import FitConfig, fit
    from finegrain.recipe import unlabeled as recipe_unlabeled

    root = tmp_path / "d"
    for c, name in enumerate(["red", "green", "blue"]):
        write_class_images(str(root / "data" / "train" / name), COLOURS[c], 5, seed=c)
        write_class_images(str(root / "data" / "test" / name), COLOURS[c], 1, seed=10 + c)
        write_class_images(str(root / "pool" / name), COLOURS[c], 2, seed=20 + c)
    monkeypatch.setattr(recipe_unlabeled, "DISTILL_MIN_SECONDS", -1e9)  # the tiny budget could not afford it
    cfg = FitConfig(data=str(root / "data"), out=str(tmp_path / "fit"), budget_min=1.0, workers=0, bootstrap=20,
                    unlabeled=str(root / "pool"))  # fmt: skip
    result = fit(cfg, progress=False)
    board = {c.name: c for c in result.leaderboard}
    assert board["distill"].kind == "finetune" and 0 <= board["distill"].val_top1 <= 1
    # the student is offered averaged with its teacher (the best semi candidate), never alone
    pairs = [c.members for c in result.leaderboard if len(c.members) == 2 and c.members[1] == "distill"]
    assert any(board[m[0]].kind == "semi" for m in pairs) and result.chosen.name != "distill"
    runs = json.loads((tmp_path / "fit" / "unlabeled.json").read_text())["runs"]
    report = next(r for r in runs if r["candidate"] == "distill")
    assert report["method"] == "distillation" and report["n_unlabeled"] == 6 and 0 <= report["n_used"] <= 6
