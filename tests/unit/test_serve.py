"""`finegrain serve` for real: a real efficientnet_lite0 model fitted on the bundled birds, uvicorn on a free port,
real JPEGs and real bad uploads over HTTP, micro-batching of concurrent clients, the CLI in a subprocess."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import glob
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="finegrain serve needs the serve extra: pip install 'finegrain[serve]'")
httpx = pytest.importorskip("httpx", reason="the serve tests talk HTTP with httpx (dev extra)")

from finegrain.cli.main import main  # noqa: E402
from finegrain.serve import MicroBatcher, create_app  # noqa: E402

BIRDS = os.path.join(os.path.dirname(__file__), "..", "..", "src", "finegrain", "_demo", "birds10")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bird_test_images(per_class: int = 1) -> list[tuple[str, str]]:
    """(path, class) of the first `per_class` test images of each bundled species."""
    out = []
    for folder in sorted(glob.glob(os.path.join(BIRDS, "test", "*"))):
        out += [(p, os.path.basename(folder)) for p in sorted(glob.glob(os.path.join(folder, "*.jpg")))[:per_class]]
    return out


def build_bird_models(root: str) -> dict[str, str]:
    """A feature store of the bundled birds (lite0, 128 px, GAP), a linear probe model (CAM-able) and a 3-NN model
    (a gallery whose training images the store holds): {"store", "probe", "knn"} -> folders."""
    from finegrain.embed import FeatureStore, create_normalizer
    from finegrain.heads import create_classifier
    from finegrain.heads.to_model import save_store_model

    store = os.path.join(root, "store")
    common = ["--workers", "0", "--no-progress", "--image-size", "128", "--pooling", "gap"]
    assert main(["extract", BIRDS, "--out", store, *common]) == 0
    assert main(["knn", store, "-k", "3", "--norm", "l2"]) == 0
    knn = glob.glob(os.path.join(store, "eval", "knn3-*", "model"))[0]
    fs = FeatureStore.open(store)
    X, y, _ = fs.split("train", "gap")
    probe = create_classifier("probe", Cs=(1.0,)).fit(X, y)
    folder = save_store_model(
        fs, probe, create_normalizer("none"), os.path.join(root, "probe", "model"), pooling="gap", train_X=X, train_y=y
    )
    return {"store": store, "probe": folder, "knn": knn}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app):
    """Run `app` with uvicorn on a free port in a thread; yields the base URL, stops the server after."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def bird_models(tmp_path_factory):
    return build_bird_models(str(tmp_path_factory.mktemp("serve-models")))


@pytest.fixture(scope="module")
def probe_server(bird_models):
    with live_server(create_app(bird_models["probe"], max_wait_ms=5)) as url:
        yield url


@pytest.fixture
def client(probe_server):
    with httpx.Client(base_url=probe_server, timeout=60) as c:
        yield c


def _post(client, path: str, **params):
    with open(path, "rb") as f:
        return client.post("/predict", files={"image": (os.path.basename(path), f, "image/jpeg")}, data=params)


def test_predict_returns_the_top_k_classes_with_probabilities(client):
    classes = client.get("/model").json()["classes"]
    right = 0
    for path, truth in bird_test_images():
        r = _post(client, path, k=str(len(classes)))
        assert r.status_code == 200, r.text
        top = r.json()["top"]
        names, probs = [t["class"] for t in top], [t["probability"] for t in top]
        assert sorted(names) == sorted(classes)  # every class once, k = all of them
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        right += names[0] == truth
        assert len(_post(client, path).json()["top"]) == 5  # the default k
    assert right >= 7, f"only {right} of 10 bundled test birds right"  # ImageNet features + a probe: 9-10 of 10


def test_cam_overlay_is_a_png_of_the_view_the_model_saw(client):
    path, truth = bird_test_images()[3]
    body = _post(client, path, cam="true").json()
    cam = body["cam"]
    assert cam["method"] == "cam" and cam["class"] == body["top"][0]["class"]
    assert cam["image"].startswith("data:image/png;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(cam["image"].split(",", 1)[1])))
    assert img.format == "PNG" and img.size == (128, 128)
    assert "neighbours" not in body  # only when asked


def _truncated(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    return data[: len(data) // 2]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_bad_uploads_get_a_4xx_with_the_reason_and_the_service_keeps_serving(client, tmp_path):
    good = bird_test_images()[0][0]
    cases = {
        "text": (("notes.txt", b"a shopping list, not a photo\n", "text/plain"), 415, "not an image"),
        "truncated": (("half.jpg", _truncated(good), "image/jpeg"), 422, "truncated"),
        "empty": (("empty.jpg", b"", "image/jpeg"), 422, "empty"),
        # 100 megapixels in a 12 kB PNG: refused from its header, never decoded
        "bomb": (("bomb.png", _png(Image.new("1", (10_000, 10_000))), "image/png"), 422, "decompression bomb"),
        # 64 megapixels: under Pillow's own warning, over the service's limit
        "large": (("large.png", _png(Image.new("1", (8_000, 8_000))), "image/png"), 422, "decompression-bomb limit"),
        "oversized": (("big.jpg", b"\xff\xd8" + bytes(21 * 1024 * 1024), "image/jpeg"), 413, "20 MB limit"),
        "strip": (("strip.png", _png(Image.new("RGB", (20_000, 1))), "image/png"), 422, "too elongated"),
    }
    for name, (upload, status, reason) in cases.items():
        r = client.post("/predict", files={"image": upload})
        assert r.status_code == status, (name, r.text)
        assert reason in r.json()["error"] and r.json()["status"] == status, (name, r.json())
    assert _post(client, good).status_code == 200  # still serving

    def chunks():  # a body streamed without Content-Length (chunked): counted as it arrives
        yield b'--XX\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
        for _ in range(21):
            yield bytes(1024 * 1024)
        yield b"\r\n--XX--\r\n"

    r = client.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=XX"})
    assert r.status_code == 413 and "20 MB limit" in r.json()["error"]
    for size_mb in (25, 60):  # refused from its Content-Length, then drained: the client reads the 413, no reset
        r = client.post("/predict", content=bytes(size_mb * 1024 * 1024), headers={"content-type": "image/jpeg"})
        assert r.status_code == 413 and f"upload of {size_mb} MB" in r.json()["error"]
    for kwargs, status in [
        ({"data": {"k": "1"}}, 415),  # a form without a file: urlencoded
        ({"files": {"other": ("x.txt", b"1", "text/plain")}, "params": {"k": "0"}}, 422),
        ({"content": b"--XX\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=XX"}}, 422),
        ({"json": {"image": "x"}}, 415),
    ]:
        r = client.post("/predict", **kwargs)
        assert r.status_code == status and r.json()["error"], (kwargs, r.text)
    with open(good, "rb") as f:  # a raw image body works too
        r = client.post("/predict", content=f.read(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200 and r.json()["top"]
    counts = client.get("/health").json()["counts"]
    assert counts["refused_413"] >= 2 and counts["refused_415"] >= 3 and counts["refused_422"] >= 5
    assert not any(k.startswith("refused_5") for k in counts)


def _concurrent_posts(url: str, paths: list[str], **params) -> list[dict]:
    def one(path):
        with httpx.Client(base_url=url, timeout=60) as c:
            r = _post(c, path, **params)
            assert r.status_code == 200, r.text
            return r.json()

    with concurrent.futures.ThreadPoolExecutor(len(paths)) as pool:
        return list(pool.map(one, paths))


def test_concurrent_requests_are_micro_batched_with_the_same_answers(bird_models):
    from finegrain.evaluate.predictor import load

    predictor = load(bird_models["probe"])
    paths = [p for p, _ in bird_test_images(per_class=1)][:8]
    expected = predictor.predict_proba(paths)
    with live_server(create_app(predictor, max_batch=8, max_wait_ms=200)) as url:
        answers = _concurrent_posts(url, paths, k="10")
        stats = httpx.get(url + "/health").json()["batching"]
    assert stats["max_batch_seen"] > 1 and stats["images"] == len(paths), stats
    for row, body in zip(expected, answers):
        got = {t["class"]: t["probability"] for t in body["top"]}
        assert [got[c] for c in predictor.classes] == pytest.approx(row.tolist(), abs=1e-4)
    with live_server(create_app(predictor, max_batch=1)) as url:
        _concurrent_posts(url, paths[:4])
        stats = httpx.get(url + "/health").json()["batching"]
    assert stats["batch_sizes"] == {"1": 4}


def test_max_batch_auto_measures_the_batch_sizes_on_this_machine(bird_models):
    from finegrain.evaluate.predictor import load
    from finegrain.serve.app import best_batch_size

    app = create_app(load(bird_models["probe"]))  # max_batch="auto", the default
    service = app.state.service
    assert set(service.measured) <= {1, 2, 4, 8, 16} and 1 in service.measured
    assert service.batcher.max_batch == best_batch_size(service.measured)
    assert best_batch_size({1: 30.0, 2: 31.0, 4: 20.0}) == 1  # within timing noise: no batching, no added latency
    assert best_batch_size({1: 30.0, 2: 40.0, 4: 45.0, 8: 30.0}) == 4
    with pytest.raises(Exception, match="max_batch"):
        create_app(load(bird_models["probe"]), max_batch=0)


def test_model_and_health_describe_the_service(bird_models, client):
    info = client.get("/model").json()
    assert info["kind"] == "frozen" and info["backbone"] == "efficientnet_lite0" and info["num_classes"] == 10
    assert info["preprocess"][0]["input_size"] == 128 and info["limits"]["max_upload_bytes"] == 20 * 1024 * 1024
    assert info["gallery"] is None and info["name"] == "probe"
    health = client.get("/health").json()
    assert health["status"] == "ok" and "batch_sizes" in health["batching"]
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert 'type="file"' in page.text and "http://" not in page.text and "https://" not in page.text  # no CDN


def test_a_knn_model_serves_its_nearest_training_images(bird_models):
    with live_server(create_app(bird_models["knn"])) as url, httpx.Client(base_url=url, timeout=60) as c:
        info = c.get("/model").json()
        assert info["gallery"] == {"size": 80, "images": True}
        assert info["metrics"]["top1"] > 0.5 and info["metrics"]["source"].endswith("metrics.json")
        path, truth = bird_test_images()[5]
        body = _post(c, path, neighbours="true", cam="true").json()
        near = body["neighbours"]
        assert len(near) == 6 and all(n["image"] for n in near)
        assert sum(n["class"] == truth for n in near) >= 3
        assert [n["similarity"] for n in near] == sorted([n["similarity"] for n in near], reverse=True)
        assert body["cam"]["method"] == "gradcam"  # a k-NN head has no class weights: Grad-CAM
        thumb = c.get(f"/gallery/{near[0]['row']}")
        assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).format == "JPEG"
        assert c.get("/gallery/100000").status_code == 404


def test_micro_batcher_groups_waiting_items_and_passes_errors_on():
    sizes = []

    def run(items):
        sizes.append(len(items))
        if "boom" in items:
            raise ValueError("boom")
        return [x * 2 for x in items]

    async def scenario():
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(run, executor=pool, max_batch=4, max_wait_ms=50)
            batcher.start()
            got = await asyncio.gather(*(batcher.submit(i) for i in range(6)))
            mixed = await asyncio.gather(*(batcher.submit(i) for i in (1, "boom", 3)), return_exceptions=True)
            await batcher.stop()
        return got, mixed

    got, mixed = asyncio.run(scenario())
    assert got == [0, 2, 4, 6, 8, 10] and sizes[:2] == [4, 2]
    assert mixed[0] == 2 and isinstance(mixed[1], ValueError) and mixed[2] == 6  # only the bad item fails
    assert sizes[2:] == [3, 1, 1, 1]  # the failed batch, then its items one by one
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(run, executor=None, max_batch=0)


def test_cli_serve_one_line_errors(tmp_path, capsys, monkeypatch, bird_models):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no model at" in err
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if the serve extra were not installed
    assert main(["serve", bird_models["probe"]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'finegrain[serve]'" in err
    assert main(["serve", bird_models["probe"], "--runtime", "tpu"]) == 2
    assert main(["serve", "--help"]) == 0
    assert "(default: auto)" in capsys.readouterr().out
    assert main(["serve", bird_models["probe"], "--max-batch", "0"]) == 2


def test_cli_serve_runs_a_real_server(bird_models):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    cmd = [sys.executable, "-m", "finegrain", "serve", bird_models["probe"], "--port", "0", "--device", "cpu"]
    cmd += ["--runtime", "torch"]  # auto would convert the model to ONNX first (tested with the runtimes)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        for line in proc.stderr:  # uvicorn says where it listens
            if "Uvicorn running on" in line:
                url = line.split("Uvicorn running on ", 1)[1].split()[0]
                break
        assert url, "the server did not start"
        with httpx.Client(base_url=url, timeout=60) as c:
            assert c.get("/health").json()["status"] == "ok"
            path, truth = bird_test_images()[1]
            assert _post(c, path).json()["top"][0]["class"] == truth
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_predict_with_coverage_gives_the_set_and_the_unknown_flag_of_a_calibrated_model(bird_models, client, tmp_path):
    """An uncalibrated model refuses `coverage` with the reason (422); calibrated (conformal.json beside it, from
    held-out probabilities), /predict returns the set (top-1 first) and the flag, and GET /model says it can."""
    import shutil

    from finegrain.embed import FeatureStore
    from finegrain.evaluate.conformal import Conformal
    from finegrain.evaluate.predictor import load

    path, truth = bird_test_images()[2]
    r = _post(client, path, coverage="0.9")
    assert r.status_code == 422 and "no calibration" in r.json()["error"]
    assert client.get("/model").json()["prediction_sets"] is False
    _, y, paths = FeatureStore.open(bird_models["store"]).split("test", "gap")
    conf = Conformal("lac").fit(load(bird_models["probe"], runtime="torch").predict_proba(paths), y)
    model = tmp_path / "model"
    shutil.copytree(bird_models["probe"], model)
    (model / "conformal.json").write_text(json.dumps(conf.to_dict()))
    with live_server(create_app(str(model), max_wait_ms=5)) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/model").json()["prediction_sets"] is True
        body = _post(c, path, coverage="0.9").json()
        assert body["coverage"] == 0.9 and body["set"][0]["class"] == body["top"][0]["class"]
        assert isinstance(body["unknown"], bool) and "set" not in _post(c, path).json()  # asked for, or not there
        bad = _post(c, path, coverage="1.5")
        assert bad.status_code == 422 and "between 0 and 1" in bad.json()["error"]
