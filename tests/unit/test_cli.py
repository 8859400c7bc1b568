"""Smoke tests of every subcommand on the tiny fixture, through the real entry points."""

import json
import os
import subprocess
import sys

import pytest

from finegrain.cli.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _json(path: str):
    return json.loads(_text(path))


@pytest.fixture
def store(tiny_folder, tmp_path):
    out = str(tmp_path / "store")
    assert main(["extract", tiny_folder, "--out", out, "--workers", "0", "--no-progress"]) == 0
    return out


def test_extract_writes_store_and_resolved_config(store, capsys):
    assert os.path.exists(os.path.join(store, "config.yaml"))
    import yaml

    cfg = yaml.safe_load(_text(os.path.join(store, "config.yaml")))
    assert cfg["backbone"] == "efficientnet_lite0" and cfg["resolved"]["backbone"]["preprocess"]["input_size"] == 224


@pytest.mark.parametrize("argv", [["knn", "-k", "1"], ["knn", "--norm", "cl2n"], ["ncm"], ["probe", "--norm", "none"]])
def test_classifier_commands_write_metrics_and_predictions(store, tmp_path, argv, capsys):
    out = str(tmp_path / "eval")
    assert main([argv[0], store, *argv[1:], "--out", out]) == 0
    metrics = _json(os.path.join(out, "metrics.json"))
    assert metrics["n"] == 9 and 0.0 <= metrics["top1"] <= 1.0 and metrics["top5"] == 1.0  # 3 classes
    assert metrics["top1"] >= 0.66  # coloured discs: a real pretrained backbone separates them
    lines = _text(os.path.join(out, "predictions.csv")).splitlines()
    assert lines[0].startswith("path,true,pred") and len(lines) == 10
    assert _json(os.path.join(out, "config.json"))["store"] == store
    import numpy as np

    with np.load(os.path.join(out, "model.npz"), allow_pickle=False) as saved:  # loads without executing code
        assert list(saved["classes"]) == ["blue", "green", "red"]
        if argv[0] == "probe":
            assert saved["classifier.coef_"].shape == (3, 1280)
        if "cl2n" in argv:
            assert saved["normalizer.mean_"].shape == (1280,)
    assert "top-1" in capsys.readouterr().out


def test_search_prints_nearest_images(store, tiny_folder, capsys):
    query = os.path.join(tiny_folder, "test", "red", "000.jpg")
    assert main(["search", store, "--query", query, "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == query and len(lines) == 4
    assert query in lines[1] and lines[1].split()[1] in ("1.0000", "0.9999")  # the image finds itself first


def test_config_file_and_command_line_layering(store, tmp_path):
    cfg = tmp_path / "knn.yaml"
    cfg.write_text("k: 3\nnorm: none\n")
    out = str(tmp_path / "e")
    assert main(["knn", store, "--config", str(cfg), "--norm", "l2", "--out", out]) == 0
    saved = _json(os.path.join(out, "config.json"))
    assert saved["k"] == 3 and saved["norm"] == "l2"


def test_bad_input_is_one_line_error_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}
    r = subprocess.run(
        [sys.executable, "-m", "finegrain", "extract", str(tmp_path / "nope"), "--out", "x"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "finegrain", "knn", str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert r.returncode == 2 and "finegrain extract" in r.stderr and "Traceback" not in r.stderr


def test_backbones_lists_offline_names(capsys):
    assert main(["backbones"]) == 0
    assert "efficientnet_lite0" in capsys.readouterr().out


def test_demo_runs_on_the_bundled_sample(tmp_path, capsys):
    out = str(tmp_path / "demo")
    sample = os.path.join(ROOT, "src", "finegrain", "_demo", "birds10")
    # the demo's own budget is 2 minutes; one is enough to check it end to end (and keeps `make test` under 10)
    assert main(["demo", "--data", sample, "--out", out, "--no-progress", "--budget-min", "1"]) == 0
    summary = _json(os.path.join(out, "fit", "fit.json"))
    assert summary["test"]["n"] == 40 and summary["test"]["metrics"]["top1"] >= 0.75 and summary["budget_min"] == 1.0
    printed = capsys.readouterr().out
    assert f"demo: fit chose {summary['chosen']}: test top-1" in printed
    assert printed.count(" -> ") == 3  # three test images predicted by the saved model


def test_demo_data_ships_inside_the_package():
    """`finegrain demo` without --data finds the sample in the installed package (what a wheel install has)."""
    import finegrain
    from finegrain.cli.commands import _default_demo_data

    data = _default_demo_data()
    assert data == os.path.join(os.path.dirname(finegrain.__file__), "_demo", "birds10")
    images = [f for _, _, files in os.walk(data) for f in files if f.endswith(".jpg")]
    assert len(images) == 120 and os.path.isfile(os.path.join(data, "ATTRIBUTION.md"))
