"""Shared by the benchmarks: where the data is, and how results are recorded (JSON, merged by key)."""

from __future__ import annotations

import json
import os
import platform
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))
RESULTS = os.path.join(ROOT, "bench", "results")


def require_dataset(name: str) -> str:
    path = os.path.join(SHARED_DATA, name)
    if not os.path.isdir(path):
        sys.exit(f"benchmark needs {path} (../shared/data/{name} beside the checkout); it is absent here")
    return path


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
    }


def command_line() -> str:
    """How this benchmark was started, as a command to run from the repository root."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    if script.startswith("bench") and script.endswith(".py"):
        script = "-m " + script[:-3].replace(os.sep, ".")
    return " ".join(["python", script, *sys.argv[1:]])


def record(file: str, key: str, value: dict, *, results: str = RESULTS) -> None:
    """Merge `value` under `key` in bench/results/<file> (other keys belong to other benchmarks); `results`: another
    folder (a test's)."""
    from finegrain.atomic import atomic_write_json

    os.makedirs(results, exist_ok=True)
    path = os.path.join(results, file)
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data[key] = {**value, "command": command_line(), "machine": machine()}
    atomic_write_json(path, data)
