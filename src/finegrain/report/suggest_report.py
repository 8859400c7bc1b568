"""`finegrain suggest`'s gallery: the images to label next, as thumbnails in rank order, beside suggestions.csv."""

from __future__ import annotations

import csv
import os

from finegrain.report.html import Section, escape, render_report
from finegrain.report.run_report import _short, _thumb

STYLE = "<style>.g{display:inline-block;margin:4px;width:150px;vertical-align:top;font-size:11px}</style>"


def suggestion_gallery(csv_path: str, out_html: str, *, summary: dict | None = None) -> str:
    """Render suggestions.csv (rank, path, margin, guess, guess_probability, second_guess) as one self-contained
    page: each image with its rank, the model's two best guesses and the margin between them (small = uncertain).
    Returns `out_html`."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    cells = [
        f"<figure class='g'>{_thumb(r['path'], 128)}<figcaption><b>#{escape(r['rank'])}</b> "
        f"{escape(os.path.basename(r['path']))}<br>guess {escape(_short(r['guess']))} "
        f"({float(r['guess_probability']):.2f})<br>or {escape(_short(r['second_guess']))}<br>"
        f"margin {float(r['margin']):.3f}</figcaption></figure>"
        for r in rows
    ]
    summary = summary or {}
    intro = (
        f"<p>{len(rows)} of {summary.get('n_unlabeled', '?')} unlabeled images, in the order to label them: "
        "uncertain (a small margin between the two best guesses of label propagation) and spread over the "
        f"embedding space (k-center coverage). The same list: <code>{escape(os.path.basename(csv_path))}</code>.</p>"
    )
    body = intro + STYLE + ("".join(cells) or "<p>No suggestions.</p>")
    return render_report(
        "Images to label next", [Section("suggestions", "Suggestions", body)], out_html, subtitle=csv_path
    )
