"""The page at GET / in Debian's real Chromium, against a real `finegrain serve` app on a free port: a real photo
goes in through the page's file input and the predicted species is drawn; a text file shows the API's error.

Chromium is driven over the DevTools protocol on `--remote-debugging-pipe` (JSON messages separated by NUL bytes
on file descriptors 3 and 4), so no browser driver or websocket package is needed."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import tempfile
import time

import pytest

pytest.importorskip("fastapi", reason="finegrain serve needs the serve extra: pip install 'finegrain[serve]'")

from finegrain.report.browser import BASE_FLAGS  # noqa: E402
from finegrain.serve import create_app  # noqa: E402
from tests.unit.test_serve import bird_test_images, build_bird_models, live_server  # noqa: E402


class PipeBrowser:
    """Headless Chromium with one page, commanded over --remote-debugging-pipe."""

    def __init__(self, binary: str, *, timeout: float = 60) -> None:
        self.timeout, self._id, self._buf = timeout, 0, b""
        self.profile = tempfile.TemporaryDirectory(prefix="finegrain-cdp-")
        to_browser, self._to_browser = os.pipe()
        self._from_browser, from_browser = os.pipe()
        flags = [f for f in BASE_FLAGS if not f.startswith("--virtual-time-budget")]  # real time: the page fetches
        # bash puts the pipe ends on fds 3 (Chromium reads) and 4 (it writes), then becomes Chromium
        script = f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser}'
        cmd = ["bash", "-c", script, binary, *flags, f"--user-data-dir={self.profile.name}"]
        self.proc = subprocess.Popen(
            [*cmd, "--remote-debugging-pipe", "about:blank"],
            pass_fds=(to_browser, from_browser),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ, HOME=self.profile.name),
            start_new_session=True,
        )
        os.close(to_browser)
        os.close(from_browser)
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def send(self, method: str, *, session: str | None = None, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" in self._buf:  # events (no id) and late replies are skipped
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError(f"chromium did not answer {method} in {self.timeout:g} s")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise RuntimeError(f"chromium closed the pipe (exit code {self.proc.poll()})")
            self._buf += chunk

    def page(self, method: str, **params) -> dict:
        return self.send(method, session=self.session, **params)

    def eval(self, expression: str):
        r = self.page("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"still false after {timeout:g} s: {expression}")

    def choose_file(self, selector: str, path: str) -> None:
        """Set the file of an <input type=file>, as a person picking it would (input and change events fire)."""
        root = self.page("DOM.getDocument", depth=0)["root"]["nodeId"]
        node = self.page("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.page("DOM.setFileInputFiles", nodeId=node, files=[os.path.abspath(path)])

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)
        self.profile.cleanup()


SETTLED = "['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state"
RESULT = """JSON.stringify({
  top: [...document.querySelectorAll('#top li')].map((li) => li.dataset.class),
  shown: document.querySelector('#top li .name').textContent,
  widths: [...document.querySelectorAll('#top .fill')].map((f) => parseFloat(f.style.width)),
  status: document.getElementById('status').textContent,
  cam: document.getElementById('cam').naturalWidth,
  neighbours: [...document.querySelectorAll('#neighbours figure')].map((f) => f.textContent),
  thumbs: [...document.querySelectorAll('#neighbours img')].filter((i) => i.complete && i.naturalWidth > 0).length,
})"""


@pytest.fixture(scope="module")
def bird_models(tmp_path_factory):
    return build_bird_models(str(tmp_path_factory.mktemp("serve-page")))


@pytest.fixture(scope="module")
def knn_page(bird_models):
    with live_server(create_app(bird_models["knn"])) as url:
        yield url


def test_the_page_classifies_an_uploaded_photo_and_shows_upload_errors(chromium, knn_page, tmp_path):
    browser = PipeBrowser(chromium)
    try:
        browser.page("Page.navigate", url=knn_page + "/")
        browser.wait_for("document.readyState === 'complete' && document.body.dataset.state === 'idle'")
        assert "10 classes" in browser.wait_for("document.getElementById('model-info').textContent.includes('classes')"
                                                " && document.getElementById('model-info').textContent")  # fmt: skip

        path, truth = bird_test_images()[4]
        browser.choose_file("#file", path)
        assert browser.wait_for(SETTLED) == "done", browser.eval("document.getElementById('error').textContent")
        browser.wait_for("[...document.querySelectorAll('#neighbours img')].every((i) => i.complete)")
        shown = json.loads(browser.eval(RESULT))
        assert shown["top"][0] == truth and len(shown["top"]) == 5
        assert shown["shown"] == truth.replace("_", " ") and truth.replace("_", " ") in shown["status"]
        assert shown["widths"] == sorted(shown["widths"], reverse=True) and shown["widths"][0] > 30
        assert shown["cam"] == 128  # the CAM overlay decoded: the 128 px view the model saw
        assert len(shown["neighbours"]) == 6 and shown["thumbs"] == 6  # similar training images, loaded

        text = tmp_path / "notes.txt"
        text.write_text("a shopping list, not a photo\n")
        browser.choose_file("#file", str(text))
        assert browser.wait_for(SETTLED + " === 'error'")
        error = browser.eval("document.getElementById('error').textContent")
        assert "notes.txt" in error and "not an image" in error
        assert browser.eval("getComputedStyle(document.getElementById('error')).display") == "block"
        assert browser.eval("getComputedStyle(document.getElementById('result')).display") == "none"

        browser.choose_file("#file", path)  # and it still works after the error
        assert browser.wait_for(SETTLED) == "done"
        assert json.loads(browser.eval(RESULT))["top"][0] == truth
    finally:
        browser.close()


ANSWER = """JSON.stringify({
  text: document.getElementById('answer').textContent,
  shown: getComputedStyle(document.getElementById('answer')).display,
  unknown: document.getElementById('answer').classList.contains('unknown'),
})"""


def test_a_calibrated_model_page_says_one_of_these_or_none_of_my_classes(chromium, bird_models, tmp_path):
    """The probe calibrated on the bundled test photos (split conformal, conformal.json beside the model): a bird
    gets its set at 95% in words; a photo of nothing the model knows (flat grey) gets "not one of the 10 classes"."""
    from PIL import Image

    from finegrain.embed import FeatureStore
    from finegrain.evaluate.conformal import Conformal
    from finegrain.evaluate.predictor import load

    store = FeatureStore.open(bird_models["store"])
    _, y, paths = store.split("test", "gap")
    proba = load(bird_models["probe"], runtime="torch").predict_proba(paths)
    conf = Conformal("lac").fit(proba, y)
    (tmp_path / "conformal.json").write_text(json.dumps(conf.to_dict()))
    model = tmp_path / "model"
    import shutil

    shutil.copytree(bird_models["probe"], model)
    shutil.copy(tmp_path / "conformal.json", model / "conformal.json")
    grey = tmp_path / "grey.png"
    Image.new("RGB", (200, 160), (128, 128, 128)).save(grey)
    grey_top = load(str(model), runtime="torch").predict_proba([str(grey)]).max()
    assert grey_top < conf.unknown_threshold()  # the premise: flat grey is under the level of 95% of known photos

    browser = PipeBrowser(chromium)
    try:
        with live_server(create_app(str(model))) as url:
            browser.page("Page.navigate", url=url + "/")
            browser.wait_for("document.readyState === 'complete' && document.body.dataset.state === 'idle'")
            browser.wait_for("document.getElementById('model-info').textContent.includes('classes')")
            path, truth = bird_test_images()[4]
            browser.choose_file("#file", path)
            assert browser.wait_for(SETTLED) == "done", browser.eval("document.getElementById('error').textContent")
            answer = json.loads(browser.eval(ANSWER))
            assert answer["shown"] == "block" and not answer["unknown"] and "95%" in answer["text"]
            assert truth.replace("_", " ") in answer["text"]
            browser.choose_file("#file", str(grey))
            browser.wait_for(SETTLED + " === 'done' && document.getElementById('answer').classList.contains('unknown')")
            answer = json.loads(browser.eval(ANSWER))
            assert answer["text"].startswith("Not one of the 10 classes I know")
    finally:
        browser.close()


def test_a_look_closer_model_page_draws_its_zoom_box_over_the_photo(chromium, tmp_path):
    """A zoom model (the bundled birds through lite0 at 96 px, decoded at 192, `extract --zoom`, a probe): the page
    draws the box where it looked closer over the photo, where /predict says it is."""
    from finegrain.cli.main import main
    from finegrain.embed import FeatureStore, create_normalizer
    from finegrain.heads import create_classifier
    from finegrain.heads.to_model import save_store_model
    from tests.unit.test_serve import BIRDS

    store = str(tmp_path / "store")
    common = ["--workers", "0", "--no-progress", "--image-size", "96", "--crop-pct", "1.0", "--pooling", "gap"]
    assert main(["extract", BIRDS, "--out", store, "--zoom", *common]) == 0
    fs = FeatureStore.open(store)
    X, y, _ = fs.split("train", "gap")
    model = save_store_model(fs, create_classifier("probe", Cs=(1.0,)).fit(X, y), create_normalizer("none"),
                             str(tmp_path / "model"), pooling="gap", train_X=X, train_y=y)  # fmt: skip
    browser = PipeBrowser(chromium)
    try:
        with live_server(create_app(model)) as url:
            browser.page("Page.navigate", url=url + "/")
            browser.wait_for("document.readyState === 'complete' && document.body.dataset.state === 'idle'")
            path, _ = bird_test_images()[1]
            browser.choose_file("#file", path)
            assert browser.wait_for(SETTLED) == "done", browser.eval("document.getElementById('error').textContent")
            browser.wait_for("document.getElementById('preview').complete")
            box = json.loads(
                browser.eval("""JSON.stringify((() => {
              const z = document.getElementById('zoombox').getBoundingClientRect();
              const p = document.getElementById('preview').getBoundingClientRect();
              return {shown: getComputedStyle(document.getElementById('zoombox')).display,
                      caption: document.getElementById('photo-caption').textContent,
                      z: [z.left, z.top, z.right, z.bottom], p: [p.left, p.top, p.right, p.bottom]};
            })())""")
            )
            assert box["shown"] == "block" and "looked closer" in box["caption"]
            (zl, zt, zr, zb), (pl, pt, pr, pb) = box["z"], box["p"]
            assert pl - 1 <= zl < zr <= pr + 1 and pt - 1 <= zt < zb <= pb + 1  # inside the photo
            import httpx

            with open(path, "rb") as f:  # the box the API gives for that photo, drawn where it says
                api = httpx.post(url + "/predict", files={"image": f}, data={"cam": "true"}, timeout=60).json()
            x0, y0, x1, y1 = api["zoom"]["box"]
            w, h = pr - pl, pb - pt
            drawn = [(zl - pl) / w, (zt - pt) / h, (zr - pl) / w, (zb - pt) / h]
            assert drawn == pytest.approx([x0, y0, x1, y1], abs=4 / min(w, h))
    finally:
        browser.close()
