"""The LP-FT probe (train/probe_init.py: L-BFGS on torch tensors, one global scale) against heads.LogisticProbe
(scikit-learn, per-feature standardization), each choosing its penalty on the same validation split (20% of train,
seed 0), on cub100 timm-eval GAP features (what the frozen network pools); test top-1 of each choice and seconds.

    python -m bench.lpft_probe      # needs the timm-eval store of `python -m bench.representations` in bench/cache
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from bench.common import ROOT, record
from finegrain.data.splits import stratified_split
from finegrain.embed import FeatureStore
from finegrain.heads.probe import DEFAULT_CS, LogisticProbe
from finegrain.train.probe_init import fit_linear_head


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    store = FeatureStore.open(os.path.join(ROOT, "bench", "cache", "cub100-lite0-timm-eval"))
    X, y, _ = store.split("train", "gap")
    Xt, yt, _ = store.split("test", "gap")
    tr, va = stratified_split(y, test_size=0.2, seed=0)
    t0 = time.perf_counter()
    val = (torch.as_tensor(X[va]), torch.as_tensor(y[va]))
    w, b, info = fit_linear_head(torch.as_tensor(X[tr]), torch.as_tensor(y[tr]), len(store.classes), val=val)
    lbfgs = float(((torch.as_tensor(Xt) @ w.T + b).argmax(1).numpy() == yt).mean())
    t_lbfgs = time.perf_counter() - t0
    t0, best = time.perf_counter(), None
    for C in DEFAULT_CS:
        probe = LogisticProbe(Cs=[C]).fit(X[tr], y[tr])
        acc = float((probe.predict(X[va]) == y[va]).mean())
        if best is None or acc > best[0]:
            best = (acc, C, probe)
    sk = float((best[2].predict(Xt) == yt).mean())
    t_sk = time.perf_counter() - t0
    row = {
        "lbfgs_global_scale": {"val_top1": info["val_top1"], "l2": info["l2"], "test_top1": lbfgs, "seconds": t_lbfgs},
        "logistic_probe": {"val_top1": best[0], "C": best[1], "test_top1": sk, "seconds": t_sk},
    }
    print(row)
    record("lpft_probe.json", "cub100-timm-eval-gap", row)


if __name__ == "__main__":
    main()
