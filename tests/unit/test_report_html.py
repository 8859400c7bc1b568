"""The self-contained HTML report: escaping, ids, no external resources, data-URI images, atomic writes."""

from __future__ import annotations

import base64
import io
import os
import re

import numpy as np
import pytest
from PIL import Image

from finegrain.report import Safe, Section, figure_to_img, pil_to_img, png_to_img, raw_table, render_report, table

DATA_URI_RE = re.compile(r'<img src="data:(image/[a-z]+);base64,([A-Za-z0-9+/=]+)"')


def _decode_imgs(html: str) -> list[tuple[str, Image.Image]]:
    out = []
    for mime, b64 in DATA_URI_RE.findall(html):
        img = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
        img.load()
        out.append((mime, img))
    return out


def _line_figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3, 2))
    ax = fig.add_subplot()
    ax.plot([0, 1, 2], [0, 1, 4], label="<b>x</b>")
    ax.set_title("accuracy & loss")
    return fig


def test_table_escapes_cells_and_header():
    html = table(["class", "<th>"], [["<script>alert(1)</script>", 0.5], ["a&b", None]])
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;th&gt;" in html
    assert "a&amp;b" in html
    assert "\u2013" in html  # None
    assert '<td class="num">0.5000</td>' in html


def test_table_formats_numbers():
    html = table(["v"], [[1], [np.int64(7)], [np.float32(0.25)], [1234.56789], [1.5e-6], [2.5e7], [float("nan")]])
    cells = re.findall(r'<td class="num">([^<]*)</td>', html)
    assert cells == ["1", "7", "0.2500", "1234.5679", "1.5e-06", "2.5e+07", "nan"]


def test_safe_cells_are_not_escaped():
    html = table(["a", "b"], [[Safe("<em>ok</em>"), "<em>no</em>"]])
    assert "<em>ok</em>" in html
    assert "&lt;em&gt;no&lt;/em&gt;" in html
    raw = raw_table(["a"], [["<em>trusted</em>"], [0.123456]])
    assert "<em>trusted</em>" in raw and "0.1235" in raw


def test_section_title_and_report_title_are_escaped(tmp_path):
    path = render_report(
        "<script>alert(1)</script>",
        [Section("s1", "<script>alert(1)</script>", "<p>body</p>")],
        str(tmp_path / "r.html"),
        subtitle="<i>sub</i>",
    )
    text = open(path, encoding="utf-8").read()
    assert "<script>alert(1)</script>" not in text
    assert text.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 4  # <title>, <h1>, the TOC, the <h2>
    assert "&lt;i&gt;sub&lt;/i&gt;" in text


def test_section_ids_unique_and_valid(tmp_path):
    path = str(tmp_path / "r.html")
    with pytest.raises(ValueError, match="duplicate"):
        render_report("t", [Section("a", "A", "<p>1</p>"), Section("a", "B", "<p>2</p>")], path)
    for bad in ["", "1abc", "has space", 'q"uote', "a<b", "é"]:
        with pytest.raises(ValueError, match="invalid section id"):
            render_report("t", [Section(bad, "A", "<p>1</p>")], path)
    assert not os.path.exists(path)  # nothing written when the sections are invalid


def test_report_is_self_contained(tmp_path):
    fig_img = figure_to_img(_line_figure(), alt="curve")
    thumb = pil_to_img(Image.new("RGB", (600, 300), (200, 30, 30)), alt="red", max_side=128)
    sections = [
        Section("plot", "Plot", fig_img),
        Section("tab", "Table", table(["k", "v"], [["a", 1.0]])),
        Section("thumb", "Thumbnail", thumb),
    ]
    path = render_report("Report", sections, str(tmp_path / "r.html"))
    text = open(path, encoding="utf-8").read()
    # No resource reference leaves the file: every src/href is a data URI or an in-page anchor.
    refs = re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', text, flags=re.I)
    assert refs
    for ref in refs:
        assert ref.startswith("data:") or ref.startswith("#"), ref
    assert not re.search(r"(?:src|href)\s*=\s*['\"]?\s*(?:https?:)?//", text, flags=re.I)
    assert not re.search(r"@import|url\(\s*['\"]?(?:https?:)?//", text, flags=re.I)
    assert "<link" not in text.lower()
    # every image is a data URI and decodes
    assert text.count("<img") == 2
    imgs = _decode_imgs(text)
    assert [m for m, _ in imgs] == ["image/png", "image/jpeg"]
    # TOC links to each section, and each section carries the self-check hook
    for s in sections:
        assert f'href="#{s.id}"' in text
        assert f'<section id="{s.id}" data-section>' in text
    assert "dataset.rendered" in text and "dataset.sections" in text


def test_written_atomically(tmp_path):
    out = tmp_path / "sub" / "report.html"
    assert render_report("T", [Section("a", "A", "<p>x</p>")], str(out)) == str(out)
    assert render_report("T2", [Section("a", "A", "<p>y</p>")], str(out)) == str(out)  # replaces
    assert os.listdir(out.parent) == ["report.html"]  # no .tmp-* left behind
    assert "<p>y</p>" in out.read_text(encoding="utf-8")


def test_figure_embeds_valid_png_and_is_closed():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.bar(["a", "b"], [1, 2])
    n_before = len(plt.get_fignums())
    html = figure_to_img(fig, alt='bars "quoted"', dpi=50)
    assert len(plt.get_fignums()) == n_before - 1  # closed
    assert 'alt="bars &quot;quoted&quot;"' in html
    ((mime, img),) = _decode_imgs(html)
    assert mime == "image/png" and img.format == "PNG"
    assert 100 < img.width <= 200 and 80 < img.height <= 150  # about 4x3 in at 50 dpi, trimmed by bbox tight
    assert f'width="{img.width}" height="{img.height}"' in html
    assert np.asarray(img.convert("L")).std() > 5  # there is a plot on it


def test_figure_without_pyplot():
    html = figure_to_img(_line_figure(), alt="x")
    ((mime, img),) = _decode_imgs(html)
    assert img.format == "PNG" and img.width > 50


def test_pil_thumbnail_jpeg_and_png():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8))
    ((mime, img),) = _decode_imgs(pil_to_img(rgb, alt="noise", max_side=100))
    assert mime == "image/jpeg" and img.size == (100, 60)
    assert rgb.size == (500, 300)  # the caller's image is untouched
    rgba = Image.new("RGBA", (40, 80), (0, 0, 255, 128))
    ((mime, img),) = _decode_imgs(pil_to_img(rgba, alt="alpha"))
    assert mime == "image/png" and img.size == (40, 80) and img.mode == "RGBA"
    ((mime, img),) = _decode_imgs(pil_to_img(Image.new("I;16", (20, 10)), alt="16-bit"))
    assert mime == "image/jpeg"


def test_png_to_img():
    buf = io.BytesIO()
    Image.new("RGB", (40, 20), (0, 128, 0)).save(buf, format="PNG")
    html = png_to_img(buf.getvalue(), alt="g", width=80)
    assert 'width="80" height="40"' in html
    ((mime, img),) = _decode_imgs(html)
    assert img.size == (40, 20)
    with pytest.raises(ValueError):
        png_to_img(b"GIF89a....", alt="x")


def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    import stat

    from finegrain.atomic import _umask, atomic_write_text

    path = tmp_path / "out.txt"
    atomic_write_text(str(path), "x")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~_umask()  # not mkstemp's private 0600
