"""Long-tail evaluation: many/medium/few-shot accuracy (Kang et al., ICLR 2020) and accuracy-vs-frequency plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from finegrain.atomic import atomic_write
from finegrain.data.longtail import GROUPS, shot_groups


def shot_accuracy(
    per_class_acc: Sequence[float] | np.ndarray, train_counts: Sequence[int], *, many: int = 100, few: int = 20
) -> dict[str, float | None]:
    """Per-class accuracy [C] (NaN for a class without test images, as `per_class_accuracy` gives) and training
    images per class [C] -> {"many_shot", "medium_shot", "few_shot"}: the mean accuracy of the group's classes
    that have test images (many: n > many, few: n < few); None for a group without any."""
    acc = np.asarray(per_class_acc, dtype=np.float64)
    groups = shot_groups(train_counts, many=many, few=few)
    if acc.shape != groups.shape:
        raise ValueError(f"per_class_acc and train_counts must have the same length; got {acc.shape}, {groups.shape}")
    out: dict[str, float | None] = {}
    for g in GROUPS:
        values = acc[(groups == g) & ~np.isnan(acc)]
        out[f"{g}_shot"] = float(values.mean()) if len(values) else None
    return out


def per_class_vs_frequency_plot(
    per_class_acc: Sequence[float],
    train_counts: Sequence[int],
    path: str | Path,
    *,
    many: int = 100,
    few: int = 20,
    title: str | None = None,
) -> Path:
    """Write a PNG: per-class accuracy [C] (fractions) against training images per class [C], log x axis, dashed
    lines at the few/many-shot boundaries. Classes without training images or without test images are left out
    (and counted in the caption). Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # optional heavy import; no pyplot global state
    from matplotlib.figure import Figure

    acc, counts = np.asarray(per_class_acc, dtype=float), np.asarray(train_counts, dtype=float)
    if acc.shape != counts.shape or acc.ndim != 1:
        raise ValueError(f"per_class_acc and train_counts must be 1-D, same length; got {acc.shape}, {counts.shape}")
    shown = (counts > 0) & ~np.isnan(acc)
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    groups = shot_groups(counts, many=many, few=few)
    for g, color in zip(GROUPS, ("tab:blue", "tab:orange", "tab:red")):
        sel = shown & (groups == g)
        if sel.any():
            ax.scatter(counts[sel], acc[sel], s=14, alpha=0.7, color=color, label=f"{g} ({sel.sum()} classes)")
    ax.set_xscale("log")
    for x in (few, many):  # "few" is n < few, "many" is n > many
        ax.axvline(x, color="grey", linestyle="--", linewidth=0.8)
    if shown.any():
        lo, hi = counts[shown].min(), counts[shown].max()
        ax.set_xlim(min(lo, few) / 1.5, max(hi, many) * 1.5)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("training images per class (log scale)")
    ax.set_ylabel("per-class accuracy")
    hidden = int((~shown).sum())
    ax.set_title(title or "per-class accuracy vs training frequency", fontsize=10)
    if hidden:
        fig.text(0.01, 0.01, f"{hidden} classes without training or test images not shown", fontsize=7)
    if shown.any():
        ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    atomic_write(str(path), lambda f: fig.savefig(f, format="png"))
    return path


__all__ = ["per_class_vs_frequency_plot", "shot_accuracy"]
