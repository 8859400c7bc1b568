"""The streaming probe under a process group (gloo, 2 ranks): each rank reads its share, DDP keeps them equal."""

from __future__ import annotations

import numpy as np

from finegrain.heads.stream_probe import StreamingProbe
from tests.unit.test_stream_probe import memmap  # noqa: F401, F811 - the same fixture: 3,000 rows on disk


def _ddp_rank(rank: int, port: int, path: str, out: str) -> None:
    import os

    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        X = np.memmap(path, dtype=np.float32, mode="r").reshape(-1, 16)
        y = np.load(path + ".y.npy")
        probe = StreamingProbe(Cs=(1.0,), chunk_rows=300, batch_size=50, epochs=3).fit(X, y)
        np.save(f"{out}-{rank}.npy", probe.coef_)
        dist.barrier()  # both ranks past their last collective before teardown (as train/distributed.py does)
    finally:
        dist.destroy_process_group()
    # Results are on disk; skip the interpreter's teardown, where gloo's threads intermittently abort the rank
    # ("terminate called without an active exception": 1 clean-clone run in about 20 since the barrier; 0 of 40 runs
    # of this worker alone). What this test checks (equal ranks, one model) is decided before this line.
    os._exit(0)


def test_ddp_two_ranks_train_one_model(memmap, tmp_path):  # noqa: F811 - the imported fixture
    """Under a process group (torchrun), each rank reads its share of the chunks and DDP keeps the ranks equal."""
    import socket

    import torch.multiprocessing as mp

    X, y, Xt = memmap
    np.save(str(X.filename) + ".y.npy", y)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "coef")
    mp.start_processes(_ddp_rank, args=(port, str(X.filename), out), nprocs=2, join=True, start_method="spawn")
    a, b = np.load(out + "-0.npy"), np.load(out + "-1.npy")
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    single = StreamingProbe(Cs=(1.0,), chunk_rows=300, batch_size=50, epochs=3).fit(X, y)
    pred = np.argmax(Xt @ a.T, axis=1)  # the intercept hardly matters for this check
    assert (single.classes_[pred] == single.predict(Xt)).mean() > 0.85
