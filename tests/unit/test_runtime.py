"""The inference core: precision chosen by a capability check, one dataset/collate over real files, one forward."""

from __future__ import annotations

import glob
import os

import pytest
import torch

from finegrain.errors import FinegrainError
from finegrain.models import ImageClassifier, ModelSpec, build_model, load_model, save_model
from finegrain.runtime import ImageFiles, Runtime, forward, image_loader, resolve_precision
from finegrain.runtime import settings as runtime_settings


@pytest.mark.parametrize(
    ("capability", "flags", "expected"),
    [
        ("AVX2", {"avx2"}, "fp32"),  # AVX2-only CPU: bf16 would be emulated
        ("AVX512", {"avx512f"}, "fp32"),  # Skylake-X / Cascade Lake: AVX-512 without bf16 instructions
        ("AVX512", {"avx512f", "avx512_bf16"}, "bf16"),
        ("AMX", {"avx512f", "amx_bf16"}, "bf16"),
    ],
)
def test_auto_precision_follows_the_cpu_capability(monkeypatch, capability, flags, expected):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(runtime_settings, "_cpu_flags", lambda: flags)
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert Runtime("cpu", "auto").resolved_precision == expected
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"  # an explicit choice is kept


def test_bad_precision_and_amp_without_cuda_are_clear_errors():
    with pytest.raises(FinegrainError, match="precision must be one of"):
        Runtime("cpu", "fp8")
    with pytest.raises(FinegrainError, match="amp needs a CUDA device"):
        Runtime("cpu", "amp").autocast()


def test_image_files_skip_a_broken_file_and_keep_labels(tiny_folder, tmp_path):
    paths = sorted(glob.glob(os.path.join(tiny_folder, "train", "*", "*.jpg")))[:5]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    files = paths[:2] + [str(broken)] + paths[2:]
    data = ImageFiles(files, lambda img: torch.zeros(3, 8, 8, dtype=torch.uint8), labels=[0, 1, 2, 3, 4, 5])
    batches = list(image_loader(data, batch_size=4, workers=0))
    assert [b.index for b in batches] == [[0, 1, 3], [4, 5]]
    assert batches[0].y.tolist() == [0, 1, 3] and batches[0].x.shape == (3, 3, 8, 8)
    assert [i for b in batches for i, _ in b.failed] == [2]
    no_labels = next(iter(image_loader(ImageFiles(paths, lambda img: torch.zeros(1)), batch_size=8, workers=0)))
    assert no_labels.y is None and no_labels.index == list(range(len(paths)))


def test_forward_averages_views_and_matches_the_model(tiny_backbone):
    model = ImageClassifier(tiny_backbone, 3, pooling="gem")
    rt = Runtime("cpu", "fp32", channels_last=False)
    model = rt.prepare(model)
    pre = model.preprocess
    g = torch.Generator().manual_seed(0)
    views = torch.randint(0, 256, (2, 3, 3, 32, 32), dtype=torch.uint8, generator=g)  # [B, V, 3, S, S]
    out = forward(model, views, pre, rt)
    assert out.features.shape == (2, model.backbone.num_features) and out.proba.shape == (2, 3)
    per_view = [forward(model, views[:, v], pre, rt) for v in range(3)]
    torch.testing.assert_close(out.proba, sum(o.proba for o in per_view) / 3, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.features, sum(o.features for o in per_view) / 3, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        logits = model(pre.normalize(views[:, 0]))
    torch.testing.assert_close(per_view[0].proba, logits.softmax(-1), rtol=1e-5, atol=1e-6)


def test_model_spec_round_trips_through_a_model_folder(tiny_backbone, tmp_path):
    spec = ModelSpec(
        backbone="test_efficientnet",
        source="random",
        preprocess=tiny_backbone.preprocess.with_size(48),
        pooling="gem",
        normalizer="l2",
        head="normed",
        classes=("a", "b", "c"),
        train_counts=(5, 3, 1),
        extra={"regime": "last:1"},
    )
    model = build_model(spec)
    assert model.feature_norm and model.head_kind == "normed" and model.preprocess.input_size == 48
    save_model(model, str(tmp_path / "m"), spec)
    loaded, spec2 = load_model(str(tmp_path / "m"))
    assert spec2 == spec
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


def test_a_spec_without_classes_builds_no_classifier(tiny_backbone):
    spec = ModelSpec.from_backbone_info(tiny_backbone.describe())
    with pytest.raises(FinegrainError, match="needs classes"):
        build_model(spec)
    with pytest.raises(FinegrainError, match="normalizer must be one of"):
        spec.replace(normalizer="pca")
