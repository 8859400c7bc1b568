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
