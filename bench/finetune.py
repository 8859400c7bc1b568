"""Fine-tuning by regime on cub100 (issue: fine-tuning, measurements 1-3).

accuracy   test top-1 / mean per-class of head, last:1, last:2 and full under a wall-clock budget each
throughput one finegrain training step vs a plain timm + torch loop: same model, batch, precision, augmentation
cache      cached-trunk last:K (trunk once over V views, then V tail epochs) vs V ordinary last:K epochs
mixing     no mixing vs input mixup vs manifold mixup (cached trunk outputs mixed at the cut), same seed and epochs

  python -m bench.finetune accuracy --budget 10
  python -m bench.finetune throughput
  python -m bench.finetune cache
  python -m bench.finetune mixing --data rsscn7 --regime last:1 --epochs 8 --alpha 0.4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np
import torch

from bench.common import ROOT, command_line, record, require_dataset
from finegrain.config import TrainConfig, parse_overrides
from finegrain.data import ImageSet, load_image_set
from finegrain.train.engine import Trainer, train

# epochs chosen so that each regime's cosine schedule ends inside a 10-minute budget on this 2-core machine
REGIMES = {
    "head": dict(regime="head", cache_views=4, epochs=30, lr=0.1, drop_rate=0.2),
    "last:1": dict(regime="last:1", cache_views=4, epochs=12, lr=0.05, backbone_lr_scale=0.2),
    "last:2": dict(regime="last:2", cache_views=4, epochs=12, lr=0.05, backbone_lr_scale=0.2),
    "full": dict(regime="full", cache_views=0, epochs=2, lr=0.02, backbone_lr_scale=0.5),
}


def accuracy(args) -> None:
    data = require_dataset("cub100")
    for name, opts in REGIMES.items():
        if args.only and name not in args.only.split(","):
            continue
        label = name + (" (LP-FT)" if args.head_init == "probe" else "") + (f" ({args.name})" if args.name else "")
        suffix = ("-lpft" if args.head_init == "probe" else "") + (f"-{args.name}" if args.name else "")
        opts = {**opts, **({"epochs": args.epochs} if args.epochs else {})}
        opts = {**opts, **({"cache_views": args.cache_views} if args.cache_views is not None else {})}
        opts = {**opts, **({"head_init": args.head_init} if args.head_init else {})}
        opts = {**opts, **parse_overrides(args.set or [])}
        for seed in args.seeds or [None]:
            run_opts = opts if seed is None else {**opts, "seed": seed}
            tag = "" if seed is None else f"-s{seed}"
            out = os.path.join(ROOT, "bench", "cache", f"ft-{name.replace(':', '')}{suffix}{tag}")
            _record_regime(args, label, _run_regime(args, data, out, run_opts), opts, seed)


def _run_regime(args, data: str, out: str, opts: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(data=data, out=out, time_budget_min=args.budget, val_fraction=0.1, **opts)
    r = train(cfg, progress=False)
    extra = {}
    if args.tta:  # the saved model again on test, with test-time augmentation (outside the training budget)
        extra = _test_with_tta(out, data, args.tta)
    return {
        "test_top1": round(r.test_metrics["top1"], 4),
        "test_mean_per_class": round(r.test_metrics["mean_per_class"], 4),
        **extra,
        "command": command_line(),
        "val_top1": round(r.best_val_top1, 4),
        "epochs_run": len(r.history),
        "train_minutes": round(r.seconds / 60, 1),
        "config": opts,
        "curve": [
            {"epoch": h["epoch"], "minutes": round(h["seconds"] / 60, 2), "val_top1": round(h["val_top1"], 4)}
            for h in r.history
        ],
    }


def _record_regime(args, label: str, row: dict, opts: dict, seed: int | None) -> None:
    """Merge one run into finetune.json. With --seeds, the row keeps every seed's test top-1 (an earlier run with the
    same config and no seed is seed 0, TrainConfig's default) and its mean ± std over seeds."""
    key = f"accuracy_budget_{args.budget:g}min"
    earlier = _load_results().get(key, {}).get("regimes", {})  # other regimes of the same budget (--only runs)
    if seed is not None:
        old = earlier.get(label, {})
        per_seed = dict(old.get("per_seed", {}))
        if not per_seed and old.get("config") == opts:
            per_seed["0"] = _seed_row(old)
        per_seed[str(seed)] = _seed_row(row)
        top1 = np.array([v["test_top1"] for v in per_seed.values()])
        base = old if old.get("config") == opts else row
        row = {**base, "per_seed": per_seed, "test_top1_mean": round(float(top1.mean()), 4)}
        row["test_top1_std"] = round(float(top1.std(ddof=1)), 4) if len(top1) > 1 else 0.0
    print(label, {k: v for k, v in row.items() if k not in ("curve", "per_seed")}, flush=True)
    record("finetune.json", key, {"regimes": {**earlier, label: row}, "best_probe": _best_probe()})


def _seed_row(row: dict) -> dict:
    keep = ("test_top1", "test_mean_per_class", "test_top1_tta", "val_top1", "epochs_run", "train_minutes")
    return {k: row[k] for k in keep if k in row}


def _test_with_tta(run: str, data: str, tta: str) -> dict:
    import finegrain
    from finegrain.evaluate.evaluation import samples_for_model
    from finegrain.evaluate.inference import predict_paths
    from finegrain.evaluate.tta import TTA

    predictor = finegrain.load(run)
    paths, labels, _ = samples_for_model(data, "test", predictor.classes)
    pred = predict_paths(predictor, paths, tta=TTA.parse(tta))
    labels = labels[pred.index]
    top1 = float((pred.proba.argmax(1) == labels).mean())
    per_class = [float((pred.proba[labels == c].argmax(1) == c).mean()) for c in np.unique(labels)]
    return {
        "test_tta": tta,
        "test_top1_tta": round(top1, 4),
        "test_mean_per_class_tta": round(float(np.mean(per_class)), 4),
        "test_tta_minutes": round(pred.seconds / 60, 1),
    }


def _load_results() -> dict:
    path = os.path.join(ROOT, "bench", "results", "finetune.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _best_probe() -> dict | None:
    path = os.path.join(ROOT, "bench", "results", "representations.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("accuracy/summary", {}).get("best")


def _subset(n: int) -> ImageSet:
    full = load_image_set(require_dataset("cub100"))
    train_samples = full.split("train")
    step = max(1, len(train_samples) // n)
    return ImageSet(full.root, full.classes, train_samples[::step][:n])


def throughput(args) -> None:
    """Images/s of training steps; both sides decode JPEGs with DataLoader workers and augment with crop-flip."""
    import timm
    from torch.utils.data import DataLoader

    from finegrain.backbones.offline import load_offline_weights
    from finegrain.runtime import ImageFiles, collate_images
    from finegrain.train.augment import build_train_transform

    subset = _subset(args.images)
    tmp = tempfile.mkdtemp()
    bs = 32

    def finegrain_steps() -> float:
        out = os.path.join(tmp, f"fg-{time.time()}")
        cfg = TrainConfig(data="", out=out, regime="full", epochs=1, batch_size=bs, val_fraction=0.1)
        trainer = _trainer_on(cfg, subset)
        t0 = time.perf_counter()
        m = trainer.train_epoch(0)
        n = len(trainer.splits.train)
        return n / (time.perf_counter() - t0) if m else 0.0

    def plain_steps() -> float:
        model = timm.create_model("tf_efficientnet_lite0", num_classes=len(subset.classes))
        load_offline_weights("efficientnet_lite0", model)
        model = model.to(memory_format=torch.channels_last).train()
        from finegrain.backbones import Preprocess

        pp = Preprocess.from_timm(model)
        tf = build_train_transform("crop-flip", pp)
        samples = subset.samples[: int(len(subset.samples) * 0.9)]
        loader = DataLoader(
            ImageFiles([s.path for s in samples], tf, labels=[s.label for s in samples]),
            batch_size=bs,
            shuffle=True,
            num_workers=1,
            collate_fn=collate_images,
            prefetch_factor=4,
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
        t0 = time.perf_counter()
        for x, y, _, _ in loader:
            x = pp.normalize(x).contiguous(memory_format=torch.channels_last)
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return len(samples) / (time.perf_counter() - t0)

    rounds = []
    for r in range(args.rounds):
        row = {"finegrain": finegrain_steps(), "plain": plain_steps()}
        rounds.append(row)
        print(f"round {r}: finegrain {row['finegrain']:.1f} img/s, plain {row['plain']:.1f} img/s", flush=True)
    best = {k: max(r[k] for r in rounds) for k in ("finegrain", "plain")}
    shutil.rmtree(tmp, ignore_errors=True)
    record(
        "finetune.json",
        "training_throughput",
        {
            "images": len(subset.samples),
            "batch_size": bs,
            "precision": "fp32",
            "channels_last": True,
            "augment": "crop-flip",
            "regime": "full",
            "images_per_second": {k: round(v, 1) for k, v in best.items()},
            "ratio_finegrain_vs_plain": round(best["finegrain"] / best["plain"], 3),
            "rounds": rounds,
        },
    )
    print(best, "ratio", best["finegrain"] / best["plain"])


def _trainer_on(cfg: TrainConfig, subset: ImageSet) -> Trainer:
    return Trainer(cfg, progress=False, image_set=subset).setup()


def cache(args) -> None:
    """Same regime, epochs and augmentation: E ordinary epochs vs one trunk pass per view (V) + E tail-only epochs."""
    subset = _subset(args.images)
    tmp = tempfile.mkdtemp()
    v, epochs = args.views, args.epochs
    res = {}
    for cached in (False, True):
        cfg = TrainConfig(
            data="",
            out=os.path.join(tmp, str(cached)),
            regime=args.regime,
            epochs=epochs,
            batch_size=32,
            cache_views=v if cached else 0,
            val_fraction=0.1,
        )
        trainer = _trainer_on(cfg, subset)
        t0 = time.perf_counter()
        if cached:
            trainer.build_caches()
        for e in range(epochs):
            trainer.train_epoch(e)
        res["cached" if cached else "uncached"] = time.perf_counter() - t0
        print(res, flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    record(
        "finetune.json",
        f"cache_speedup_{args.regime.replace(':', '')}",
        {
            "regime": args.regime,
            "views": v,
            "epochs": epochs,
            "train_images": int(len(subset.samples) * 0.9),
            "seconds": {k: round(x, 1) for k, x in res.items()},
            "speedup": round(res["uncached"] / res["cached"], 2),
        },
    )


def mixing(args) -> None:
    """One run each, same seed, epochs and schedule: no mixing and manifold mixup on the cached trunk (cache_views
    views), input mixup on images (it cannot use the cache, so it also sees a fresh augmentation every epoch)."""
    data = require_dataset(args.data)
    base = dict(regime=args.regime, epochs=args.epochs, lr=0.05, backbone_lr_scale=0.2, val_fraction=0.1, seed=0)
    variants = {
        "none": dict(cache_views=args.cache_views),
        f"manifold_mixup={args.alpha:g}": dict(cache_views=args.cache_views, manifold_mixup=args.alpha),
        f"mixup={args.alpha:g}": dict(cache_views=0, mixup=args.alpha),
    }
    key = f"mixing_{args.data}_{args.regime.replace(':', '')}_{args.epochs}ep"
    rows = {}
    for name, opts in variants.items():
        out = os.path.join(ROOT, "bench", "cache", f"mix-{args.data}-{name.replace('=', '')}")
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        r = train(TrainConfig(data=data, out=out, **base, **opts), progress=False)
        rows[name] = {
            "test_top1": round(r.test_metrics["top1"], 4),
            "test_mean_per_class": round(r.test_metrics["mean_per_class"], 4),
            "val_top1": round(r.best_val_top1, 4),
            "minutes": round((time.perf_counter() - t0) / 60, 2),
            "config": {**base, **opts},
        }
        print(name, rows[name], flush=True)
        record("finetune.json", key, {"dataset": args.data, "backbone": "efficientnet_lite0", "variants": rows})


def tta(args) -> None:
    """Add the TTA test score of an already trained run (bench/cache/ft-*) to its entry in finetune.json."""
    key = f"accuracy_budget_{args.budget:g}min"
    results = _load_results()
    entry = results.get(key, {}).get("regimes", {}).get(args.label)
    if entry is None:
        raise SystemExit(f"no regime {args.label!r} under {key} in bench/results/finetune.json")
    extra = _test_with_tta(args.run, require_dataset("cub100"), args.tta)
    print(args.label, extra, flush=True)
    entry.update(extra, tta_command=command_line())
    # written in place: record() would stamp this command on the whole budget entry
    from finegrain.atomic import atomic_write_json

    atomic_write_json(os.path.join(ROOT, "bench", "results", "finetune.json"), results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("accuracy")
    p.add_argument("--budget", type=float, default=10.0, help="minutes per regime")
    p.add_argument("--only", help="comma list of regimes")
    p.add_argument("--epochs", type=int, help="planned epochs for every regime (the budget may plan fewer)")
    p.add_argument("--cache-views", type=int, help="augmented views the cached trunk runs over (head, last:K)")
    p.add_argument("--head-init", choices=["msra", "probe"], help="probe: LP-FT, the head starts as a linear probe")
    p.add_argument("--set", nargs="*", help="more training options as key=value (e.g. image_size=256 crop_pct=1.0)")
    p.add_argument("--name", help="label of a variant (with --set): the run is kept as bench/cache/ft-REGIME-NAME")
    p.add_argument("--tta", help="also evaluate the saved model on test with this TTA (e.g. flip)")
    p.add_argument("--seeds", type=int, nargs="*", help="run each regime once per seed (mean ± std in finetune.json)")
    p = sub.add_parser("throughput")
    p.add_argument("--images", type=int, default=320)
    p.add_argument("--rounds", type=int, default=2)
    p = sub.add_parser("tta", help="test-time augmentation score of a trained run, added to its entry")
    p.add_argument("--run", required=True, help="run folder, e.g. bench/cache/ft-last2")
    p.add_argument("--budget", type=float, required=True)
    p.add_argument("--label", required=True, help="regime label in finetune.json, e.g. last:2")
    p.add_argument("--tta", default="flip")
    p = sub.add_parser("cache")
    p.add_argument("--images", type=int, default=320)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--regime", default="last:2")
    p = sub.add_parser("mixing", help="no mixing vs input mixup vs manifold mixup, one run each")
    p.add_argument("--data", default="rsscn7", help="a folder under ../shared/data")
    p.add_argument("--regime", default="last:1")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--cache-views", type=int, default=4)
    p.add_argument("--alpha", type=float, default=0.4, help="Beta(α, α) of both mixings")
    args = ap.parse_args()
    {"accuracy": accuracy, "throughput": throughput, "cache": cache, "tta": tta, "mixing": mixing}[args.what](args)


if __name__ == "__main__":
    main()
