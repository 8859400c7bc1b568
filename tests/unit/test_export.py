"""`finegrain export`: real models (a frozen probe on real lite0 weights, a fine-tuned tiny EfficientNet), real
images (the bundled bird sample), the real exporter and ONNX Runtime. Tolerances, never CPU-specific values."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

from finegrain.cli.main import main  # noqa: E402
from finegrain.models import load_model  # noqa: E402
from finegrain.runtime.onnx import OnnxEngine  # noqa: E402
from tests.unit.test_cli_contract import RUN_OPTIONS  # noqa: E402

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "src", "finegrain", "_demo", "birds10")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A frozen probe and a k-NN model on a 64 px lite0 store of the bird sample, and a fine-tuned tiny run."""
    root = tmp_path_factory.mktemp("export")
    store = str(root / "store")
    assert main(["extract", DEMO, "--out", store, "--workers", "0", "--no-progress", "--image-size", "64"]) == 0
    assert main(["probe", store]) == 0
    assert main(["knn", store, "-k", "3"]) == 0
    run = str(root / "run")
    assert main(["train", DEMO, "--out", run, *RUN_OPTIONS]) == 0
    return {
        "probe": os.path.join(store, "eval", "probe-l2-gem", "model"),
        "knn": os.path.join(store, "eval", "knn3-l2-gem", "model"),
        "run": run,
        "root": root,
    }


def _images(n: int = 5) -> list[str]:
    return sorted(glob.glob(os.path.join(DEMO, "test", "*", "*.jpg")))[:n]


def _normalized(paths, preprocess) -> torch.Tensor:
    from finegrain.export.images import decode

    return preprocess.normalize(decode(paths, preprocess))


def _finegrain_meta(path: str) -> dict:
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert json.loads(props["classes"]) and json.loads(props["preprocess"])["input_size"] > 0
    pre = json.loads(props["preprocess"])  # what README says the graph expects: resize to resize_size, crop to S
    assert pre["resize_size"] >= pre["input_size"] and 0 < pre["crop_pct"] <= 1
    return json.loads(props["finegrain"])


def test_export_a_frozen_probe_with_int8_checks_itself_on_real_images(models, capsys):
    code = main(["export", models["probe"], "--quantize", "int8", "--max-images", "60"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "fp32: max |logit diff| vs PyTorch fp32" in out and "int8:" in out
    path = os.path.join(models["probe"], "model.onnx")
    meta = _finegrain_meta(path)
    model, spec = load_model(models["probe"])
    assert meta["classes"] == list(spec.classes) and meta["preprocess"]["input_size"] == 64
    assert meta["opset"] == 18 and meta["outputs"] == ["logits", "probabilities", "features"]
    assert 0 < meta["fp32_check"]["images"] <= 60 and meta["fp32_check"]["max_logit_diff"] <= 1e-4
    assert meta["fp32_check"]["top1_agreement"] == 1.0
    assert any(o.domain in ("", "ai.onnx") and o.version == 18 for o in onnx.load(path).opset_import)
    engine = OnnxEngine(path)
    for n in (1, 5):  # the batch axis is dynamic
        x = _normalized(_images(n), spec.preprocess)
        got = engine.run(x)
        with torch.no_grad():
            feats, logits = model.forward_all(x)
        assert got["logits"].shape == (n, len(spec.classes))
        np.testing.assert_allclose(got["logits"], logits.numpy(), atol=1e-4)
        np.testing.assert_allclose(got["features"], feats.numpy(), atol=1e-4)
        np.testing.assert_allclose(got["probabilities"].sum(1), 1.0, atol=1e-5)
    int8 = _finegrain_meta(os.path.join(models["probe"], "model.int8.onnx"))["int8"]
    assert int8["images"] == meta["fp32_check"]["images"] and int8["calibration_images"] > 0
    assert 0.5 <= int8["top1_agreement"] <= 1.0


def test_export_a_fine_tuned_run_to_a_chosen_file(models, capsys):
    out_file = str(models["root"] / "ft" / "m.onnx")
    assert main(["export", models["run"], "--out", out_file]) == 0
    assert "top-1 agreement 1.000" in capsys.readouterr().out  # checked on the run's recorded test images
    model, spec = load_model(models["run"])
    x = _normalized(_images(5), spec.preprocess)
    with torch.no_grad():
        ref = model.forward_all(x)[1].numpy()
    np.testing.assert_allclose(OnnxEngine(out_file).run(x)["logits"], ref, atol=1e-4)


def _stderr_line(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[0] if err else ""


def test_models_that_cannot_be_exported_say_so_in_one_line(models, capsys, tmp_path):
    code, line = _stderr_line(["export", models["knn"], "--out", str(tmp_path / "k.onnx")], capsys)
    assert code == 2 and line.startswith("finegrain: error: cannot export a k-NN model")
    assert not os.path.exists(tmp_path / "k.onnx")
    from finegrain.evaluate.predictor import Ensemble, load

    ens = Ensemble([load(models["probe"]), load(models["probe"])]).save(str(tmp_path / "ens"))
    code, line = _stderr_line(["export", ens], capsys)
    assert code == 2 and "is an ensemble" in line and "export each member" in line
    code, line = _stderr_line(["export", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and line.startswith("finegrain: error: no model at")
    code, line = _stderr_line(["export", models["probe"], "--quantize", "int4"], capsys)
    assert code == 2 and "invalid choice" in line


def test_int8_without_any_known_images_is_refused(models, capsys, tmp_path):
    from finegrain.models import save_model

    model, spec = load_model(models["run"])
    bare = save_model(model, str(tmp_path / "bare"), spec)  # no splits.json, no store: no images known
    code, line = _stderr_line(["export", bare, "--quantize", "int8"], capsys)
    assert code == 2 and "--calibration DATA" in line
    assert main(["export", bare]) == 0  # fp32 alone checks on random images and says so
    assert "8 random images" in capsys.readouterr().out
