"""Look closer (issue 25): the attention box, the zoom view in the extraction store, and a saved zoom model that
predicts from image files what the store path predicts. Real EfficientNets, real image files."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

import finegrain
from finegrain.data import ImageSet, load_image_set
from finegrain.embed import create_normalizer, extract_to_store
from finegrain.evaluate.inference import predict_paths
from finegrain.heads import create_classifier
from finegrain.heads.to_model import frozen_model
from finegrain.models import backbone_maps, load_model, save_model
from finegrain.models.zoom import attention_box, crop_boxes, zoom_maps


def test_the_box_is_square_inside_the_image_and_around_the_hot_cells():
    amap = torch.zeros(2, 7, 7)
    amap[0, 0:2, 5:7] = 1.0  # top-right corner
    amap[1] = 1.0  # flat: every cell is at the mean, the whole image
    boxes = attention_box(amap, margin=0.1, min_side=0.4)
    x0, y0, x1, y1 = boxes[0].tolist()
    assert x1 == pytest.approx(1.0) and y0 == pytest.approx(0.0)  # pushed inside, at the corner
    assert x1 - x0 == pytest.approx(y1 - y0) == pytest.approx(max(0.4, 2 / 7 * 1.2))
    assert boxes[1].tolist() == pytest.approx([0.0, 0.0, 1.0, 1.0])


def test_the_crop_cuts_the_box_from_the_full_resolution_image():
    x = torch.zeros(1, 3, 64, 64)
    x[:, :, :32, 32:] = 1.0  # the top-right quadrant is white
    crop = crop_boxes(x, torch.tensor([[0.5, 0.0, 1.0, 0.5]]), 16)
    assert crop.shape == (1, 3, 16, 16) and crop.min() == 1.0


def test_a_pretrained_trunk_zooms_on_the_corner_that_holds_the_only_texture(lite0):
    rng = np.random.default_rng(0)
    img = np.full((448, 448, 3), 128, np.uint8)
    img[20:180, 260:420] = rng.integers(0, 256, (160, 160, 3))  # texture in the top-right corner, grey elsewhere
    pre = lite0.preprocess.with_geometry(448, 1.0)
    x = pre.normalize(pre.pil_to_uint8(Image.fromarray(img))[None])
    with torch.no_grad():
        full, zoomed, boxes = zoom_maps(lambda t: backbone_maps(lite0, t, 0), x)
    x0, y0, x1, y1 = boxes[0].tolist()
    assert (x0 + x1) / 2 > 0.5 and (y0 + y1) / 2 < 0.5  # the box's centre is in the top-right quadrant
    assert x0 <= 260 / 448 and x1 >= 420 / 448 and y0 <= 20 / 448 and x1 - x0 < 1.0  # it holds the texture, not all
    assert full[0].shape == zoomed[0].shape == (1, lite0.num_features, 7, 7)  # both passes at the view's side


@pytest.fixture(scope="module")
def zoom_store(tmp_path_factory, tiny_backbone):
    """The tiny three-colour folder through the tiny EfficientNet: a zoom view at 64 px (decoded at 128 px)."""
    from tests.conftest import COLOURS, write_class_images

    root = tmp_path_factory.mktemp("zoom")
    for c, (name, colour) in enumerate(zip(["red", "green", "blue"], COLOURS)):
        write_class_images(str(root / "data" / "train" / name), colour, 8, seed=c)
        write_class_images(str(root / "data" / "test" / name), colour, 3, seed=100 + c)
    backbone = copy.deepcopy(tiny_backbone)  # a model built on it resets its classifier: the session's stays whole
    backbone.preprocess = backbone.preprocess.with_geometry(128, 1.0)
    result = extract_to_store(
        load_image_set(str(root / "data")), backbone, str(root / "store"), poolings=("gem", "gap"), flip=True,
        zoom=True, batch_size=8, precision="fp32", num_workers=0, progress=False,
    )  # fmt: skip
    return backbone, result, root


def test_the_zoom_store_holds_the_full_and_the_zoomed_descriptor_and_no_label_reaches_them(zoom_store, tmp_path):
    backbone, result, root = zoom_store
    assert result.store.meta["zoom"] is True and result.store.dims["gem"] == 2 * backbone.num_features
    X, _, paths = result.store.split("train", "gem")
    # the same images under other labels and another split: the same features (the box never sees a label)
    images = load_image_set(str(root / "data"))
    shuffled = ImageSet(images.root, images.classes, [s.__class__(s.path, (s.label + 1) % 3, "test")
                                                      for s in images.samples if s.path in set(paths)])  # fmt: skip
    again = extract_to_store(shuffled, backbone, str(tmp_path / "again"), poolings=("gem",), flip=True, zoom=True,
                             precision="fp32", num_workers=0, progress=False)  # fmt: skip
    X2, _, paths2 = again.store.split("test", "gem")
    order = [paths2.index(p) for p in paths]
    np.testing.assert_allclose(X2[order], X, rtol=1e-4, atol=1e-5)  # other batches: BLAS may round apart


def test_a_saved_zoom_model_predicts_from_files_what_the_store_path_predicts(zoom_store, tmp_path):
    backbone, result, _ = zoom_store
    (Xtr, ytr, _), (Xte, _, test_paths) = (result.store.split(s, "gem") for s in ("train", "test"))
    norm = create_normalizer("l2").fit(Xtr)
    clf = create_classifier("probe").fit(norm.transform(Xtr), ytr)
    expected = clf.predict_proba(norm.transform(Xte))
    model, spec = frozen_model(backbone, clf, norm, classes=result.store.classes, pooling="gem", flip=True, zoom=True)
    assert spec.zoom and model.pool_dim == Xtr.shape[1] == 2 * backbone.num_features
    folder = save_model(model, str(tmp_path / "m"), spec)
    loaded = finegrain.load(folder, runtime="torch")
    got = predict_paths(loaded, test_paths, precision="fp32", workers=0).proba
    np.testing.assert_allclose(got, expected, atol=1e-4)
    rebuilt, rebuilt_spec = load_model(folder)
    assert rebuilt_spec.zoom and rebuilt.zoom
    with torch.no_grad():
        x = torch.rand(2, 3, 128, 128)
        torch.testing.assert_close(rebuilt(x), model(x))


def test_a_zoom_model_exports_to_onnx_with_parity(zoom_store):
    """The crop between the two passes (roi_align) is in the graph: the export runs both passes."""
    pytest.importorskip("onnxruntime")
    from finegrain.runtime.engine import parity
    from finegrain.runtime.onnx import OnnxEngine, export_onnx, onnx_module

    backbone, result, _ = zoom_store
    Xtr, ytr, _ = result.store.split("train", "gem")
    norm = create_normalizer("l2").fit(Xtr)
    clf = create_classifier("probe").fit(norm.transform(Xtr), ytr)
    model, _ = frozen_model(backbone, clf, norm, classes=result.store.classes, pooling="gem", flip=True, zoom=True)
    engine = OnnxEngine(export_onnx(model, input_size=128).SerializeToString())
    assert parity(model, onnx_module(engine, model), backbone.preprocess) <= 1e-4
