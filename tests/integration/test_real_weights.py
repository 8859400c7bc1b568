"""Real offline ImageNet weights on real photos; the cub100 slice skips where ../shared/data is absent."""

import csv
import os

import numpy as np
import pytest
import torch

from finegrain.data import load_image_set
from finegrain.embed import extract_to_store
from finegrain.evaluate.representations import fit_and_score, train_test_from_store
from finegrain.heads import create_classifier

IMAGENET_CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_lite0_sees_a_cat_in_chelsea(lite0):
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.chelsea())
    x = lite0.preprocess.normalize(lite0.preprocess.pil_to_uint8(img)[None])
    with torch.no_grad():
        top5 = lite0(x).softmax(-1).topk(5).indices[0].tolist()
    assert IMAGENET_CATS & set(top5), top5
    assert top5[0] in IMAGENET_CATS


def test_bf16_features_agree_with_fp32(lite0, tiny_folder, tmp_path):
    from finegrain.embed import embed_images

    paths = [s.path for s in load_image_set(tiny_folder).samples[:8]]
    a, _ = embed_images(paths, lite0, precision="fp32")
    b, _ = embed_images(paths, lite0, precision="bf16")
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99


@pytest.fixture
def cub10_manifest(cub100, tmp_path):
    """A CSV manifest of 10 cub100 classes (train and test), which also exercises the manifest reader."""
    path = tmp_path / "cub10.csv"
    classes = sorted(os.listdir(os.path.join(cub100, "train")))[:10]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for split in ("train", "test"):
            for c in classes:
                for name in sorted(os.listdir(os.path.join(cub100, split, c))):
                    w.writerow([os.path.join(cub100, split, c, name), c, split])
    return str(path)


def test_cub10_slice_probe_and_knn(cub10_manifest, lite0, tmp_path):
    image_set = load_image_set(cub10_manifest)
    assert len(image_set.classes) == 10 and image_set.splits == ["train", "test"]
    r = extract_to_store(image_set, lite0, str(tmp_path / "s"), poolings=("gap", "gem"), progress=False)
    assert r.skipped == [] and r.n_extracted == len(image_set.samples)
    results = {}
    for pooling in ("gap", "gem"):
        train, test, _ = train_test_from_store(r.store, pooling=pooling)
        for name, kw, norm in [("probe", {}, "none"), ("knn", {"n_neighbors": 1}, "l2"), ("ncm", {}, "l2")]:
            metrics, scores, _ = fit_and_score(
                create_classifier(name, **kw), train, test, normalizer=norm, classes=r.store.classes
            )
            results[(pooling, name)] = metrics["top1"]
    assert results[("gem", "probe")] >= 0.9, results
    assert min(results.values()) >= 0.75, results
