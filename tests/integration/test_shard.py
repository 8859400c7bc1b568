"""Sharded extraction (embed/shard.py): 2 gloo ranks give exactly the store of one process; a killed rank resumes;
a damaged shard is refused in one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch.multiprocessing as mp

from finegrain.data import load_image_set
from finegrain.embed import FeatureStore, extract_to_store
from finegrain.embed.shard import extract_sharded, merge_shards, shard_bounds, shard_dir
from finegrain.errors import FinegrainError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPTS = {"poolings": ("gap", "gem"), "batch_size": 4, "num_workers": 0, "precision": "fp32", "runtime": "torch"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, data: str, out: str) -> None:
    """One torchrun-like rank: the environment torchrun sets, then the library call the CLI makes."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    import torch

    torch.set_num_threads(1)
    from finegrain.train.distributed import DistContext

    dist = DistContext.from_env("cpu")
    try:
        backbone = _backbone()
        extract_sharded(load_image_set(data), backbone, out, dist=dist, progress=False, **OPTS)
    finally:
        dist.close()


def _run_two_ranks(data: str, out: str) -> None:
    mp.start_processes(_rank, args=(2, _free_port(), data, out), nprocs=2, join=True, start_method="spawn")


def _backbone():
    """The tiny timm EfficientNet with the same random weights in every process."""
    import torch

    from finegrain.backbones import create_backbone

    torch.manual_seed(0)
    return create_backbone("test_efficientnet", pretrained=False)


@pytest.fixture(scope="module")
def single(tmp_path_factory, train_data):
    """The store one process writes: the reference."""
    out = str(tmp_path_factory.mktemp("single") / "store")
    extract_to_store(load_image_set(train_data), _backbone(), out, progress=False, **OPTS)
    return out


def _same_store(a: str, b: str) -> None:
    sa, sb = FeatureStore.open(a), FeatureStore.open(b)
    ia, ib = sa.index(), sb.index()
    assert [(e.path, e.label, e.split, e.row, e.sha1) for e in ia] == [
        (e.path, e.label, e.split, e.row, e.sha1) for e in ib
    ]
    for pool in ("gap", "gem"):
        fa, fb = np.asarray(sa.features(pool)), np.asarray(sb.features(pool))
        assert fa.shape == fb.shape
        np.testing.assert_allclose(fa, fb, rtol=1e-5, atol=1e-6)


def test_shard_bounds_cover_the_list_once():
    for n in (0, 1, 5, 36):
        for world in (1, 2, 3, 8):
            parts = [shard_bounds(n, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    with pytest.raises(ValueError):
        shard_bounds(3, 2, 2)


def test_two_gloo_ranks_write_the_store_of_one_process(single, train_data, tmp_path):
    out = str(tmp_path / "two")
    _run_two_ranks(train_data, out)
    _same_store(single, out)
    assert not os.path.exists(os.path.join(out, "shards"))  # merged, then removed


def test_killed_rank_resumes_its_shard(single, train_data, tmp_path, monkeypatch):
    """Rank 1 dies after its first batch (rows journaled, a torn half-row after them); the rerun reuses them."""
    out = str(tmp_path / "killed")
    image_set = load_image_set(train_data)
    start, stop = shard_bounds(len(image_set.samples), 1, 2)
    part = image_set.__class__(image_set.root, image_set.classes, image_set.samples[start:stop])
    store_cls = FeatureStore
    calls = {"n": 0}
    real_append = store_cls.append

    def dying_append(self, features, sha1s):
        calls["n"] += 1
        if calls["n"] == 2:
            with open(self._feature_path("gap"), "ab") as f:
                f.write(b"\0" * 100)  # bytes past the journal, as a kill mid-write leaves them
            raise KeyboardInterrupt
        return real_append(self, features, sha1s)

    monkeypatch.setattr(store_cls, "append", dying_append)
    with pytest.raises(KeyboardInterrupt):
        extract_to_store(part, _backbone(), shard_dir(out, 1, 2), progress=False, **OPTS)
    monkeypatch.undo()
    kept = FeatureStore(shard_dir(out, 1, 2), {"dim": 1, "poolings": []}).journal()
    assert len(kept) == OPTS["batch_size"]
    _run_two_ranks(train_data, out)
    _same_store(single, out)


def test_damaged_shard_is_refused_in_one_line(single, train_data, tmp_path):
    image_set = load_image_set(train_data)
    out = str(tmp_path / "damaged")
    for rank in range(2):
        a, b = shard_bounds(len(image_set.samples), rank, 2)
        part = image_set.__class__(image_set.root, image_set.classes, image_set.samples[a:b])
        store = extract_to_store(part, _backbone(), shard_dir(out, rank, 2), progress=False, **OPTS).store
        with open(os.path.join(shard_dir(out, rank, 2), "hashes.csv"), "w") as f:
            f.write("path,sha1\n" + "".join(f"{e.path},{e.sha1}\n" for e in store.index()))
    feats = os.path.join(shard_dir(out, 1, 2), "features-gem.f32")
    os.truncate(feats, os.path.getsize(feats) - 4)
    with pytest.raises(FinegrainError) as err:
        merge_shards(out, image_set, world_size=2)
    msg = str(err.value)
    assert "\n" not in msg and "00001-of-00002" in msg and "re-run" in msg
    with pytest.raises(FinegrainError, match="00000-of-00003"):
        merge_shards(out, image_set, world_size=3)  # shards of another world size: not there


def test_torchrun_cli_extract_two_processes(single, train_data, tmp_path):
    """The real command: torchrun --nproc_per_node=2 -m finegrain extract; then a plain rerun reuses everything."""
    out = str(tmp_path / "cli")
    ckpt = str(tmp_path / "tiny.pth")
    import torch

    torch.save(_backbone().model.state_dict(), ckpt)
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "OMP_NUM_THREADS": "1"}
    args = ["-m", "finegrain", "extract", train_data, "--out", out, "--backbone", "test_efficientnet"]
    args += ["--checkpoint", ckpt, "--pooling", "gap,gem", "--precision", "fp32", "--batch-size", "4", "--workers", "0"]
    args += ["--runtime", "torch", "--no-progress"]
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    two = subprocess.run(run, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("extracted") == 1  # rank 0 alone reports
    _same_store(single, out)
    again = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and " 0 extracted" in again.stdout, again.stdout + again.stderr[-2000:]
