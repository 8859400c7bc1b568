"""Fine-tuning engine on a tiny real dataset: regimes, exact resume after SIGKILL, errors, export and load."""

import dataclasses
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from finegrain.config import TrainConfig
from finegrain.errors import FinegrainError
from finegrain.train.engine import train
from finegrain.train.regimes import Regime

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def data(train_data):
    return train_data


def _cfg(data, out, **kw):
    base = dict(
        data=data,
        out=str(out),
        backbone="efficientnet_lite0",
        image_size=64,
        regime="last:1",
        epochs=2,
        batch_size=8,
        workers=0,
        lr=0.05,
        val_fraction=0.25,
        warmup_epochs=0.5,
    )
    return TrainConfig(**{**base, **kw})


def test_regime_parsing_and_errors():
    assert str(Regime.parse("last:3")) == "last:3" and Regime.parse("scratch").pretrained is False
    for bad in ["last", "last:0", "partial", "full:2"]:
        with pytest.raises(FinegrainError):
            Regime.parse(bad)


def test_trunk_then_tail_equals_forward(lite0):
    from finegrain.models import ImageClassifier

    model = ImageClassifier(lite0, 5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for k in (1, 2, 7):
            torch.testing.assert_close(model.tail(model.trunk(x, k), k), model(x))


def test_last1_trains_only_the_last_stage_and_learns(data, tmp_path):
    from finegrain.backbones import create_backbone

    before = create_backbone("efficientnet_lite0").model.state_dict()
    result = train(_cfg(data, tmp_path / "run", epochs=3), progress=False)
    import finegrain

    predictor = finegrain.load(str(tmp_path / "run"), runtime="torch")
    after = predictor.model.backbone.model.state_dict()
    assert torch.equal(after["conv_stem.weight"], before["conv_stem.weight"])
    assert torch.equal(after["blocks.5.0.conv_pw.weight"], before["blocks.5.0.conv_pw.weight"])
    assert not torch.equal(after["blocks.6.0.conv_pw.weight"], before["blocks.6.0.conv_pw.weight"])
    assert result.test_metrics["top1"] >= 0.75 and result.best_val_top1 >= 0.75
    img = os.path.join(data, "test", "red", "000.jpg")
    assert predictor.predict([img], k=1)[0][0][0] == "red"
    run = tmp_path / "run"
    for name in ["config.yaml", "metrics.csv", "metrics.json", "checkpoint-last.pt", "model/model.safetensors"]:
        assert (run / name).exists(), name
    assert len((run / "metrics.csv").read_text().splitlines()) == 4  # header + 3 epochs


def test_head_regime_leaves_backbone_untouched(data, tmp_path):
    from finegrain.backbones import create_backbone

    before = create_backbone("efficientnet_lite0").model.state_dict()
    train(_cfg(data, tmp_path / "run", regime="head", epochs=1), progress=False)
    import finegrain

    after = finegrain.load(str(tmp_path / "run"), runtime="torch").model.backbone.model.state_dict()
    for k, v in before.items():
        if not k.startswith("classifier"):
            assert torch.equal(after[k], v), k  # BatchNorm statistics included


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_existing_run_needs_resume_and_bad_checkpoints_are_clear_errors(data, tmp_path):
    train(_cfg(data, tmp_path / "run", epochs=1, regime="head"), progress=False)
    with pytest.raises(FinegrainError, match="--resume"):
        train(_cfg(data, tmp_path / "run", epochs=1, regime="head"), progress=False)
    with pytest.raises(FinegrainError, match="no checkpoint"):
        train(_cfg(data, tmp_path / "other", resume=True), progress=False)
    (tmp_path / "run" / "checkpoint-last.pt").write_bytes(b"\x80garbage")
    with pytest.raises(FinegrainError, match="damaged"):
        train(_cfg(data, tmp_path / "run", epochs=2, regime="head", resume=True), progress=False)


def _cli(data, out, *extra):
    return [
        sys.executable,
        "-m",
        "finegrain",
        "train",
        data,
        "--out",
        str(out),
        "--no-progress",
        "--regime",
        "last:1",
        "image_size=64",
        "epochs=4",
        "batch_size=4",
        "workers=0",
        "lr=0.05",
        "val_fraction=0.25",
        "augment=randaugment",
        "mixup=0.2",
        "drop_rate=0.2",
        *extra,
    ]


def test_resume_after_sigkill_matches_an_uninterrupted_run(data, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "OMP_NUM_THREADS": "1"}
    subprocess.run(_cli(data, tmp_path / "ref"), check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    # killed at a known point, deterministically: right after epoch 2's checkpoint and metrics (finegrain/faults.py)
    proc = subprocess.run(_cli(data, killed), env={**env, "FINEGRAIN_KILL_AT": "epoch:2"}, capture_output=True)
    assert proc.returncode == -signal.SIGKILL and not (killed / "metrics.json").exists()
    assert len((killed / "metrics.csv").read_text().splitlines()) - 1 == 2
    subprocess.run(_cli(data, killed, "--resume"), check=True, env=env, capture_output=True)

    def table(run):
        rows = [r.split(",") for r in (run / "metrics.csv").read_text().splitlines()]
        skip = {rows[0].index(c) for c in ("train_images_per_s", "seconds")}
        return [[v for i, v in enumerate(r) if i not in skip] for r in rows]

    assert table(killed) == table(tmp_path / "ref")
    ref = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    res = json.loads((killed / "metrics.json").read_text())
    assert res["test"] == ref["test"] and res["best_epoch"] == ref["best_epoch"]


def test_cached_trunk_training_learns_and_matches_uncached_without_augmentation(data, tmp_path):
    common = dict(regime="last:1", epochs=2, augment="none", drop_rate=0.0, label_smoothing=0.0)
    plain = train(_cfg(data, tmp_path / "plain", **common), progress=False)
    cached = train(_cfg(data, tmp_path / "cached", cache_views=3, **common), progress=False)
    assert cached.history[-1]["train_top1"] >= 0.8  # it learns
    assert abs(cached.test_metrics["top1"] - plain.test_metrics["top1"]) <= 1 / 12 + 1e-9
    # same order, same (un-augmented) inputs: the runs differ only by the bf16 trunk (computed and stored in bf16)
    for a, b in zip(plain.history, cached.history):
        assert abs(a["train_loss"] - b["train_loss"]) < 0.05 and abs(a["val_loss"] - b["val_loss"]) < 0.15
    with pytest.raises(FinegrainError, match="cache_views"):
        train(_cfg(data, tmp_path / "bad", regime="full", cache_views=2), progress=False)


def test_head_without_augmentation_uses_cached_features_and_ema_runs(data, tmp_path):
    from finegrain.train.engine import Trainer
    from finegrain.train.steps import CachedTrunkSteps

    trainer = Trainer(_cfg(data, tmp_path / "h", regime="head", augment="none", epochs=1), progress=False).setup()
    assert isinstance(trainer.steps, CachedTrunkSteps)  # chosen at setup, with no cache_views asked for
    r = trainer.fit()
    cache = trainer.steps.train_cache
    assert cache is not None and cache.views.shape[2:] == (1280,)
    assert r.history[0]["train_loss"] > 0
    ema = train(_cfg(data, tmp_path / "ema", regime="last:1", epochs=2, ema_decay=0.5), progress=False)
    assert ema.test_metrics["n"] == 12 and len(ema.history) == 2
    assert (tmp_path / "ema" / "tensorboard").is_dir()


def test_long_tail_losses_and_samplers_plug_into_the_engine(data, tmp_path):
    r = train(
        _cfg(
            data,
            tmp_path / "ldam",
            regime="head",
            epochs=2,
            loss="ldam",
            normed_head=True,
            loss_options={"drw_start": 0.5, "s": 30.0},
            sampler="class-balanced",
            shot_thresholds=(8, 4),
        ),
        progress=False,
    )
    assert r.history[-1]["train_loss"] > 0 and r.test_metrics["n"] == 12
    assert set(r.test_metrics) >= {"many_shot", "medium_shot", "few_shot", "per_class_top1"}
    import finegrain

    assert finegrain.load(str(tmp_path / "ldam"), runtime="torch").predict(
        [os.path.join(data, "test", "red", "000.jpg")]
    )[0]
    from finegrain.models import NormedLinear
    from finegrain.train.engine import Trainer

    t = Trainer(_cfg(data, tmp_path / "la", regime="head", loss="logit-adjusted", normed_head=True), progress=False)
    t.setup()
    assert isinstance(t.model.head, NormedLinear) and sum(t.train_counts) == len(t.splits.train)


def test_no_validation_split_keeps_the_last_epoch(data, tmp_path):
    r = train(_cfg(data, tmp_path / "noval", regime="head", epochs=2, val_fraction=0.0), progress=False)
    assert r.best_epoch == 2 and r.test_metrics["n"] == 12
    assert len(__import__("finegrain").load(str(tmp_path / "noval")).classes) == 3


def test_a_time_budget_bounds_the_trunk_cache_and_reserves_the_test_pass(data, tmp_path):
    from finegrain.train.engine import Trainer

    # a budget (0.06 s) spent by the first view: the other 7 views asked for are never built, one epoch runs
    cfg = _cfg(data, tmp_path / "c", regime="last:1", epochs=3, cache_views=8, time_budget_min=0.001)
    trainer = Trainer(cfg, progress=False)
    r = trainer.fit()
    assert trainer.steps.train_cache.num_views == 1 and len(r.history) == 1
    # the test pass was reserved at a measured pace, and it ran
    assert trainer.steps.eval_pace() > 0 and r.test_metrics["n"] == 12
    # without a budget, views are sized to the epochs asked for
    trainer = Trainer(_cfg(data, tmp_path / "d", regime="last:1", epochs=2, cache_views=8), progress=False)
    trainer.fit()
    assert trainer.steps.train_cache.num_views == 2


def test_time_budget_shortens_the_plan_and_ends_the_schedule(data, tmp_path):
    """On a driven clock (each reading 1 s later; an epoch reads it 3 times, whatever this machine's pace), a 20 s
    budget plans and runs far fewer than the 50 epochs asked for, and ends the schedule with them."""
    import itertools

    from finegrain.train.engine import Trainer

    ticks = itertools.count()
    cfg = _cfg(data, tmp_path / "b", regime="head", epochs=50, time_budget_min=20 / 60)
    trainer = Trainer(cfg, progress=False, now=lambda: float(next(ticks)))
    r = trainer.fit()
    assert 3 <= len(r.history) <= 10 and trainer.planned_epochs == len(r.history)
    assert [row["seconds"] for row in r.history[:2]] == [2.0, 5.0]  # the driven clock, not the wall clock
    # the cosine was re-planned to end with the last planned step
    assert trainer.schedule.total_steps == trainer.planned_epochs * trainer.steps_per_epoch
    last = trainer.schedule.total_steps - 1
    assert trainer.schedule.lr_factor(last) < trainer.schedule.lr_factor(trainer.schedule.warmup_steps)


@pytest.mark.parametrize("cache_views", [0, 2])
def test_probe_head_init_starts_from_a_fitted_linear_probe(data, tmp_path, cache_views):
    """LP-FT: before any epoch, the head fitted on frozen features already classifies the validation split."""
    from finegrain.train.engine import Trainer
    from finegrain.train.probe_init import L2_GRID

    cfg = _cfg(data, tmp_path / f"lp{cache_views}", head_init="probe", cache_views=cache_views, val_fraction=0.34)
    trainer = Trainer(cfg, progress=False).setup()
    before = trainer.evaluate(trainer.splits.val)["top1"]
    if cache_views:
        trainer.build_caches()
    info = trainer.probe_init_head()
    after = trainer.evaluate(trainer.splits.val)["top1"]
    assert info["l2"] in L2_GRID and set(info["val_top1_by_l2"]) == set(L2_GRID)
    assert after == pytest.approx(info["val_top1"], abs=0.09)  # what the probe scored is what the model now scores
    assert after >= 0.6 and after > before  # the random MSRA head is at chance (1/3) on the three colours
    result = trainer.fit()
    assert result.test_metrics["top1"] >= 0.75
    # the probe-initialised model is the first candidate: the kept model is never worse on val than the start
    start = trainer.probe_info["val_top1_model"]
    assert start == pytest.approx(after) and result.best_val_top1 >= start
    saved = json.loads((tmp_path / f"lp{cache_views}" / "metrics.json").read_text())
    assert saved["head_init_probe"]["val_top1_model"] == start and saved["best_epoch"] >= 0


def test_head_init_must_be_known(data, tmp_path):
    from finegrain.train.engine import Trainer

    with pytest.raises(FinegrainError, match="head_init"):
        Trainer(_cfg(data, tmp_path / "x", head_init="zeros"), progress=False)


def test_probe_protocol_options_are_trained_saved_and_loaded(data, tmp_path):
    """crop_pct, crop_scale and feature_norm reach the model, its exported preprocessing, and `finegrain.load`."""
    import glob

    import finegrain
    from finegrain.models import FeatureNorm
    from finegrain.train.engine import Trainer

    cfg = _cfg(
        data,
        tmp_path / "pp",
        pooling="gem",
        crop_pct=1.0,
        crop_scale=[0.6, 1.0],
        feature_norm=True,
        head_init="probe",
        cache_views=2,
        val_fraction=0.34,
    )
    trainer = Trainer(cfg, progress=False).setup()
    model = trainer.model
    assert (
        isinstance(model.norm, FeatureNorm) and model.preprocess.crop_pct == 1.0 and model.preprocess.input_size == 64
    )
    with torch.no_grad():
        z = model.embed(model.forward_features(torch.randn(3, 3, 64, 64)))
    torch.testing.assert_close(z.norm(dim=1), torch.full((3,), z.shape[1] ** 0.5))  # unit size per dimension
    trainer.build_caches()
    info = trainer.probe_init_head()  # fitted on the normalized features: the model classifies with it at once
    assert trainer.evaluate(trainer.splits.val)["top1"] == pytest.approx(info["val_top1"], abs=0.09)
    assert info["val_top1"] >= 0.9
    trainer.fit()
    pred = finegrain.load(str(tmp_path / "pp"), runtime="torch")
    assert pred.model.feature_norm and pred.preprocess.crop_pct == 1.0
    images = sorted(glob.glob(os.path.join(data, "test", "*", "*")))[:4]
    model.eval()
    from finegrain.data import load_image
    from finegrain.train.augment import build_eval_transform

    x = torch.stack([build_eval_transform(model.preprocess)(load_image(p)) for p in images])
    with torch.no_grad():
        expected = model(model.preprocess.normalize(x)).softmax(-1).numpy()
    assert abs(pred.predict_proba(images) - expected).max() < 1e-4


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"crop_pct": 1.5}, "crop_pct"),
        ({"crop_scale": [0.8, 0.2]}, "crop_scale"),
        ({"crop_scale": [0.5]}, "crop_scale"),
    ],
)
def test_crop_options_are_checked(data, tmp_path, bad, match):
    from finegrain.train.engine import Trainer

    with pytest.raises(FinegrainError, match=match):
        Trainer(_cfg(data, tmp_path / "x", **bad), progress=False)


def test_choose_regime_follows_data_and_compute():
    from finegrain.train.auto_regime import auto_cache_views, choose_regime

    few = choose_regime([3] * 10)
    assert few.regime == "head" and "too few" in few.reason
    assert choose_regime([26] * 100).regime == "last:1"  # cub100-sized, no budget: last:1 won there
    assert choose_regime([60] * 100).regime == "last:2"
    assert choose_regime([500] * 10).regime == "full"
    # 2,600 images at 13 images/s (lite0 on this CPU): 2, 5 and 30 minutes
    picks = [choose_regime([26] * 100, images_per_second=13, budget_min=m) for m in (2, 5, 30)]
    assert [p.regime for p in picks] == ["head", "last:1", "last:1"]
    assert picks[2].passes == pytest.approx(1800 * 13 / 2600) and "9.0 full passes" in picks[2].reason
    big = [500] * 10  # 5,000 images: the time decides
    assert choose_regime(big, images_per_second=13, budget_min=15).regime == "last:1"  # 2.3 passes
    assert choose_regime(big, images_per_second=13, budget_min=60).regime == "last:2"  # 9.4 passes
    assert choose_regime(big, images_per_second=1000, budget_min=30).regime == "full"  # a GPU's speed
    assert [auto_cache_views(p) for p in (None, 0.2, 3.0, 9.0)] == [8, 1, 6, 16]


def test_measure_training_speed_leaves_the_model_untouched(lite0):
    from finegrain.models import ImageClassifier
    from finegrain.train.auto_regime import measure_training_speed

    model = ImageClassifier(lite0, 3)
    model.backbone.preprocess = model.backbone.preprocess.with_size(64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert measure_training_speed(model, batch_size=4, steps=1) > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


def test_auto_regime_is_explained_saved_and_kept_on_resume(data, tmp_path, capsys):
    import yaml

    from finegrain.train.engine import Trainer

    cfg = _cfg(data, tmp_path / "auto", regime="auto", epochs=2)
    first = train(cfg, progress=True)
    config_yaml = (tmp_path / "auto" / "config.yaml").read_text()
    saved = yaml.safe_load(config_yaml)
    # 9 training images a class and no time budget: the last stage, a trunk cached on the CPU over as many
    # augmented views as there are epochs (each epoch draws one view of each image; 8 would be wasted work)
    assert saved["regime"] == "last:1" and saved["cache_views"] == 2
    assert (
        saved["resolved"]["regime_auto"]["images_per_class"] == 9 and "regime auto -> last:1" in capsys.readouterr().out
    )
    resumed = Trainer(_cfg(data, tmp_path / "auto", regime="auto", epochs=2, resume=True), progress=False).setup()
    assert str(resumed.regime) == "last:1" and resumed.cfg.cache_views == 2
    # resuming the run that ended is a no-op that says so: nothing recomputed, config.yaml (auto's reason) kept
    model_file = tmp_path / "auto" / "model" / "model.safetensors"
    stamp = model_file.stat().st_mtime_ns
    again = train(dataclasses.replace(cfg, resume=True), progress=True)
    assert "nothing to resume" in capsys.readouterr().out
    assert again.test_metrics == first.test_metrics and len(again.history) == 2
    assert model_file.stat().st_mtime_ns == stamp and (tmp_path / "auto" / "config.yaml").read_text() == config_yaml
    tight = Trainer(_cfg(data, tmp_path / "tight", regime="auto", time_budget_min=0.001), progress=False).setup()
    assert str(tight.regime) == "head" and tight.regime_choice.passes < 1
