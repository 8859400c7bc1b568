"""Same inputs through an older commit and this one: do the inference paths give the same numbers?

A refactor must not move a measured number. This runs one script under both trees on this machine (same kernels)
and compares: extraction (256 px, crop 1.0, flip, GAP + GeM) of 96 cub100 test images; prediction with a small
model trained once by the old tree (plain, TTA flip+5crop at 224 and 256, `Predictor.predict_proba`); FixRes.

    python -m bench.parity --old 0f010d1      # about 2 minutes
    python -m bench.parity --old 2845074 --fit-only   # fit's choice, leaderboard and model on the bundled sample

Also `fit` on the bundled sample under both trees with a clock that never moves (the choice then depends on the data
and the code only): the chosen candidate, every leaderboard score and the saved model's predictions must not move.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from bench.common import ROOT, command_line, record, require_dataset

MEASURE = r"""
import csv, glob, os, sys
import numpy as np
import finegrain
from finegrain.backbones import create_backbone
from finegrain.data import load_image_set
from finegrain.embed import extract_to_store
from finegrain.evaluate.inference import predict_paths
from finegrain.evaluate.tta import TTA
from finegrain.evaluate.fixres import fix_resolution
out, model_dir, cub = sys.argv[1], sys.argv[2], sys.argv[3]
imgs = sorted(glob.glob(os.path.join(cub, "test", "*", "*.jpg")))[:96]
with open(os.path.join(out, "m.csv"), "w", newline="") as f:
    w = csv.writer(f); w.writerow(["path", "label"]); w.writerows([p, p.split(os.sep)[-2]] for p in imgs)
bb = create_backbone("efficientnet_lite0")
bb.preprocess = bb.preprocess.with_geometry(256, 1.0)
r = extract_to_store(load_image_set(os.path.join(out, "m.csv")), bb, os.path.join(out, "store"),
                     poolings=("gap", "gem"), flip=True, progress=False)
rows = np.array([e.row for e in r.store.index()])
res = {f"extract_{p}": np.asarray(r.store.features(p))[rows] for p in ("gap", "gem")}
pred = finegrain.load(model_dir, runtime="torch")  # the same engine under both trees
res["predict_plain"] = predict_paths(pred, imgs[:48]).proba
res["predict_tta"] = predict_paths(pred, imgs[:48], tta=TTA.parse("flip+5crop", "224,256")).proba
res["predict_proba"] = pred.predict_proba(imgs[:8])
labels = np.arange(48) % len(pred.classes)
fixed = fix_resolution(pred, imgs[48:], labels, 256, head_epochs=2, max_images=40)
res["fixres_predict"] = predict_paths(fixed, imgs[:48]).proba
np.savez(os.path.join(out, "out.npz"), **res)
"""


# fit on the bundled sample with a clock that never moves (the budget never binds, so the choice depends on the
# data and the code only, not on this machine's speed), frozen candidates of one backbone; then its saved model
FIT = r"""
import json, os, sys
import numpy as np
import finegrain
from finegrain.recipe import FitConfig, fit
from finegrain.recipe.fit import Clock
out, sample = sys.argv[1], sys.argv[2]
cfg = FitConfig(data=sample, out=os.path.join(out, "fit"), budget_min=10, finetune=False, workers=0,
                backbones="efficientnet_lite0", runtime="torch", bootstrap=50)
r = fit(cfg, progress=False, clock=Clock(10, now=lambda: 0.0))
test = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(sample, "test")) for f in fs)
proba = finegrain.load(os.path.join(out, "fit", "model"), runtime="torch").predict_proba(test)
board = {c.name: [c.val_top1, c.oof_top1] for c in r.leaderboard}
json.dump({"chosen": r.chosen.name, "board": board, "test_top1": r.test["metrics"]["top1"]},
          open(os.path.join(out, "fit.json"), "w"))
np.savez(os.path.join(out, "fit.npz"), fit_predict=proba)
"""


def _fit(src: str, out: str, sample: str) -> tuple[dict, np.ndarray]:
    subprocess.run([sys.executable, "-c", FIT, out, sample], check=True, env={**os.environ, "PYTHONPATH": src})
    with open(os.path.join(out, "fit.json"), encoding="utf-8") as f, np.load(os.path.join(out, "fit.npz")) as z:
        return json.load(f), z["fit_predict"]


def _run(src: str, out: str, model_dir: str, cub: str, env_extra: dict | None = None) -> dict[str, np.ndarray]:
    env = {**os.environ, "PYTHONPATH": src, **(env_extra or {})}
    subprocess.run([sys.executable, "-c", MEASURE, out, model_dir, cub], check=True, env=env)
    with np.load(os.path.join(out, "out.npz")) as z:
        return {k: z[k] for k in z.files}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="the commit to compare with (e.g. the one before a refactor)")
    ap.add_argument("--fit-only", action="store_true", help="only fit's choice and its model's predictions")
    args = ap.parse_args()
    cub = require_dataset("cub100")
    with tempfile.TemporaryDirectory() as tmp:
        old = os.path.join(tmp, "old")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "-q", "--detach", old, args.old], check=True)
        try:
            env = {**os.environ, "PYTHONPATH": os.path.join(old, "src")}
            run, sample = os.path.join(tmp, "run"), os.path.join(ROOT, "src", "finegrain", "_demo", "birds10")
            subprocess.run(
                [sys.executable, "-m", "finegrain", "train", sample, "--out", run,
                 "regime=last:1", "epochs=1", "workers=0", "--no-progress"], check=True, env=env, cwd=tmp,
            ) if not args.fit_only else None  # fmt: skip
            outs, fits = {}, {}
            for name, src in (("old", os.path.join(old, "src")), ("new", os.path.join(ROOT, "src"))):
                os.makedirs(os.path.join(tmp, f"out-{name}"))
                fits[name], proba = _fit(src, os.path.join(tmp, f"out-{name}"), sample)
                outs[name] = {"fit_predict": proba}
                if not args.fit_only:
                    outs[name] |= _run(src, os.path.join(tmp, f"out-{name}"), os.path.join(run, "model"), cub)
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", old], check=False)
    rows = {}
    for k, a in outs["old"].items():
        b = outs["new"][k]
        rows[k] = {"max_abs_diff": float(np.abs(a - b).max()), "bitwise_equal": bool(np.array_equal(a, b))}
        if k.startswith(("predict", "fixres")):
            rows[k]["top1_agreement"] = float(np.mean(a.argmax(1) == b.argmax(1)))
        print(k, rows[k])
    same = {k: fits["old"][k] == fits["new"][k] for k in ("chosen", "test_top1")}
    old_board, new_board = fits["old"]["board"], fits["new"]["board"]
    common = sorted(set(old_board) & set(new_board))
    same["board"] = all(old_board[n] == new_board[n] for n in common)  # every candidate both trees scored
    only = {"old": sorted(set(old_board) - set(new_board)), "new": sorted(set(new_board) - set(old_board))}
    print("fit", fits["new"]["chosen"], same, f"{len(common)} candidates in both; only in one: {only}")
    doc = {"rows": rows, "precision": "auto", "images": 96, "command": command_line()}
    fit = {"chosen": fits["new"]["chosen"], "unchanged": same, "common": len(common), "only": only}
    record("parity.json", f"vs {args.old}", {**doc, "fit": fit})


if __name__ == "__main__":
    main()
