"""Shared fixtures: tiny real image folders written with Pillow, the tiny timm model, ../shared/data when present."""

from __future__ import annotations

import os
import shutil

# Tests run offline: make huggingface_hub fail fast instead of retrying a network that is not there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The machine's engine cache (ONNX conversions, races) in a folder of the test session's own, not the user's home.
if "FINEGRAIN_CACHE" not in os.environ:
    _SESSION_CACHE = __import__("tempfile").mkdtemp(prefix="finegrain-cache-")
    os.environ["FINEGRAIN_CACHE"] = _SESSION_CACHE
    # ~150 MB a run (ONNX conversions): removed when the session ends, or repeated runs fill the disk.
    __import__("atexit").register(shutil.rmtree, _SESSION_CACHE, ignore_errors=True)

import numpy as np
import pytest
from PIL import Image

# The slow tests (the `slow` marker, `make test-fast` leaves them out): every module that runs real weights end to end,
# trains, fits, serves, spawns processes or drives a browser. Marked here, in one list, by module.
SLOW_MODULES = {
    "test_backbones", "test_backbones_mobilenet", "test_bench_suite", "test_cli", "test_cli_contract", "test_distill",
    "test_distributed", "test_evaluate", "test_explain", "test_export", "test_extract_store", "test_fit",
    "test_fit_longtail", "test_model_kinds", "test_runtime_onnx", "test_semi", "test_serve", "test_shard",
    "test_sklearn_checks", "test_stage_pooling", "test_stream_probe", "test_train", "test_train_manifold_mixup",
    "test_real_weights", "test_report_browser", "test_run_report", "test_serve_browser", "test_stream_probe_ddp",
    "test_zoom",
}  # fmt: skip


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


SHARED_DATA = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 220)]


def fit_on_a_still_clock(cfg, **kw):
    """`fit(cfg)` on a budget clock that never moves, a day long: every candidate fits, whatever this machine's pace
    (fit prices candidates by their measured seconds: on a busy CPU a real 3-minute budget skipped views, and a test
    of the semi-supervised candidates found none). The budget itself is tested with clocks that tick (test_fit.py)."""
    from finegrain.recipe.fit import Clock, fit

    return fit(cfg, progress=False, clock=Clock(24 * 60.0, now=lambda: 0.0), **kw)


def write_class_images(folder: str, colour: tuple[int, int, int], n: int, *, seed: int, size=(64, 48)) -> None:
    """n JPEGs of one class: a coloured disc on noise, so classes differ and images within a class differ too."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        img = rng.integers(0, 90, size=(h, w, 3)).astype(np.uint8)
        cx, cy, r = rng.integers(w // 4, 3 * w // 4), rng.integers(h // 4, 3 * h // 4), rng.integers(8, 16)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = colour
        Image.fromarray(img).save(os.path.join(folder, f"{i:03d}.jpg"), quality=92)


@pytest.fixture
def tiny_folder(tmp_path):
    """root/{train,test}/{red,green,blue}/NNN.jpg: 6 train and 3 test images a class."""
    root = tmp_path / "tiny"
    for c, (name, colour) in enumerate(zip(["red", "green", "blue"], COLOURS)):
        write_class_images(str(root / "train" / name), colour, 6, seed=c)
        write_class_images(str(root / "test" / name), colour, 3, seed=100 + c)
    return str(root)


@pytest.fixture(scope="session")
def train_data(tmp_path_factory):
    """root/{train,test}/{red,green,blue}: 12 train and 4 test images a class, shared by the training tests."""
    root = tmp_path_factory.mktemp("train-data")
    for c, (name, colour) in enumerate(zip(["red", "green", "blue"], COLOURS)):
        write_class_images(str(root / "train" / name), colour, 12, seed=c)
        write_class_images(str(root / "test" / name), colour, 4, seed=100 + c)
    return str(root)


@pytest.fixture(scope="session")
def tiny_backbone():
    """timm's `test_efficientnet`, randomly initialised: a real EfficientNet, small enough for unit tests."""
    from finegrain.backbones import create_backbone

    return create_backbone("test_efficientnet", pretrained=False)


@pytest.fixture(scope="session")
def _lite0_weights():
    from finegrain.backbones import create_backbone

    return create_backbone("efficientnet_lite0")


@pytest.fixture
def lite0(_lite0_weights):
    """efficientnet_lite0 with its ImageNet weights and classifier: a fresh copy per test, so a test that wraps it
    in a model (reset_classifier) or changes its preprocessing cannot change what a later test sees."""
    import copy

    return copy.deepcopy(_lite0_weights)


@pytest.fixture
def cub100():
    path = os.path.join(SHARED_DATA, "cub100")
    if not os.path.isdir(path):
        pytest.skip(f"needs the real dataset at {path} (../shared/data/cub100 beside the checkout)")
    return path


@pytest.fixture(scope="session")
def chromium():
    """Path of Debian's real Chromium binary, for the headless-browser report tests."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Debian's chromium is not installed: apt-get install chromium")
    return path


@pytest.fixture(scope="session")
def trained_run(train_data, tmp_path_factory):
    """A real lite0 run (64 px, last:1, 3 epochs) on the tiny three-colour data: shared by the evaluation tests."""
    out = tmp_path_factory.mktemp("eval-run") / "run"
    from finegrain.config import TrainConfig
    from finegrain.train.engine import train

    cfg = TrainConfig(
        data=train_data,
        out=str(out),
        backbone="efficientnet_lite0",
        image_size=64,
        regime="last:1",
        epochs=3,
        batch_size=8,
        workers=0,
        lr=0.05,
        val_fraction=0.0,
        warmup_epochs=0.5,
    )
    train(cfg, progress=False)
    return str(out)
