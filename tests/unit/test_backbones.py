import os

import numpy as np
import pytest
import torch
from PIL import Image

from finegrain.backbones import Preprocess, create_backbone, list_backbones
from finegrain.backbones.offline import OFFLINE_WEIGHTS, remap_offline_state, weights_file
from finegrain.errors import FinegrainError


@pytest.mark.parametrize("name", sorted(OFFLINE_WEIGHTS))
def test_offline_weights_remap_with_no_missing_or_unexpected_keys(name):
    import timm

    try:
        path = weights_file(name)
    except FinegrainError as e:
        pytest.skip(str(e))
    model = timm.create_model(OFFLINE_WEIGHTS[name].arch, pretrained=False)
    state = remap_offline_state(name, torch.load(path, map_location="cpu", weights_only=True), model)
    missing, unexpected = model.load_state_dict(state, strict=True), None
    assert not missing.missing_keys and not missing.unexpected_keys and unexpected is None
    for key, value in state.items():
        assert model.state_dict()[key].shape == value.shape


def test_unknown_backbone_is_one_line_error_listing_valid_names():
    with pytest.raises(FinegrainError) as e:
        create_backbone("efficientnet_lite9")
    msg = str(e.value)
    assert "\n" not in msg and "efficientnet_lite0" in msg and "timm" in msg


def test_hub_weights_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FinegrainError) as e:
        create_backbone("resnet18", pretrained=True)
    assert "offline" in str(e.value) and "\n" not in str(e.value)


def test_preprocess_matches_timm_eval_transform(tiny_backbone):
    from timm.data import create_transform

    pp = Preprocess(input_size=96, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), crop_pct=0.875)
    tf = create_transform(
        input_size=(3, 96, 96), mean=pp.mean, std=pp.std, crop_pct=pp.crop_pct, interpolation="bicubic"
    )
    rng = np.random.default_rng(0)
    for size in [(150, 100), (100, 150), (96, 96), (300, 301)]:
        img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3)).astype(np.uint8))
        ours = pp.normalize(pp.pil_to_uint8(img)[None])[0]
        theirs = tf(img)
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max() < 1e-4


def test_preprocess_rejects_bad_values_and_round_trips():
    with pytest.raises(ValueError, match="interpolation"):
        Preprocess(interpolation="cubic-ish")
    pp = Preprocess(input_size=240, crop_pct=0.9)
    assert Preprocess.from_dict(pp.to_dict()) == pp
    assert pp.with_size(288).input_size == 288 and pp.fingerprint() != pp.with_size(288).fingerprint()


def test_backbone_face(tiny_backbone):
    x = torch.randn(2, 3, 64, 64)
    fmap = tiny_backbone.forward_features(x)
    assert fmap.ndim == 4 and fmap.shape[1] == tiny_backbone.num_features
    assert tiny_backbone(x).shape == (2, 1000)
    assert tiny_backbone.describe()["source"] == "random"
    assert "efficientnet_lite0" in list_backbones()


def test_local_checkpoint_loads_weights_only(tmp_path, tiny_backbone):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    other = create_backbone("test_efficientnet", pretrained=False)
    sd = {k: v.clone().contiguous() for k, v in other.model.state_dict().items()}
    for path in [tmp_path / "w.pth", tmp_path / "w.safetensors"]:
        torch.save(sd, path) if path.suffix == ".pth" else save_file(sd, str(path))
        loaded = create_backbone("test_efficientnet", checkpoint=str(path))
        assert loaded.source.startswith("checkpoint:")
        for k, v in loaded.model.state_dict().items():
            assert torch.equal(v, sd[k])
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(FinegrainError, match="weights only"):
        create_backbone("test_efficientnet", checkpoint=str(tmp_path / "bad.pth"))
    with pytest.raises(FinegrainError, match="not found"):
        create_backbone("test_efficientnet", checkpoint=os.path.join(tmp_path, "missing.pth"))
