"""The run report on a real trained model: every section renders in headless Chromium, images included."""

import json
import os
import re

import numpy as np
from PIL import Image

from finegrain.cli.main import main
from finegrain.report import render_in_browser

SECTIONS = ["data", "config", "curves", "metrics", "confusion", "frequency", "confused", "cam", "neighbours", "map"]


def test_cli_report_renders_every_section_in_chromium(trained_run, chromium, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["report", trained_run, "--out", str(out), "--gallery", "4"]) == 0
    html = out.read_text()
    for sid in SECTIONS:
        assert f'id="{sid}"' in html, sid
    assert not re.search(r"""(src|href)=["']https?://""", html)  # self-contained: opens offline
    metrics = json.loads((tmp_path / "report-metrics.json").read_text())
    assert 0 <= metrics["metrics"]["top1"] <= 1 and metrics["n"] == 12

    shot = tmp_path / "shot.png"
    dom = render_in_browser(str(out), screenshot_path=str(shot), chromium=chromium, width=1200, height=1600)
    assert f'data-sections="{len(SECTIONS)}/{len(SECTIONS)}"' in dom
    for sid in SECTIONS:
        tag = re.search(rf'<section[^>]*id="{sid}"[^>]*>', dom).group(0)
        assert 'data-rendered="ok"' in tag, tag
    img = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert img.shape == (1600, 1200) and img.std() > 10


def test_report_without_config_needs_data(trained_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(os.path.join(trained_run, "model"), run / "model")
    assert main(["report", str(run)]) == 2
    assert "--data" in capsys.readouterr().err
