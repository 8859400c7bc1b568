"""CAM, Grad-CAM, attention pooling and boxes, on real (tiny) models and real image files."""

import copy
import json
import os

import numpy as np
import pytest
import torch

import finegrain
from finegrain.cli.main import main
from finegrain.config import TrainConfig
from finegrain.errors import FinegrainError
from finegrain.explain import box_from_map, explain_tensor
from finegrain.explain.cam import auto_target_layer, view_to_original
from finegrain.models import ImageClassifier
from finegrain.models.pooling import AttentionPool, create_pooling
from finegrain.train.engine import train


@pytest.fixture(scope="module")
def gap_model(_lite0_weights):
    torch.manual_seed(0)
    model = ImageClassifier(copy.deepcopy(_lite0_weights), 4).eval()
    return model


def test_cam_is_the_head_applied_at_each_position(gap_model):
    torch.manual_seed(1)
    x = torch.randn(1, 3, 96, 96)
    heat, t, proba, method, layer = explain_tensor(gap_model, x, method="cam", target=2)
    assert method == "cam" and t == 2 and heat.shape == (96, 96)
    assert heat.min() == pytest.approx(0.0) and heat.max() == pytest.approx(1.0)
    with torch.no_grad():
        fmap = gap_model.forward_features(x)[0]
        raw = torch.einsum("c,chw->hw", gap_model.head.weight[2], fmap)
        # the mean of the CAM plus the bias is the logit: what makes CAM exact for GAP + linear heads
        logit = gap_model(x)[0, 2]
    torch.testing.assert_close(raw.mean() + gap_model.head.bias[2], logit, rtol=1e-4, atol=1e-4)
    assert np.allclose(proba.sum(), 1.0, atol=1e-5)


def test_gradcam_at_the_last_layer_equals_relu_cam_for_gap_linear(gap_model):
    # For GAP -> linear, d logit_c / d A_k(i,j) = w_ck / HW, so Grad-CAM = ReLU(CAM) / HW: same map once normalised.
    torch.manual_seed(2)
    x = torch.randn(1, 3, 96, 96)
    layer = auto_target_layer(gap_model, x)
    assert layer == "backbone.model.bn2"  # the last spatial layer of EfficientNet's forward_features
    grad, t, _, method, used = explain_tensor(gap_model, x, method="gradcam", target=1)
    assert method == "gradcam" and used == layer
    with torch.no_grad():
        fmap = gap_model.forward_features(x)[0]
        cam = torch.relu(torch.einsum("c,chw->hw", gap_model.head.weight[1], fmap))
    from finegrain.explain.cam import _normalise

    np.testing.assert_allclose(grad, _normalise(cam, 96), atol=1e-4)


def test_gradcam_on_an_inner_layer_and_bad_layer(gap_model):
    x = torch.randn(1, 3, 64, 64)
    heat, *_ = explain_tensor(gap_model, x, method="gradcam", layer="backbone.model.blocks.4")
    assert heat.shape == (64, 64) and np.isfinite(heat).all()
    with pytest.raises(FinegrainError, match="no layer"):
        explain_tensor(gap_model, x, method="gradcam", layer="backbone.nowhere")
    with pytest.raises(FinegrainError, match="unknown explanation"):
        explain_tensor(gap_model, x, method="lime")


def test_box_from_map_takes_the_largest_region():
    heat = np.zeros((50, 60))
    heat[10:20, 5:25] = 1.0  # big blob
    heat[40:43, 50:53] = 0.9  # small blob
    assert box_from_map(heat, 0.2) == (5, 10, 25, 20)
    assert box_from_map(np.zeros((8, 8))) is None
    with pytest.raises(FinegrainError):
        box_from_map(heat, 1.5)


def test_view_box_maps_back_to_the_original_image():
    from finegrain.backbones import Preprocess

    pre = Preprocess(input_size=224, crop_pct=0.875)  # short side 256, centre crop 224
    # original 512 x 1024 (w x h): scale 0.5, resized 256 x 512, crop offsets left 16, top 144
    assert view_to_original((0, 0, 224, 224), (512, 1024), pre) == (32, 288, 480, 736)


def test_attention_pool_starts_as_gap_and_its_map_sums_to_one():
    pool = create_pooling("attn", channels=8)
    x = torch.rand(3, 8, 5, 7)
    torch.testing.assert_close(pool(x), x.mean(dim=(2, 3)))
    w = pool.attention_map(x)
    assert w.shape == (3, 5, 7)
    torch.testing.assert_close(w.sum(dim=(1, 2)), torch.ones(3))
    with pytest.raises(FinegrainError, match="learned"):
        create_pooling("attn")


@pytest.mark.parametrize("regime", ["head", "last:1"])
def test_attention_pooling_trains_in_every_regime(train_data, tmp_path, regime):
    cfg = TrainConfig(
        data=train_data,
        out=str(tmp_path / "run"),
        backbone="efficientnet_lite0",
        image_size=64,
        regime=regime,
        pooling="attn",
        epochs=2,
        batch_size=8,
        workers=0,
        lr=0.05,
        val_fraction=0.0,
        warmup_epochs=0,
        cache_views=1 if regime == "head" else 0,
    )
    train(cfg, progress=False)
    predictor = finegrain.load(str(tmp_path / "run"))
    assert isinstance(predictor.model.pool, AttentionPool)
    last = predictor.model.pool.score[2]
    assert last.weight.abs().sum() > 0  # moved away from its zero (GAP) start: the attention learned
    img = os.path.join(train_data, "test", "red", "000.jpg")
    (e,) = finegrain.explain.explain_images(predictor, [img])
    assert e.method == "attention" and e.heatmap.shape == (64, 64)


def test_cli_explain_writes_overlays_boxes_and_skips_bad_files(train_data, tmp_path, capsys):
    from PIL import Image

    run = tmp_path / "run"
    cfg = TrainConfig(
        data=train_data, out=str(run), backbone="efficientnet_lite0", image_size=64, regime="head",
        epochs=1, batch_size=8, workers=0, val_fraction=0.0, warmup_epochs=0,
    )  # fmt: skip
    train(cfg, progress=False)
    good = [os.path.join(train_data, "test", c, "000.jpg") for c in ("red", "blue")]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    out = tmp_path / "cams"
    assert main(["explain", str(run), *good, str(bad), "--out", str(out)]) == 1  # partly done: one skipped
    records = json.loads((out / "explanations.json").read_text())
    assert len(records) == 3 and "skipped" in records[2]
    for r in records[:2]:
        assert r["method"] == "cam" and r["box_original"] is not None
        x0, y0, x1, y1 = r["box_original"]
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 48  # inside the 64 x 48 original
        overlay = Image.open(out / r["overlay"])
        assert overlay.size == (64, 64) and np.asarray(overlay).std() > 0
    assert f"skipped {bad}" in capsys.readouterr().err
    assert main(["explain", str(run), good[0], "--out", str(out), "--method", "attention"]) == 2


def test_gradcam_picks_the_last_stage_of_a_resnet_with_gem():
    """Any backbone: a timm ResNet (random weights, offline) with GeM pooling gets Grad-CAM on its last stage."""
    from finegrain.backbones import create_backbone

    torch.manual_seed(0)  # random weights: a seed keeps the map non-trivial (ReLU can zero a random Grad-CAM)
    model = ImageClassifier(create_backbone("resnet18", pretrained=False), 3, pooling="gem").eval()
    x = torch.randn(1, 3, 64, 64)
    heat, t, proba, method, layer = explain_tensor(model, x)
    assert method == "gradcam" and layer.startswith("backbone.model.layer4")
    assert heat.shape == (64, 64) and np.isfinite(heat).all() and heat.max() == pytest.approx(1.0)
