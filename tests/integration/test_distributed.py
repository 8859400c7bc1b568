"""DDP through torchrun: 2 processes, gloo backend on the CPU, against one process on the same data."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def data(train_data):
    return train_data


def _args(data, out):
    return [
        "-m",
        "finegrain",
        "train",
        data,
        "--out",
        str(out),
        "--no-progress",
        "--regime",
        "last:1",
        "image_size=64",
        "epochs=3",
        "batch_size=4",
        "workers=0",
        "lr=0.05",
        "val_fraction=0.25",
    ]


def test_torchrun_two_processes_gloo_matches_one_process(data, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *_args(data, tmp_path / "one")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            *_args(data, tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("best epoch") == 1  # rank 0 alone reports and writes
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    cfg = (tmp_path / "two" / "config.yaml").read_text()
    assert "world_size: 2" in cfg
    assert m2["test"]["n"] == m1["test"]["n"] == 12  # metrics reduced over both ranks' shards, nothing counted twice
    assert m2["test"]["top1"] >= 0.75 and abs(m2["test"]["top1"] - m1["test"]["top1"]) <= 0.25
