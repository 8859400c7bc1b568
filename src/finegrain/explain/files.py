"""`finegrain explain`: CAM / Grad-CAM overlays of image files written to a folder, with explanations.json."""

from __future__ import annotations

import os

from finegrain.atomic import atomic_write, atomic_write_json
from finegrain.data import ImageDecodeError
from finegrain.data.decode import unreadable
from finegrain.explain.cam import explain_images, overlay


def explain_files(predictor, paths: list[str], out: str, *, method: str = "auto", target=None, layer=None,
                  threshold: float = 0.5, say=print) -> tuple[list[dict], list[tuple[str, str]]]:  # fmt: skip
    """One overlay PNG a readable image in `out` (names made unique), explanations.json listing every input
    (skipped ones with their reason); `say` gets one line an image. Returns (records, skipped [(path, why)])."""
    os.makedirs(out, exist_ok=True)
    records, seen, skipped = [], set(), []
    for path in paths:
        reason = unreadable(path)
        try:
            if reason is None:
                (e,) = explain_images(predictor, [path], method=method, target=target, layer=layer,
                                      threshold=threshold)  # fmt: skip
        except ImageDecodeError as err:
            reason = str(err)
        if reason is not None:
            skipped.append((path, reason))
            records.append({"path": path, "skipped": reason})
            continue
        stem = os.path.splitext(os.path.basename(path))[0]
        name, i = f"{stem}-{e.method}.png", 1
        while name in seen:
            name, i = f"{stem}-{i}-{e.method}.png", i + 1
        seen.add(name)
        img = overlay(e.view, e.heatmap, e.box)
        atomic_write(os.path.join(out, name), lambda f, img=img: img.save(f, format="PNG"))
        records.append({**e.to_dict(), "overlay": name})
        say(f"{path}\t{e.target_name} {e.probability:.3f}\tbox {e.box_original}\t-> {name}")
    atomic_write_json(os.path.join(out, "explanations.json"), records)
    return records, skipped
