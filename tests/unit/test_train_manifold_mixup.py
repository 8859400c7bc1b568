"""Manifold mixup (Verma et al., 2019) on the cached trunk: features at the cut and targets mixed with one λ."""

from __future__ import annotations

import pytest
import torch
import yaml

from finegrain.cli.main import main
from finegrain.config import TrainConfig
from finegrain.errors import FinegrainError
from finegrain.train.engine import Trainer, train
from finegrain.train.mixing import mix_features, smooth_one_hot
from finegrain.train.seeding import epoch_seed


def _cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=data, out=str(out), backbone="efficientnet_lite0", image_size=64, regime="last:1", epochs=2,
                batch_size=8, workers=0, lr=0.05, val_fraction=0.25, warmup_epochs=0.5, cache_views=2,
                manifold_mixup=0.4)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_mix_features_mixes_features_and_targets_with_one_recorded_lambda():
    g = torch.Generator().manual_seed(0)
    h, y = torch.randn(5, 8, 3, 3, generator=g), torch.tensor([0, 1, 2, 3, 1])
    t = smooth_one_hot(y, 4, label_smoothing=0.1)
    lams = []
    for seed in range(4):
        hm, tm, lam = mix_features(
            h, y, 4, alpha=0.4, label_smoothing=0.1, generator=torch.Generator().manual_seed(seed)
        )
        assert 0 <= lam <= 1
        torch.testing.assert_close(hm, lam * h + (1 - lam) * h.flip(0))
        torch.testing.assert_close(tm, lam * t + (1 - lam) * t.flip(0))
        torch.testing.assert_close(tm.sum(1), torch.ones(5))
        again = mix_features(h, y, 4, alpha=0.4, label_smoothing=0.1, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(hm, again[0]) and torch.equal(tm, again[1]) and lam == again[2]  # seeded
        lams.append(lam)
    assert len(set(lams)) == 4
    off = mix_features(h, y, 4, alpha=0.0, label_smoothing=0.1, generator=torch.Generator())
    assert off[0] is h and torch.equal(off[1], t) and off[2] == 1.0
    with pytest.raises(ValueError, match="labels"):
        mix_features(h, y[:2], 4, alpha=0.4, generator=torch.Generator())


def _lambda_from_features(mixed: torch.Tensor, h: torch.Tensor) -> float:
    """λ such that mixed = λ·h + (1 - λ)·h.flip(0), read where the two differ."""
    d = h - h.flip(0)
    keep = d.abs() > 1e-2
    return float(((mixed - h.flip(0))[keep] / d[keep]).median())


def test_cached_steps_mix_trunk_outputs_and_targets_alike_and_reproducibly(train_data, tmp_path):
    assert TrainConfig().manifold_mixup == 0.0  # off by default
    cfg = _cfg(train_data, tmp_path / "m", label_smoothing=0.1)
    trainer = Trainer(cfg, progress=False).setup()
    steps = trainer.steps
    steps.prepare()
    mixed = list(steps.train_batches(0)[1])
    assert [torch.equal(a.x, b.x) for a, b in zip(mixed, steps.train_batches(0)[1])] == [True] * len(mixed)
    # the unmixed batches in the same order: the cached-trunk order is seeded by (seed, epoch, stream 1)
    order = torch.Generator().manual_seed(epoch_seed(cfg.seed, 0, 1))
    raw = list(steps.train_cache.batches(batch_size=cfg.batch_size, generator=order))
    assert len(raw) == len(mixed) > 1
    lams = []
    for batch, (h, y) in zip(mixed, raw):
        assert torch.equal(batch.y, y) and batch.target.shape == (len(y), 3)
        lam = _lambda_from_features(batch.x, h)
        torch.testing.assert_close(batch.x, lam * h + (1 - lam) * h.flip(0), atol=1e-4, rtol=1e-4)
        t = smooth_one_hot(y, 3, label_smoothing=0.1)
        torch.testing.assert_close(batch.target, lam * t + (1 - lam) * t.flip(0), atol=1e-4, rtol=1e-4)
        lams.append(lam)
    assert len({round(lam, 4) for lam in lams}) == len(lams)  # a λ a batch

    off = Trainer(_cfg(train_data, tmp_path / "off", manifold_mixup=0.0), progress=False).setup()
    off.steps.prepare()
    batch = next(iter(off.steps.train_batches(0)[1]))
    assert batch.target is batch.y  # int labels: nothing mixed


def test_short_training_with_manifold_mixup_runs_and_saves_the_option(train_data, tmp_path):
    r = train(_cfg(train_data, tmp_path / "run"), progress=False)
    assert len(r.history) == 2 and all(h["train_loss"] > 0 for h in r.history)
    assert r.test_metrics["n"] == 12
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["manifold_mixup"] == 0.4 and saved["cache_views"] == 2


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(regime="full"), "needs regime head or last:K and cache_views >= 1"),
        (dict(cache_views=0), "got regime last:1, cache_views 0"),
        (dict(mixup=0.2), "exclude each other"),
    ],
    ids=["full", "no-cache", "with-mixup"],
)
def test_manifold_mixup_without_the_trunk_cache_is_a_clear_error(tmp_path, kw, match):
    with pytest.raises(FinegrainError, match=match):
        Trainer(_cfg(str(tmp_path), tmp_path / "x", **kw), progress=False)


def test_cli_exposes_manifold_mixup(train_data, tmp_path, capsys):
    argv = ["train", train_data, "--out", str(tmp_path / "c"), "--regime", "full", "--no-progress"]
    assert main([*argv, "--manifold-mixup", "0.4"]) == 2
    assert "manifold_mixup mixes the cached trunk output" in capsys.readouterr().err
    assert main([*argv, "manifold_mixup=-1"]) == 2
    assert "manifold_mixup must be a number >= 0" in capsys.readouterr().err
