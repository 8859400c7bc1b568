"""One self-contained HTML report: inline CSS, inline script, every image a data URI, nothing fetched from anywhere.

Content is built from `Section`s whose `html` is an already-safe body fragment. The helpers here make such
fragments: `table` escapes every cell (wrap a cell in `Safe` to pass HTML through), and `figure_to_img`,
`png_to_img`, `pil_to_img` embed images as data URIs. `render_report` writes the page atomically.

The page checks itself when it loads: each `<section data-section>` gets `data-rendered="ok"` when it has
content and every image in it decoded, else `"broken"`, and `<body data-sections="<ok>/<total>">` sums it up.
A headless browser reads those attributes back (see `finegrain.report.browser`).
"""

from __future__ import annotations

import base64
import html as _html
import io
import math
import numbers
import re
from dataclasses import dataclass

from finegrain.atomic import atomic_write_text

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
MISSING = "\u2013"  # en dash, shown for None


class Safe(str):
    """A string of HTML that is already safe: `table` and `escape` pass it through unescaped."""

    __slots__ = ()


@dataclass
class Section:
    id: str  # the anchor: a letter, then letters, digits, '-' or '_'; unique within a report
    title: str  # plain text, escaped when rendered
    html: str  # body fragment, already-escaped HTML


def escape(value: object) -> str:
    """HTML-escape `str(value)`, quotes included; a `Safe` string comes back as it is."""
    if isinstance(value, Safe):
        return value
    return _html.escape(str(value), quote=True)


def format_number(x: object) -> str:
    """A cell's text: None -> '–', floats to 4 decimals (scientific when very small or large), the rest str()."""
    if x is None:
        return MISSING
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, numbers.Integral):
        return str(int(x))
    if isinstance(x, numbers.Real):
        f = float(x)
        if math.isnan(f):
            return "nan"
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        if f == 0:
            return "0"
        if 1e-3 <= abs(f) < 1e5:
            return f"{f:.4f}"
        return f"{f:.4g}"
    return str(x)


def _is_number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _cell(value: object, tag: str, *, safe: bool, num: bool = False) -> str:
    if isinstance(value, Safe) or (safe and isinstance(value, str)):
        text = str(value)
    else:
        text = escape(format_number(value))
    attr = ' class="num"' if num or _is_number(value) else ""
    return f"<{tag}{attr}>{text}</{tag}>"


def _numeric_columns(n: int, rows: list[list]) -> list[bool]:
    """Columns whose body cells are all numbers (or None): their header is right-aligned like the numbers."""
    cols = [False] * n
    for j in range(n):
        values = [row[j] for row in rows if j < len(row) and row[j] is not None]
        cols[j] = bool(values) and all(_is_number(v) for v in values)
    return cols


def _table(header: list, rows: list[list], cls: str, *, safe: bool) -> str:
    rows = [list(r) for r in rows]
    cls_attr = f' class="{escape(cls)}"' if cls else ""
    out = [f'<div class="table-wrap"><table{cls_attr}>']
    if header:
        num = _numeric_columns(len(header), rows)
        out.append(
            "<thead><tr>" + "".join(_cell(h, "th", safe=safe, num=k) for h, k in zip(header, num)) + "</tr></thead>"
        )
    out.append("<tbody>")
    for row in rows:
        out.append("<tr>" + "".join(_cell(v, "td", safe=safe) for v in row) + "</tr>")
    out.append("</tbody></table></div>")
    return Safe("".join(out))


def table(header: list[str], rows: list[list], *, cls: str = "") -> str:
    """An HTML table; every header and body cell is escaped unless it is a `Safe` string. Numbers are formatted
    with `format_number` and right-aligned; None shows as '–'."""
    return _table(header, rows, cls, safe=False)


def raw_table(header: list[str], rows: list[list], *, cls: str = "") -> str:
    """Like `table`, but string cells are trusted HTML and go in unescaped. Non-strings are still formatted."""
    return _table(header, rows, cls, safe=True)


def _img(mime: str, data: bytes, *, alt: str, width: int | None = None, height: int | None = None) -> str:
    b64 = base64.b64encode(data).decode("ascii")
    size = ""
    if width is not None:
        size += f' width="{int(width)}"'
    if height is not None:
        size += f' height="{int(height)}"'
    return Safe(f'<img src="data:{mime};base64,{b64}" alt="{escape(alt)}"{size}>')


def _png_size(png: bytes) -> tuple[int, int]:
    # IHDR is always the first chunk: width and height are big-endian uint32 at bytes 16..24.
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def png_to_img(png_bytes: bytes, *, alt: str, width: int | None = None) -> str:
    """`<img>` with the PNG as a data URI; `width` (CSS pixels) scales it, height follows the aspect ratio."""
    png_bytes = bytes(png_bytes)
    if not png_bytes.startswith(PNG_SIGNATURE) or len(png_bytes) < 24:
        raise ValueError("png_to_img: the bytes are not a PNG image")
    if width is None:
        return _img("image/png", png_bytes, alt=alt)
    w, h = _png_size(png_bytes)
    height = round(h * width / w) if w else None
    return _img("image/png", png_bytes, alt=alt, width=width, height=height)


def figure_to_img(fig, *, alt: str, dpi: int = 100) -> str:
    """Render a matplotlib Figure to PNG with the Agg renderer, close it, and return an `<img>` with a data URI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buf = io.BytesIO()
    try:
        FigureCanvasAgg(fig)  # attach an Agg canvas: works whatever backend pyplot picked, no display needed
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        _close_figure(fig)
    png = buf.getvalue()
    w, h = _png_size(png)
    return _img("image/png", png, alt=alt, width=w, height=h)


def _close_figure(fig) -> None:
    """Release a figure pyplot may be tracking; a figure made with `Figure()` directly is not tracked."""
    import sys

    plt = sys.modules.get("matplotlib.pyplot")  # only if the caller used pyplot: importing it picks a backend
    if plt is not None:
        plt.close(fig)


def pil_to_img(pil_image, *, alt: str, max_side: int = 256) -> str:
    """A PIL image as a thumbnail (longest side <= max_side): JPEG when opaque RGB/L, PNG when it has alpha or a
    palette."""
    img = pil_image.copy()
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha or img.mode == "P":
        if img.mode not in ("RGBA", "LA", "RGB", "L", "P"):
            img = img.convert("RGBA")
        img.save(buf, format="PNG", optimize=True)
        mime = "image/png"
    else:
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        img.save(buf, format="JPEG", quality=88)
        mime = "image/jpeg"
    return _img(mime, buf.getvalue(), alt=alt, width=img.width, height=img.height)


_CSS = """
:root { --fg: #1d2330; --muted: #5b6476; --bg: #ffffff; --panel: #f6f7f9; --line: #dde1e8; --accent: #2a5bd7;
  --zebra: #f3f5f8; --toc-w: 15rem; }
* { box-sizing: border-box; }
html { scroll-behavior: smooth; }
body { margin: 0; color: var(--fg); background: var(--bg); line-height: 1.5;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header.report-head { padding: 1.5rem 2rem 1rem; border-bottom: 1px solid var(--line); background: var(--panel); }
header.report-head h1 { margin: 0; font-size: 1.6rem; }
header.report-head .subtitle { margin: .3rem 0 0; color: var(--muted); }
.layout { display: flex; align-items: flex-start; gap: 2rem; padding: 1.5rem 2rem; max-width: 1400px; }
nav.toc { position: sticky; top: 1rem; flex: 0 0 var(--toc-w); max-height: calc(100vh - 2rem); overflow-y: auto;
  padding: .8rem 1rem; border: 1px solid var(--line); border-radius: 6px; background: var(--panel); }
nav.toc h2 { margin: 0 0 .4rem; font-size: .8rem; text-transform: uppercase; letter-spacing: .06em;
  color: var(--muted); }
nav.toc ol { margin: 0; padding-left: 1.2rem; }
nav.toc li { margin: .2rem 0; }
nav.toc a { color: var(--accent); text-decoration: none; }
nav.toc a:hover { text-decoration: underline; }
main { flex: 1 1 auto; min-width: 0; }
section[data-section] { margin: 0 0 2.5rem; scroll-margin-top: 1rem; }
section[data-section] > h2 { margin: 0 0 .8rem; padding-bottom: .3rem; border-bottom: 2px solid var(--line);
  font-size: 1.25rem; }
img { max-width: 100%; height: auto; }
.table-wrap { overflow-x: auto; margin: .5rem 0 1rem; }
table { border-collapse: collapse; font-size: .9rem; }
th, td { padding: .35rem .7rem; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: var(--panel); border-bottom: 2px solid var(--line); white-space: nowrap; }
tbody tr:nth-child(even) { background: var(--zebra); }
tbody tr:hover { background: #e8eefc; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code, pre { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: .88em; }
pre { background: var(--panel); padding: .7rem; border-radius: 4px; overflow-x: auto; }
footer { padding: 1rem 2rem 2rem; color: var(--muted); font-size: .8rem; }
@media (max-width: 800px) {
  .layout { display: block; padding: 1rem; }
  nav.toc { position: static; max-height: none; margin-bottom: 1.5rem; }
  header.report-head { padding: 1rem; }
}
@media print { nav.toc { display: none; } .layout { display: block; } }
"""

# Runs on `load`, after every image has either decoded or failed.
_SELF_CHECK = """
window.addEventListener("load", function () {
  var sections = document.querySelectorAll("section[data-section]");
  var ok = 0;
  sections.forEach(function (s) {
    var body = s.querySelector(".section-body");
    var nonEmpty = !!body && (body.children.length > 0 || body.textContent.trim().length > 0);
    var imgs = s.querySelectorAll("img");
    var good = nonEmpty;
    for (var i = 0; i < imgs.length; i++) {
      if (!(imgs[i].complete && imgs[i].naturalWidth > 0)) { good = false; }
    }
    s.dataset.rendered = good ? "ok" : "broken";
    if (good) { ok += 1; }
  });
  document.body.dataset.sections = ok + "/" + sections.length;
});
"""

# Belt and braces: even a fragment that names a remote URL cannot make the page fetch it.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def _check_sections(sections: list[Section]) -> None:
    seen: set[str] = set()
    for s in sections:
        if not isinstance(s, Section):
            raise ValueError(f"render_report: expected Section objects, got {type(s).__name__}")
        if not isinstance(s.id, str) or not _ID_RE.match(s.id):
            raise ValueError(
                f"render_report: invalid section id {s.id!r}: use a letter, then letters, digits, '-' or '_'"
            )
        if s.id in seen:
            raise ValueError(f"render_report: duplicate section id {s.id!r}")
        seen.add(s.id)


def render_html(title: str, sections: list[Section], *, subtitle: str = "") -> str:
    """The report page as a string (what `render_report` writes)."""
    sections = list(sections)
    _check_sections(sections)
    toc = "".join(f'<li><a href="#{s.id}">{escape(s.title)}</a></li>' for s in sections)
    body = "\n".join(
        f'<section id="{s.id}" data-section>\n<h2>{escape(s.title)}</h2>\n'
        f'<div class="section-body">\n{s.html}\n</div>\n</section>'
        for s in sections
    )
    sub = f'<p class="subtitle">{escape(subtitle)}</p>' if subtitle else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
        "<body>\n"
        f'<header class="report-head"><h1>{escape(title)}</h1>{sub}</header>\n'
        '<div class="layout">\n'
        f'<nav class="toc" aria-label="Contents"><h2>Contents</h2><ol>{toc}</ol></nav>\n'
        f"<main>\n{body}\n</main>\n</div>\n"
        "<footer>Generated by finegrain. This file is self-contained: it loads nothing from elsewhere.</footer>\n"
        f"<script>{_SELF_CHECK}</script>\n"
        "</body>\n</html>\n"
    )


def render_report(title: str, sections: list[Section], path: str, *, subtitle: str = "") -> str:
    """Write the report to `path` as one self-contained HTML file (atomically) and return `path`.

    Raises ValueError when a section id is invalid or repeated."""
    text = render_html(title, sections, subtitle=subtitle)
    atomic_write_text(str(path), text)
    return str(path)
