"""Figures of evaluation results (matplotlib's object API with the Agg canvas: no pyplot global state)."""

from __future__ import annotations


def new_figure(w: float = 6.4, h: float = 4.0):
    """A matplotlib Figure of w x h inches at 100 dpi, drawable without pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # optional heavy import, only when drawing
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def reliability_figure(cal: dict):
    """The reliability diagram of `summarize(...)["calibration"]`: accuracy per confidence bin against the diagonal."""
    fig = new_figure(4.2, 4.0)
    ax = fig.add_subplot()
    used = [b for b in cal["bins"] if b["count"]]
    ax.bar([(b["lo"] + b["hi"]) / 2 for b in used], [b["accuracy"] for b in used], width=1 / cal["n_bins"],
           edgecolor="black", alpha=0.7, label="accuracy")  # fmt: skip
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability diagram (ECE {cal['ece']:.3f})", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig
