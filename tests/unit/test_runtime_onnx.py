"""`--runtime auto|torch|onnx`: ONNX Runtime predictions and features agree with torch fp32 (tolerances only: no
test depends on the CPU's vector units), auto picks a valid engine and says why, torch is the fallback."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from finegrain.cli.main import main  # noqa: E402
from finegrain.errors import FinegrainError  # noqa: E402
from finegrain.evaluate.predictor import ONNX_CACHE, load  # noqa: E402
from finegrain.runtime import engine as engine_mod  # noqa: E402
from tests.unit.test_cli_contract import RUN_OPTIONS  # noqa: E402

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "src", "finegrain", "_demo", "birds10")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A fine-tuned tiny EfficientNet on the bundled bird sample (records its splits)."""
    out = str(tmp_path_factory.mktemp("rt") / "run")
    assert main(["train", DEMO, "--out", out, *RUN_OPTIONS]) == 0
    return out


def _paths(n: int = 8) -> list[str]:
    return sorted(glob.glob(os.path.join(DEMO, "test", "*", "*.jpg")))[:n]


def test_onnx_predictions_agree_with_torch_and_auto_picks_a_valid_engine(run):
    ref = load(run, runtime="torch").predict_proba(_paths(), tta="flip")
    onnx = load(run, runtime="onnx")
    np.testing.assert_allclose(onnx.predict_proba(_paths(), tta="flip"), ref, atol=1e-5)
    assert onnx.engine_notes[0].endswith(onnx.engine_notes[0].split(";")[-1])
    assert "ONNX Runtime fp32" in onnx.engine_notes[0]
    auto = load(run, runtime="auto")
    np.testing.assert_allclose(auto.predict_proba(_paths()), load(run).predict_proba(_paths()), atol=1e-5)
    (engine,) = auto._engines.values()
    assert engine.name in ("torch", "onnx") and "auto -> " in engine.reason and "img/s" in engine.reason
    cache = os.path.join(run, "model", ONNX_CACHE)
    assert any(f.endswith(".onnx") for f in os.listdir(cache)) and any("choice" in f for f in os.listdir(cache))
    again = load(run, runtime="auto")  # the measured choice is read back, not measured again
    again.predict_proba(_paths(2))
    assert next(iter(again._engines.values())).name == engine.name


def test_cli_predict_and_evaluate_take_runtime(run, capsys, tmp_path):
    image = _paths(1)[0]
    outs = {}
    for rt in ("torch", "onnx"):
        assert main(["predict", run, image, "--runtime", rt, "--json"]) == 0
        outs[rt] = json.loads(capsys.readouterr().out)["predictions"][0]["top"]
    assert [t["class"] for t in outs["onnx"]] == [t["class"] for t in outs["torch"]]
    np.testing.assert_allclose(
        [t["probability"] for t in outs["onnx"]], [t["probability"] for t in outs["torch"]], 1e-4
    )
    top1 = {}
    for rt in ("torch", "onnx"):
        argv = ["evaluate", run, DEMO, "--runtime", rt, "--precision", "fp32", "--workers", "0", "--bootstrap", "0"]
        assert main([*argv, "--out", str(tmp_path / rt), "--no-progress"]) == 0
        with open(tmp_path / rt / "metrics.json") as f:
            top1[rt] = json.load(f)["metrics"]["top1"]
    err = capsys.readouterr().err
    assert "engine at" in err and "ONNX Runtime fp32" in err
    assert top1["onnx"] == pytest.approx(top1["torch"], abs=1e-9)


def test_extract_features_from_onnx_match_torch(tmp_path):
    from finegrain.embed import FeatureStore

    feats = {}
    for rt in ("torch", "onnx"):
        argv = ["extract", DEMO, "--out", str(tmp_path / rt), "--workers", "0", "--no-progress"]
        assert main([*argv, "--image-size", "64", "--precision", "fp32", "--runtime", rt]) == 0
        store = FeatureStore.open(str(tmp_path / rt))
        assert store.meta["runtime"] == rt and store.meta["precision"] == "fp32"
        feats[rt] = {p: store.split("train", p)[0] for p in ("gem", "gap")}
    for p in ("gem", "gap"):
        scale = np.abs(feats["torch"][p]).max()
        np.testing.assert_allclose(feats["onnx"][p], feats["torch"][p], atol=1e-4 * max(1.0, scale))


def test_torch_is_the_fallback_without_onnxruntime(run, monkeypatch):
    monkeypatch.setattr(engine_mod, "onnxruntime_available", lambda: False)
    auto = load(run, runtime="auto")
    auto.predict_proba(_paths(2))
    (engine,) = auto._engines.values()
    assert engine.name == "torch" and "onnxruntime is not installed" in engine.reason
    with pytest.raises(FinegrainError, match="--runtime onnx: onnxruntime is not installed"):
        load(run, runtime="onnx").predict_proba(_paths(2))
    with pytest.raises(FinegrainError, match="runtime must be one of"):
        load(run, runtime="tensorrt")


def test_a_k_nn_model_falls_back_to_torch_under_auto(tmp_path):
    import torch

    from finegrain.backbones import create_backbone
    from finegrain.models import ModelSpec, build_model, save_model

    bb = create_backbone("test_efficientnet", pretrained=False)
    spec = ModelSpec.of_backbone(bb).replace(
        classes=("a", "b"), kind="frozen", head="knn", head_options={"n_gallery": 6, "k": 3}
    )
    model = build_model(spec, backbone=bb)
    model.head.gallery.copy_(torch.randn(6, model.head.gallery.shape[1]))
    model.head.labels.copy_(torch.tensor([0, 1, 0, 1, 0, 1]))
    folder = save_model(model, str(tmp_path / "knn"), spec)
    auto = load(folder, runtime="auto")
    np.testing.assert_allclose(auto.predict_proba(_paths(3)), load(folder).predict_proba(_paths(3)), atol=1e-6)
    (engine,) = auto._engines.values()
    assert engine.name == "torch" and "batch" in engine.reason


def test_auto_reads_this_machines_race_and_converts_only_where_it_pays(tiny_backbone, tmp_path, monkeypatch):
    """The machine's race record for an architecture and view decides `auto` without a new conversion: torch won ->
    torch; ONNX won but its measured saving on the images to run is under the conversion's measured cost -> torch."""
    from finegrain.embed.extract import Embedder
    from finegrain.runtime import Runtime, choose_engine

    monkeypatch.setenv("FINEGRAIN_CACHE", str(tmp_path / "cache"))
    embedder = Embedder(tiny_backbone, ["gap"])
    pre, rt = tiny_backbone.preprocess.with_geometry(64, 1.0), Runtime("cpu", "fp32", False, 0)
    path = engine_mod._race_path(embedder, pre, rt)
    os.makedirs(os.path.dirname(path))
    onnx_dir = str(tmp_path / "onnx")
    with open(path, "w") as f:
        json.dump({"choice": "torch", "timing": "torch 90 img/s, onnx 60 img/s"}, f)
    e = choose_engine(embedder, "auto", preprocess=pre, runtime=rt, n_images=10_000, cache_dir=onnx_dir)
    assert e.name == "torch" and "this machine's race" in e.reason and not os.path.exists(onnx_dir)
    with open(path, "w") as f:  # ONNX 2x faster, but 300 images save 0.3 s against a 9 s conversion
        json.dump({"choice": "onnx", "timing": "", "torch_spi": 0.002, "onnx_spi": 0.001, "convert_s": 9.0}, f)
    e = choose_engine(embedder, "auto", preprocess=pre, runtime=rt, n_images=300, cache_dir=onnx_dir)
    assert e.name == "torch" and "would save" in e.reason and not os.path.exists(onnx_dir)
    assert engine_mod.recorded_conversion_seconds(embedder, pre, rt) == 9.0  # what fit prices a test pass's set-up by
