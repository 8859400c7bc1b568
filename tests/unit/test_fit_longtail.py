"""fit on long-tailed data: ranked by mean per-class accuracy, logit-adjusted probes as candidates, and such a
candidate saved as a model whose head is the probe's shifted by -τ log π."""

from __future__ import annotations

import json

import numpy as np
import pytest

from finegrain.data import load_image_set
from finegrain.data.longtail import describe_counts
from finegrain.recipe import FitConfig
from finegrain.recipe.longtail import adjust
from tests.conftest import COLOURS, fit_on_a_still_clock, write_class_images


def test_adjust_and_imbalance_ratio():
    assert describe_counts(np.array([30, 10, 0, 3]))["imbalance_ratio"] == 10.0
    p = np.array([[0.6, 0.4], [0.0, 0.0]])
    prior = np.array([0.8, 0.2])
    np.testing.assert_allclose(adjust(p, prior, 0.0), p)
    a = adjust(p, prior, 1.0)  # 0.6/0.8 vs 0.4/0.2: the rare class wins
    np.testing.assert_allclose(a[0], [0.75 / 2.75, 2.0 / 2.75])
    assert (a[1] == 0).all()


@pytest.fixture(scope="module")
def lt_fit(tmp_path_factory):
    root = tmp_path_factory.mktemp("lt")
    for c, (name, n) in enumerate([("red", 18), ("green", 6), ("blue", 4)]):
        write_class_images(str(root / "data" / "train" / name), COLOURS[c], n, seed=c)
        write_class_images(str(root / "data" / "test" / name), COLOURS[c], 3, seed=10 + c)
    cfg = FitConfig(data=str(root / "data"), out=str(root / "fit"), budget_min=1.0, finetune=False, ensemble=False,
                    workers=0, bootstrap=20)  # fmt: skip
    return cfg, fit_on_a_still_clock(cfg)


def test_long_tailed_fit_ranks_by_mean_per_class_and_tries_logit_adjustment(lt_fit):
    cfg, result = lt_fit
    la = [c for c in result.leaderboard if c.name.endswith("+la")]
    assert la and all(c.params["la_tau"] >= 0 and c.params["head"].startswith("probe") for c in la)
    assert {c.rank_by for c in result.leaderboard} == {"mean_per_class"}
    doc = json.loads(open(f"{cfg.out}/fit.json").read())
    assert doc["ranked_by"] == "mean_per_class" and "mean per-class accuracy (long-tailed data)" in doc["reason"]
    rows = open(f"{cfg.out}/leaderboard.csv").read()
    assert "+la" in rows


def test_a_logit_adjusted_candidate_becomes_the_probe_shifted_by_tau_log_prior(lt_fit):
    from finegrain.recipe.fit import CandidateStore, Clock
    from finegrain.recipe.frozen import FrozenStage

    cfg, result = lt_fit
    cand = max((c for c in result.leaderboard if c.name.endswith("+la")), key=lambda c: c.params["la_tau"])
    base = next(c for c in result.leaderboard if c.name == cand.name.removesuffix("+la"))
    stage = FrozenStage(cfg, load_image_set(cfg.data), CandidateStore(cfg.out, cfg), Clock(1.0), progress=False)
    (model, spec), (plain, _) = stage.final_model(cand), stage.final_model(base)
    assert spec.extra["classifier"] == "LogitAdjusted"
    counts = np.asarray(spec.train_counts, np.float64)
    shift = -cand.params["la_tau"] * np.log(counts / counts.sum())
    np.testing.assert_allclose(model.head.bias.detach().numpy() - plain.head.bias.detach().numpy(), shift, atol=1e-5)
    np.testing.assert_allclose(model.head.weight.detach().numpy(), plain.head.weight.detach().numpy())
