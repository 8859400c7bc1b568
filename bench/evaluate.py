"""Test-time gains on cub100 (issue: evaluation, TTA, ensembles, FixRes), each with its inference cost.

tta     one model: plain, flip, 5-crop, 10-crop, multi-scale, and a 3-model ensemble; top-1 / mean per-class with
        bootstrap intervals, seconds and the cost ratio to the plain pass, all measured in one run
fixres  the test-resolution sweep 224 -> 256 -> 288 -> 320, as is and after `finegrain fixres` (BatchNorm statistics
        re-estimated on train images at that size, then the classifier fine-tuned on their pooled features)

  python -m bench.evaluate tta --model bench/cache/ft-last2 --ensemble bench/cache/ft-last1,bench/cache/ft-head
  python -m bench.evaluate fixres --model bench/cache/ft-last2
"""

from __future__ import annotations

import argparse
import json
import os
import time

from bench.common import record, require_dataset


def _score(pred, labels, classes, cost_base=None) -> dict:
    from finegrain.evaluate.summary import summarize

    s = summarize(pred.proba, labels[pred.index], classes, n_boot=1000, seed=0)
    out = {
        "top1": round(s["metrics"]["top1"], 4),
        "top1_ci95": [round(v, 4) for v in s["intervals"]["top1"]],
        "mean_per_class": round(s["metrics"]["mean_per_class"], 4),
        "ece": round(s["metrics"]["ece"], 4),
        "views": pred.views,
        "models": pred.models,
        "seconds": round(pred.seconds, 1),
    }
    if cost_base:
        out["cost_ratio"] = round(pred.seconds / cost_base, 2)
    return out


def tta(args) -> None:
    import finegrain
    from finegrain.evaluate.evaluation import samples_for_model
    from finegrain.evaluate.inference import predict_paths
    from finegrain.evaluate.tta import TTA

    data = require_dataset("cub100")
    model = finegrain.load(args.model)
    paths, labels, _ = samples_for_model(data, "test", model.classes)
    variants = {  # id: (label, TTA)
        "plain": ("plain", TTA()),
        "flip": ("flip", TTA(flip=True)),
        "5crop": ("5crop", TTA(crops=5)),
        "10crop": ("10crop (5crop+flip)", TTA(crops=10)),
        "ms": ("multi-scale 224,288", TTA(sizes=(224, 288))),
        "flip+ms": ("flip + multi-scale 224,288", TTA(flip=True, sizes=(224, 288))),
    }
    results, base = {}, None
    for vid, (name, t) in variants.items():
        if args.only and vid not in args.only.split(","):
            continue
        pred = predict_paths(model, paths, tta=t)
        base = base or pred.seconds
        results[name] = _score(pred, labels, model.classes, base)
        print(name, results[name], flush=True)
    members = [args.model] + [m for m in (args.ensemble or "").split(",") if m]
    if len(members) > 1:
        singles = {}
        if args.member_scores:
            for m in members[1:]:
                pred = predict_paths(finegrain.load(m), paths)
                singles[m] = _score(pred, labels, model.classes, base)
                print(m, singles[m], flush=True)
        else:  # each member's own plain test score, measured at the end of its training run
            for m in members[1:]:
                t = json.load(open(os.path.join(m, "metrics.json")))["test"]
                singles[m] = {"top1": round(t["top1"], 4), "mean_per_class": round(t["mean_per_class"], 4)}
        pred = predict_paths([finegrain.load(m) for m in members], paths)
        results[f"ensemble of {len(members)}"] = {**_score(pred, labels, model.classes, base), "members": members}
        results[f"ensemble of {len(members)}"]["member_scores"] = singles
        print("ensemble", results[f"ensemble of {len(members)}"], flush=True)
    record(
        "evaluate.json",
        "tta",
        {
            "model": args.model,
            "model_meta": {k: model.meta.get(k) for k in ("backbone", "regime", "best_epoch", "preprocess")},
            "test_images": len(paths),
            "variants": results,
            "note": "cost_ratio: seconds of the variant / seconds of the plain pass, same run (decoding included)",
        },
    )


def fixres(args) -> None:
    import finegrain
    from finegrain.evaluate.evaluation import samples_for_model
    from finegrain.evaluate.fixres import fix_resolution
    from finegrain.evaluate.inference import predict_paths

    data = require_dataset("cub100")
    model = finegrain.load(args.model)
    test_paths, test_labels, _ = samples_for_model(data, "test", model.classes)
    train_paths, train_labels, _ = samples_for_model(data, "train", model.classes)
    rows = {}
    for size in [int(s) for s in args.sizes.split(",")]:
        row = {}
        as_is = model if size == model.preprocess.input_size else _resized(model, size)
        row["as_is"] = _score(predict_paths(as_is, test_paths), test_labels, model.classes)
        t0 = time.perf_counter()
        fixed = fix_resolution(
            model,
            train_paths,
            train_labels,
            size,
            head_epochs=args.head_epochs,
            max_images=args.fix_images,
            bn_layers=args.bn_layers,
        )
        row["fix_seconds"] = round(time.perf_counter() - t0, 1)
        row["fixed"] = _score(predict_paths(fixed, test_paths), test_labels, model.classes)
        row["gain"] = round(row["fixed"]["top1"] - row["as_is"]["top1"], 4)
        rows[str(size)] = row
        print(size, row, flush=True)
    record(
        "evaluate.json",
        "fixres",
        {
            "model": args.model,
            "train_size": model.preprocess.input_size,
            "sizes": rows,
            "head_epochs": args.head_epochs,
            "fix_images": args.fix_images,
            "bn_layers": args.bn_layers,
        },
    )


def _resized(predictor, size):
    import copy

    from finegrain.evaluate.predictor import Predictor

    m = copy.deepcopy(predictor.model)
    m.backbone.preprocess = predictor.preprocess.with_size(size)
    return Predictor(m, predictor.spec.replace(preprocess=m.backbone.preprocess))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("tta")
    p.add_argument("--model", required=True)
    p.add_argument("--ensemble", help="comma list of other run folders averaged with --model")
    p.add_argument("--only", help="comma list of variants: plain, flip, 5crop, 10crop, ms, flip+ms")
    p.add_argument("--member-scores", action="store_true", help="re-measure each ensemble member alone")
    p = sub.add_parser("fixres")
    p.add_argument("--model", required=True)
    p.add_argument("--sizes", default="224,256,288,320")
    p.add_argument("--head-epochs", type=int, default=5)
    p.add_argument("--fix-images", type=int, default=1000, help="train images for BatchNorm and the head")
    p.add_argument("--bn-layers", default="last", choices=["last", "all"])
    args = ap.parse_args()
    {"tta": tta, "fixres": fixres}[args.what](args)


if __name__ == "__main__":
    main()
