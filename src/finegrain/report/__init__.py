"""Self-contained HTML reports: sections of escaped HTML, images as data URIs, and a headless-browser check."""

from finegrain.report.browser import find_chromium, render_in_browser
from finegrain.report.html import (
    Safe,
    Section,
    escape,
    figure_to_img,
    format_number,
    pil_to_img,
    png_to_img,
    raw_table,
    render_html,
    render_report,
    table,
)

__all__ = [
    "Safe",
    "Section",
    "escape",
    "figure_to_img",
    "find_chromium",
    "format_number",
    "pil_to_img",
    "png_to_img",
    "raw_table",
    "render_html",
    "render_in_browser",
    "render_report",
    "table",
]
