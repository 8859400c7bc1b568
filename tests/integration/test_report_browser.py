"""The HTML report in Debian's real Chromium: every section renders, the self-check can fail, the page is drawn."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from PIL import Image

from finegrain.errors import FinegrainError
from finegrain.report import Section, figure_to_img, pil_to_img, render_in_browser, render_report, table

WIDTH, HEIGHT = 1024, 1400


def _rendered(dom: str) -> dict[str, str]:
    """section id -> data-rendered, from the DOM Chromium dumped after `load`."""
    out = {}
    for tag in re.findall(r"<section\b[^>]*>", dom):
        sid = re.search(r'\bid="([^"]+)"', tag).group(1)
        state = re.search(r'\bdata-rendered="([^"]*)"', tag)
        out[sid] = state.group(1) if state else None
    return out


def _body_sections(dom: str) -> str | None:
    body = re.search(r"<body\b[^>]*>", dom).group(0)
    m = re.search(r'\bdata-sections="([^"]*)"', body)
    return m.group(1) if m else None


def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3))
    ax = fig.add_subplot()
    x = np.linspace(0, 6, 50)
    ax.plot(x, np.sin(x), label="sin")
    ax.plot(x, np.cos(x), label="cos")
    ax.legend()
    ax.set_title("curves")
    return fig


def test_report_renders_in_chromium(chromium, tmp_path):
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8))
    sections = [
        Section("plot", "A matplotlib figure", figure_to_img(_figure(), alt="sin and cos")),
        Section(
            "scores",
            "A table",
            table(["class", "top-1", "n"], [["<script>alert(1)</script>", 0.91234, 12], ["b", None, 3]]),
        ),
        Section("thumb", "A thumbnail", pil_to_img(photo, alt="noise", max_side=128)),
    ]
    path = render_report("Browser check", sections, str(tmp_path / "report.html"), subtitle="three sections")
    shot = tmp_path / "shot.png"

    dom = render_in_browser(path, screenshot_path=str(shot), chromium=chromium, width=WIDTH, height=HEIGHT)

    assert _body_sections(dom) == "3/3"
    assert _rendered(dom) == {"plot": "ok", "scores": "ok", "thumb": "ok"}
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom  # still text after parsing, never a script
    img = Image.open(shot)
    assert img.format == "PNG"
    assert img.size == (WIDTH, HEIGHT)
    assert np.asarray(img.convert("L"), dtype=np.float32).std() > 10  # not a blank page


def test_self_check_reports_a_broken_image(chromium, tmp_path):
    good = pil_to_img(Image.new("RGB", (32, 32), (0, 120, 200)), alt="fine")
    sections = [
        Section("good", "Fine", good),
        Section("bad", "Broken image", '<p>before</p><img src="data:image/png;base64,AAAA" alt="broken">'),
        Section("empty", "Empty", "   "),
        # Blocked by the page's Content-Security-Policy (img-src data:) before any fetch: remote images never render.
        Section("remote", "Remote image", '<img src="http://127.0.0.1:9/x.png" alt="remote">'),
    ]
    path = render_report("Negative check", sections, str(tmp_path / "report.html"))

    dom = render_in_browser(path, screenshot_path=str(tmp_path / "shot.png"), chromium=chromium, width=800, height=600)

    assert _rendered(dom) == {"good": "ok", "bad": "broken", "empty": "broken", "remote": "broken"}
    assert _body_sections(dom) == "1/4"


def test_render_in_browser_errors(chromium, tmp_path):
    with pytest.raises(FinegrainError, match="no such file"):
        render_in_browser(str(tmp_path / "missing.html"), screenshot_path=str(tmp_path / "s.png"), chromium=chromium)
    page = render_report("x", [Section("a", "A", "<p>a</p>")], str(tmp_path / "r.html"))
    with pytest.raises(FinegrainError, match="could not start chromium"):
        render_in_browser(page, screenshot_path=str(tmp_path / "s.png"), chromium=str(tmp_path / "no-chromium"))


def _fake_chromium(tmp_path, body: str) -> str:
    path = tmp_path / "fake-chromium"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def _ended(pid: int) -> bool:
    """The process is gone or a zombie (killed, not yet reaped); waits up to 5 s for the kill to land."""
    for _ in range(100):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_render_in_browser_reports_failure_and_timeout(tmp_path):
    """No chromium needed: a stand-in that fails, one that hangs, one that writes no screenshot."""
    page = render_report("x", [Section("a", "A", "<p>a</p>")], str(tmp_path / "r.html"))
    shot = str(tmp_path / "s.png")
    failing = _fake_chromium(tmp_path, "echo 'boom: no display' >&2; exit 3")
    with pytest.raises(FinegrainError, match="exit code 3.*boom: no display"):
        render_in_browser(page, screenshot_path=shot, chromium=failing)
    hanging = _fake_chromium(tmp_path, f"sleep 60 & echo $! > {tmp_path}/child.pid; wait")
    with pytest.raises(FinegrainError, match="timed out after 1 s"):
        render_in_browser(page, screenshot_path=shot, chromium=hanging, timeout=1)
    # the whole process group was killed, the stand-in's own child included (no timing assertion: its state)
    assert _ended(int((tmp_path / "child.pid").read_text()))
    silent = _fake_chromium(tmp_path, "echo '<html><body></body></html>'")
    with pytest.raises(FinegrainError, match="no screenshot"):
        render_in_browser(page, screenshot_path=shot, chromium=silent)
