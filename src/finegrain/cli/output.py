"""What the commands print: JSON documents, skipped inputs, engine notes, on stdout or stderr."""

from __future__ import annotations

import sys


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _skipped_summary(skipped: list[tuple[str, str]], n: int | None, listed: str) -> None:
    """The first skipped inputs and their reasons on stderr, then how many and where all of them are listed."""
    for path, reason in skipped[:10]:
        _stderr(f"  skipped {path}: {reason}")
    of = f" of {n}" if n is not None else ""
    _stderr(f"finegrain: {len(skipped)}{of} input(s) skipped, listed in {listed}")


def _print_json(doc: dict) -> None:
    """--json: one document on stdout (NaN written as null, numpy scalars as numbers)."""
    import json
    import math

    def clean(v):
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        if hasattr(v, "item") and not isinstance(v, str):
            v = v.item() if getattr(v, "ndim", 0) == 0 else v.tolist()
        return None if isinstance(v, float) and not math.isfinite(v) else v

    print(json.dumps(clean(doc), indent=1), flush=True)


def say_engines(predictor) -> None:
    """On stderr, last: which engine ran each model and why (--runtime auto measures it)."""
    for member in getattr(predictor, "members", [predictor]):
        for note in getattr(member, "engine_notes", []):
            _stderr(f"finegrain: engine at {note}")


def _say_scored(scored: dict) -> None:
    """On stderr: which images the split contract kept, or that training images were scored on request."""
    if scored.get("selection"):
        _stderr(f"finegrain: scoring {scored['selection']} (the others trained or validated the model)")
    if scored.get("includes_training_images"):
        _stderr(f"warning: {scored['training_images_scored']} scored image(s) trained or validated the model")


def say_answer(top: list[tuple[str, float]], answer: dict, coverage: float | None, n_classes: int) -> str:
    """One prediction as a line: the top-k, or (with a coverage) "one of N (90%): ..." and, when the image looks
    unlike every class, "not one of the N classes I know"."""
    line = "  ".join(f"{name} {p:.3f}" for name, p in top)
    if coverage is None:
        return line
    head = f"one of {len(top)} ({coverage:.0%}): " if len(top) > 1 else f"{coverage:.0%} sure: "
    tail = f"  [not one of the {n_classes} classes I know?]" if answer.get("unknown") else ""
    return head + line + tail


def say_sets(s: dict) -> None:
    """`evaluate`'s lines on a calibrated model's prediction sets (by shot band) and on images of classes the model
    does not know (set apart from the scores)."""
    for cov, row in (s.get("prediction_sets") or {}).items():  # a calibrated model: its sets on these images
        print(f"  set @ {float(cov):.0%}       coverage {row['coverage']:.4f}, mean size {row['mean_set_size']:.2f}")
        bands = ", ".join(f"{g.replace('_shot', '')} {b['coverage']:.3f}" for g, b in row.get("shot_bands", {}).items())
        if bands:
            print(f"    by shot band   {bands}")
    u = s.get("unknown_classes")
    if u:  # images of classes the model does not know, set apart from the scores above
        flag = u.get("flag")
        said = f"; its flag: {flag['unknown_flagged']:.1%} flagged, {flag['known_accepted']:.1%} of known accepted"
        print(f"  unknown classes  {u['n_images']} images: AUROC {u['auroc']:.4f}, accepted at 95% TPR "
              f"{u['fpr_at_95_tpr']:.1%}" + (said if flag else ""))  # fmt: skip
