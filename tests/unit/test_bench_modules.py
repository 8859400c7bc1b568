"""Every benchmark module imports and parses its command line (`bench.X --help`): a library change that
breaks a benchmark fails here, not the next time someone measures. tests/unit/test_bench_suite.py runs the suite's
logic on a tiny fixture."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import pytest

import bench

MODULES = sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if m.name != "common")


def test_every_bench_module_imports():
    for name in MODULES:
        importlib.import_module(f"bench.{name}")


@pytest.mark.parametrize("name", MODULES)
def test_bench_module_parses_its_command_line(name, monkeypatch, capsys):
    """`python -m bench.X --help`, in this process (the modules are imported once above)."""
    module = importlib.import_module(f"bench.{name}")
    monkeypatch.setattr(sys, "argv", [f"bench.{name}", "--help"])
    with pytest.raises(SystemExit) as done:
        module.main()
    assert done.value.code == 0 and "usage" in capsys.readouterr().out.lower()


def test_the_zoom_bench_scores_every_representation_and_renders_its_table():
    """bench.zoom's scoring on a tiny separable problem (full | zoom halves), and its BENCHMARKS table."""
    import numpy as np

    from bench.zoom import REPS, representations, score, split, zoom_section

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 30)
    X = np.hstack([np.eye(3)[y] * 3 + rng.normal(size=(90, 3)), rng.normal(size=(90, 3))]).astype(np.float32)
    splits = np.where(np.arange(90) % 3 == 0, "test", "train")
    assert set(representations(X)) == set(REPS[:3]) and representations(X)["full+zoom concat"].shape == (90, 6)
    tr, te = split(y, splits, 1)
    assert len(te) == 30 and not set(tr) & set(te)
    got = score(X, y, *split(y, splits, 0))
    assert set(got) == set(REPS) and got["full"] > 0.9 and 0 <= got["zoom"] <= 1
    gains = {k: {"mean": 0.0, "std": 0.0} for k in REPS[1:]}
    pace = {"cost_ratio": 2.0, "plain_images_per_s": 10.0, "zoom_images_per_s": 5.0}
    row = {"dataset": "d", "backbone": "b", "mean": got, "gain_points": gains, "inference": pace}
    table = zoom_section({"d/b": row})
    assert any(line.startswith("| d | b |") and "2.00x" in line for line in table)
