"""One model format for every classifier: save -> load -> predict on the image files equals the in-memory
classifier on the stored features (probe, NCM, k-NN, the long-tail heads), and ensembles average their members."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import finegrain
from finegrain.data import load_image_set
from finegrain.embed import create_normalizer, extract_to_store
from finegrain.errors import FinegrainError
from finegrain.evaluate.inference import predict_paths
from finegrain.evaluate.predictor import Ensemble
from finegrain.heads import create_classifier
from finegrain.heads.decoupled import LinearHead, LogitAdjusted, TauNormalized
from finegrain.heads.to_model import frozen_model
from finegrain.models import save_model


@pytest.fixture(scope="module")
def store_features(tmp_path_factory, tiny_backbone):
    """Train/test features of the tiny folder through the tiny backbone (fp32, flip-averaged GeM, 48 px)."""
    from tests.conftest import COLOURS, write_class_images

    root = tmp_path_factory.mktemp("kinds")
    for c, (name, colour) in enumerate(zip(["red", "green", "blue"], COLOURS)):
        write_class_images(str(root / "data" / "train" / name), colour, 8, seed=c)
        write_class_images(str(root / "data" / "test" / name), colour, 3, seed=100 + c)
    backbone = tiny_backbone
    saved = backbone.preprocess
    backbone.preprocess = saved.with_geometry(48, 1.0)
    try:
        result = extract_to_store(
            load_image_set(str(root / "data")), backbone, str(root / "store"), poolings=("gem",), flip=True,
            precision="fp32", num_workers=0, progress=False,
        )  # fmt: skip
        store = result.store
        split = {s: store.split(s, "gem") for s in ("train", "test")}
        yield backbone, store.classes, split, root
    finally:
        backbone.preprocess = saved
        shutil.rmtree(root, ignore_errors=True)


def _classifiers(Xtr, ytr):
    probe = create_classifier("probe").fit(Xtr, ytr)
    return {
        "probe": probe,
        "ncm-cosine": create_classifier("ncm").fit(Xtr, ytr),
        "ncm-l2": create_classifier("ncm", metric="l2").fit(Xtr, ytr),
        "knn": create_classifier("knn", n_neighbors=3).fit(Xtr, ytr),
        "knn-distance": create_classifier("knn", n_neighbors=3, weights="distance").fit(Xtr, ytr),
        "crt": LinearHead(epochs=3).fit(Xtr, ytr),
        "tau-norm": TauNormalized(probe, tau=1.0).fit(),
        "logit-adjusted": LogitAdjusted(probe, tau=1.0, class_counts=np.bincount(ytr)).fit(),
    }


@pytest.mark.parametrize("norm_name", ["none", "l2", "cl2n", "pca-whiten:4"])
def test_every_frozen_kind_saves_loads_and_predicts_like_the_store_path(store_features, norm_name, tmp_path):
    backbone, classes, split, _ = store_features
    (Xtr, ytr, _), (Xte, _, test_paths) = split["train"], split["test"]
    norm = create_normalizer(norm_name).fit(Xtr)
    for name, clf in _classifiers(norm.transform(Xtr), ytr).items():
        expected = clf.predict_proba(norm.transform(Xte))
        model, spec = frozen_model(
            backbone, clf, norm, classes=classes, pooling="gem", flip=True, gallery=(Xtr, ytr),
            train_counts=np.bincount(ytr),
        )  # fmt: skip
        folder = save_model(model, str(tmp_path / f"{name}-{norm_name}"), spec)
        loaded = finegrain.load(folder, runtime="torch")
        assert loaded.spec.kind == "frozen" and loaded.classes == list(classes)
        got = predict_paths(loaded, test_paths, precision="fp32", workers=0).proba
        np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=f"{name} on {norm_name} features")
        np.testing.assert_allclose(loaded.predict_proba(test_paths[:2]), expected[:2], atol=1e-4)


def test_a_knn_model_needs_its_gallery(store_features):
    backbone, classes, split, _ = store_features
    Xtr, ytr, _ = split["train"]
    knn = create_classifier("knn", n_neighbors=3).fit(Xtr, ytr)
    with pytest.raises(FinegrainError, match="gallery"):
        frozen_model(backbone, knn, create_normalizer("none"), classes=classes, pooling="gem")


def test_an_ensemble_saves_loads_and_averages_with_its_weights(store_features, tmp_path):
    backbone, classes, split, _ = store_features
    (Xtr, ytr, _), (_, _, test_paths) = split["train"], split["test"]
    norm = create_normalizer("l2").fit(Xtr)
    folders = []
    for name in ("probe", "ncm"):
        clf = create_classifier(name).fit(norm.transform(Xtr), ytr)
        model, spec = frozen_model(backbone, clf, norm, classes=classes, pooling="gem", flip=True)
        folders.append(save_model(model, str(tmp_path / name), spec))
    members = [finegrain.load(f, runtime="torch") for f in folders]
    Ensemble(members, [3, 1]).save(str(tmp_path / "ens"))
    ens = finegrain.load(str(tmp_path / "ens"), runtime="torch")
    assert isinstance(ens, Ensemble) and ens.weights == [0.75, 0.25]
    probas = [predict_paths(m, test_paths, precision="fp32", workers=0).proba for m in members]
    got = predict_paths(ens, test_paths, precision="fp32", workers=0).proba
    np.testing.assert_allclose(got, 0.75 * probas[0] + 0.25 * probas[1], atol=1e-6)
    np.testing.assert_allclose(ens.predict_proba(test_paths[:3]), got[:3], atol=1e-5)
    assert os.path.isdir(tmp_path / "ens" / "member-1")
    with pytest.raises(FinegrainError, match="weights"):
        Ensemble(members, [1.0])


def test_an_ensemble_of_heads_on_one_view_runs_its_trunk_once(store_features, tmp_path):
    """Two frozen heads on one backbone, view and flip: the saved ensemble's predict runs the trunk once a batch
    (counted), with the same probabilities as its members run apart."""
    backbone, classes, split, _ = store_features
    (Xtr, ytr, _), (_, _, test_paths) = split["train"], split["test"]
    folders = []
    for name, norm_name in (("probe", "l2"), ("ncm", "pca-whiten:4")):
        norm = create_normalizer(norm_name).fit(Xtr)
        clf = create_classifier(name).fit(norm.transform(Xtr), ytr)
        model, spec = frozen_model(backbone, clf, norm, classes=classes, pooling="gem", flip=True)
        folders.append(save_model(model, str(tmp_path / name), spec))
    members = [finegrain.load(f, runtime="torch") for f in folders]
    apart = [predict_paths(m, test_paths, precision="fp32", workers=0, batch_size=64).proba for m in members]
    Ensemble(members).save(str(tmp_path / "ens"))
    ens = finegrain.load(str(tmp_path / "ens"), runtime="torch")
    assert len(ens.members) == 2 and len(ens.runners) == 1  # saved as two members, run as one trunk
    calls = []
    trunk = ens.runners[0][0].model.backbone
    hook = trunk.model.conv_stem.register_forward_hook(lambda *_: calls.append(1))  # the first layer of the trunk
    try:
        got = predict_paths(ens, test_paths, precision="fp32", workers=0, batch_size=64).proba
    finally:
        hook.remove()
    assert len(calls) == 1  # one batch, one forward of the trunk (flip included in it), not one per member
    np.testing.assert_allclose(got, (apart[0] + apart[1]) / 2, atol=1e-5)
