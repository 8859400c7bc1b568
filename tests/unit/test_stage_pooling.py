"""The `stages` pooling (mid-level features): the last stages' GAPs, L2 each, concatenated — in the extraction
store beside gap / gem from one forward pass, and in a saved frozen model that predicts from image files what the
store path predicts. Real (tiny) EfficientNet, real images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import finegrain
from finegrain.data import load_image_set
from finegrain.embed import Embedder, FeatureStore, create_normalizer, embed_images, extract_to_store
from finegrain.errors import FinegrainError
from finegrain.evaluate.inference import predict_paths
from finegrain.heads import create_classifier
from finegrain.heads.to_model import frozen_model
from finegrain.models import (
    build_model,
    create_pooling,
    forward_stages,
    load_model,
    pooled_dim,
    save_model,
    stage_view,
)


def _widths(backbone) -> list[int]:
    n = len(stage_view(backbone.model).stages)
    with torch.no_grad():
        _, maps = forward_stages(backbone.model, torch.rand(1, 3, 64, 64), n)
    return [m.shape[1] for m in maps]


def test_forward_stages_gives_forward_features_and_the_last_stage_maps(tiny_backbone):
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        final, maps = forward_stages(tiny_backbone.model, x, 2)
        assert torch.equal(final, tiny_backbone.forward_features(x))
    assert len(maps) == 2 and [m.shape[1] for m in maps] == _widths(tiny_backbone)[-2:]
    with pytest.raises(FinegrainError, match="has 5 stages; the pooling asks for 9"):
        forward_stages(tiny_backbone.model, x, 9)


@pytest.mark.parametrize("name, n, final", [("stages", 3, False), ("stages:2", 2, False), ("stages", 3, True)])
def test_stages_dim_is_the_sum_of_the_stage_widths_and_each_block_has_unit_norm(tiny_backbone, name, n, final):
    pool = create_pooling(name, final=final)
    widths = _widths(tiny_backbone)[-n:] + ([tiny_backbone.num_features] if final else [])
    assert pooled_dim(tiny_backbone, pool) == sum(widths)
    with torch.no_grad():
        out = Embedder(tiny_backbone, [name]).eval().pools[0]  # the registry's module, as extraction builds it
        fmap, maps = forward_stages(tiny_backbone.model, torch.rand(3, 3, 64, 64), n)
        z = pool(fmap, maps)
    assert out.n == n and z.shape == (3, sum(widths))
    for block in torch.split(z, widths, dim=1):
        torch.testing.assert_close(block.norm(dim=1), torch.ones(3))


def test_stages_pooling_refuses_what_it_cannot_do(tiny_backbone):
    with pytest.raises(FinegrainError, match="needs the last 3 stage maps"):
        create_pooling("stages")(torch.rand(2, 8, 4, 4))
    with pytest.raises(FinegrainError, match="whole number"):
        create_pooling("stages:x")
    with pytest.raises(ValueError, match="n >= 1"):
        create_pooling("stages:0")
    import copy

    backbone = copy.deepcopy(tiny_backbone)  # the model resets its classifier: the session's backbone stays whole
    model = build_model(
        finegrain.models.ModelSpec.of_backbone(backbone).replace(classes=("a", "b"), pooling="stages"),
        backbone=backbone,
    )
    with pytest.raises(FinegrainError, match="not fine-tuning"):
        model.embed(torch.rand(1, tiny_backbone.num_features, 2, 2))
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 2)  # the whole forward still works (one pass)


@pytest.fixture(scope="module")
def stage_store(tmp_path_factory, tiny_backbone):
    """The tiny three-colour folder through the tiny EfficientNet at 64 px: gem, gap and stages in one store."""
    from tests.conftest import COLOURS, write_class_images

    root = tmp_path_factory.mktemp("stages")
    for c, (name, colour) in enumerate(zip(["red", "green", "blue"], COLOURS)):
        write_class_images(str(root / "data" / "train" / name), colour, 8, seed=c)
        write_class_images(str(root / "data" / "test" / name), colour, 3, seed=100 + c)
    import copy

    backbone = copy.deepcopy(tiny_backbone)  # a model built on it resets its classifier: the session's stays whole
    backbone.preprocess = backbone.preprocess.with_geometry(64, 1.0)
    calls = []  # the batch size of every pass through the trunk
    hook = backbone.model.conv_stem.register_forward_hook(lambda m, inp, out: calls.append(len(inp[0])))
    try:
        result = extract_to_store(
            load_image_set(str(root / "data")), backbone, str(root / "store"), poolings=("gem", "gap", "stages"),
            batch_size=8, precision="fp32", num_workers=0, progress=False,
        )  # fmt: skip
        hook.remove()
        yield backbone, result, calls, root
    finally:
        hook.remove()


def test_the_store_holds_stages_beside_gap_and_gem_from_one_forward_pass(stage_store):
    backbone, result, forwards, root = stage_store
    # each image through the trunk once, in ceil(33 / 8) batches; the 1 first: the dummy image that measures the width
    assert result.n_extracted == 33 and forwards == [1, 8, 8, 8, 8, 1]
    store = FeatureStore.open(str(root / "store"))
    stages_dim = sum(_widths(backbone)[-3:])  # the last 3 stages (the final map is left out by default)
    assert store.dims == {"gem": backbone.num_features, "gap": backbone.num_features, "stages": stages_dim}
    X, _, paths = store.split("train", "stages")
    assert X.shape == (24, stages_dim) and store.split("train", "gap")[0].shape == (24, backbone.num_features)
    direct, _ = embed_images(paths[:4], backbone, pooling="stages", precision="fp32")
    np.testing.assert_allclose(X[:4], direct, rtol=1e-4, atol=1e-5)
    again = extract_to_store(
        load_image_set(str(root / "data")), backbone, str(root / "store"), poolings=("gem", "gap", "stages"),
        precision="fp32", num_workers=0, progress=False,
    )  # fmt: skip
    assert (again.n_extracted, again.n_reused) == (0, 33)  # a store with per-pooling widths resumes


def test_a_saved_stages_model_predicts_from_files_what_the_store_path_predicts(stage_store, tmp_path):
    backbone, result, _, _ = stage_store
    (Xtr, ytr, _), (Xte, _, test_paths) = (result.store.split(s, "stages") for s in ("train", "test"))
    norm = create_normalizer("l2").fit(Xtr)
    clf = create_classifier("probe").fit(norm.transform(Xtr), ytr)
    expected = clf.predict_proba(norm.transform(Xte))
    model, spec = frozen_model(backbone, clf, norm, classes=result.store.classes, pooling="stages")
    assert spec.pooling == "stages" and model.pool_dim == Xtr.shape[1]
    folder = save_model(model, str(tmp_path / "m"), spec)
    loaded = finegrain.load(folder)  # safetensors + model.json: weights only
    got = predict_paths(loaded, test_paths, precision="fp32", workers=0).proba
    np.testing.assert_allclose(got, expected, atol=1e-4)
    rebuilt, _ = load_model(folder)
    with torch.no_grad():
        x = torch.rand(2, 3, 64, 64)
        torch.testing.assert_close(rebuilt(x), model(x))


def test_a_stages_model_exports_to_onnx_with_parity(stage_store, tmp_path):
    pytest.importorskip("onnxruntime")
    from finegrain.runtime.engine import parity
    from finegrain.runtime.onnx import OnnxEngine, export_onnx, onnx_module

    backbone, result, _, _ = stage_store
    Xtr, ytr, _ = result.store.split("train", "stages")
    norm = create_normalizer("l2").fit(Xtr)
    clf = create_classifier("ncm").fit(norm.transform(Xtr), ytr)
    model, _ = frozen_model(backbone, clf, norm, classes=result.store.classes, pooling="stages")
    engine = OnnxEngine(export_onnx(model, input_size=64).SerializeToString())
    assert parity(model, onnx_module(engine, model), backbone.preprocess) <= 1e-4
