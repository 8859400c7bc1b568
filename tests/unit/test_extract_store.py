import os
import shutil

import numpy as np
import pytest
import torch

from finegrain.data import load_image_set
from finegrain.embed import FeatureStore, create_pooling, embed_images, extract_to_store
from finegrain.errors import FinegrainError
from finegrain.models.pooling import POOLINGS


def _extract(folder, backbone, out, **kw):
    kw.setdefault("num_workers", 0)
    return extract_to_store(
        load_image_set(folder),
        backbone,
        str(out),
        poolings=("gap", "gem"),
        batch_size=4,
        precision="fp32",
        progress=False,
        **kw,
    )


@pytest.mark.parametrize("name", [n for n in POOLINGS.names() if n != "stages"])  # stages: test_stage_pooling.py
def test_every_pooling_maps_a_feature_map_to_one_vector_per_image(name):
    x = torch.rand(3, 7, 5, 4)
    out = create_pooling(name, channels=7)(x)  # channels: what a learned pooling (attn) needs to be built
    assert out.shape == (3, 7) and torch.isfinite(out).all()
    assert torch.all(out <= x.amax((2, 3)) + 1e-5) and torch.all(out >= x.mean((2, 3)) - 1e-5)


def test_gem_limits_and_learnable_p():
    x = torch.rand(2, 4, 6, 6) * 0.9 + 0.1
    assert torch.allclose(create_pooling("gem", p=1.0)(x), x.mean((2, 3)), atol=1e-5)
    # (mean x^p)^(1/p) is at least max * (1/36)^(1/p): within 1% of the max for p = 500
    assert torch.allclose(create_pooling("gem:500")(x), x.amax((2, 3)), rtol=0.01)
    gem = create_pooling("gem", learnable=True)
    gem(x).sum().backward()
    assert gem.p.grad is not None and torch.isfinite(gem.p.grad)
    with pytest.raises(ValueError):
        create_pooling("gem", p=0)
    with pytest.raises(FinegrainError, match="valid poolings"):
        create_pooling("avg")


def test_extract_writes_a_store_that_matches_direct_embedding(tiny_folder, tiny_backbone, tmp_path):
    r = _extract(tiny_folder, tiny_backbone, tmp_path / "s")
    assert (r.n_images, r.n_extracted, r.n_reused, r.skipped) == (27, 27, 0, [])
    store = FeatureStore.open(str(tmp_path / "s"))
    X, y, paths = store.split("train", "gap")
    assert X.shape == (18, tiny_backbone.num_features) and sorted(set(y)) == [0, 1, 2]
    direct, skipped = embed_images(paths[:5], tiny_backbone, pooling="gap", precision="fp32")
    assert not skipped
    np.testing.assert_allclose(X[:5], direct, rtol=1e-4, atol=1e-5)
    assert store.classes == ["blue", "green", "red"] and store.meta["precision"] == "fp32"


def test_rerun_reuses_everything_and_new_images_are_added(tiny_folder, tiny_backbone, tmp_path):
    out = tmp_path / "s"
    first = _extract(tiny_folder, tiny_backbone, out)
    X1 = FeatureStore.open(str(out)).split("test")[0]
    again = _extract(tiny_folder, tiny_backbone, out)
    assert (again.n_extracted, again.n_reused) == (0, 27)
    np.testing.assert_array_equal(FeatureStore.open(str(out)).split("test")[0], X1)
    shutil.copy(os.path.join(tiny_folder, "train", "red", "000.jpg"), os.path.join(tiny_folder, "test", "red", "x.jpg"))
    from tests.conftest import write_class_images

    write_class_images(os.path.join(tiny_folder, "test", "red", "new"), (220, 40, 40), 2, seed=55)
    third = _extract(tiny_folder, tiny_backbone, out)
    # the copied file has known content: reused, not re-extracted
    assert (third.n_extracted, third.n_reused) == (2, 28) and first.store.num_rows() == 29


def test_interrupted_run_resumes_from_journal(tiny_folder, tiny_backbone, tmp_path):
    """Simulate a crash after some batches: extra feature bytes and a torn journal line are repaired."""
    out = tmp_path / "s"
    _extract(tiny_folder, tiny_backbone, out)
    full = {e.path: e for e in FeatureStore.open(str(out)).index()}
    rows = (out / "rows.csv").read_text().splitlines()
    (out / "rows.csv").write_text("\n".join(rows[:10]) + "\n" + rows[10][:7])  # torn line, as if killed mid-write
    os.unlink(out / "index.csv")
    with pytest.raises(FinegrainError, match="not a finished feature store"):
        FeatureStore.open(str(out))
    r = _extract(tiny_folder, tiny_backbone, out)
    assert (r.n_extracted, r.n_reused) == (17, 10)
    store = FeatureStore.open(str(out))
    assert store.num_rows() == 27
    ref = np.asarray(FeatureStore.open(str(out)).features("gap"))
    for e in store.index():
        assert e.sha1 == full[e.path].sha1
    direct, _ = embed_images([e.path for e in store.index()], tiny_backbone, pooling="gap", precision="fp32")
    np.testing.assert_allclose(ref[[e.row for e in store.index()]], direct, rtol=1e-4, atol=1e-5)


def test_store_of_other_backbone_is_refused_unless_overwrite(tiny_folder, tiny_backbone, tmp_path):
    out = tmp_path / "s"
    _extract(tiny_folder, tiny_backbone, out)
    with pytest.raises(FinegrainError, match="another backbone"):
        extract_to_store(
            load_image_set(tiny_folder),
            tiny_backbone,
            str(out),
            poolings=("gap",),
            precision="fp32",
            num_workers=0,
            progress=False,
        )
    r = extract_to_store(
        load_image_set(tiny_folder),
        tiny_backbone,
        str(out),
        poolings=("gap",),
        precision="fp32",
        num_workers=0,
        progress=False,
        overwrite=True,
    )
    assert r.n_extracted == 27 and FeatureStore.open(str(out)).poolings == ["gap"]


def test_bad_files_are_skipped_and_reported_with_worker_processes(tiny_folder, tiny_backbone, tmp_path):
    bad = os.path.join(tiny_folder, "train", "red")
    open(os.path.join(bad, "empty.jpg"), "wb").close()
    with open(os.path.join(bad, "text.jpg"), "w") as f:
        f.write("hello")
    good = open(os.path.join(bad, "000.jpg"), "rb").read()
    with open(os.path.join(bad, "trunc.jpg"), "wb") as f:
        f.write(good[: len(good) // 2])
    r = _extract(tiny_folder, tiny_backbone, tmp_path / "s", num_workers=2)
    assert r.n_extracted == 27 and len(r.skipped) == 3
    reasons = dict((os.path.basename(p), why) for p, why in r.skipped)
    assert "empty" in reasons["empty.jpg"] and "not an image" in reasons["text.jpg"]
    listed = (tmp_path / "s" / "skipped.csv").read_text()
    assert "trunc.jpg" in listed and "empty.jpg" in listed


def test_store_split_errors_are_clear(tiny_folder, tiny_backbone, tmp_path):
    _extract(tiny_folder, tiny_backbone, tmp_path / "s")
    store = FeatureStore.open(str(tmp_path / "s"))
    with pytest.raises(FinegrainError, match="splits here"):
        store.split("val")
    with pytest.raises(FinegrainError, match="re-extract"):
        store.features("max")
