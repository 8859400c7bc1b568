"""Long-tailed recognition benchmarks (issue: long tail).

cub    cub100 made long-tailed (ρ = 10, 30 → 3 images a class) on frozen `efficientnet_lite0` representations
       (the recommended extraction of bench/representations.py, in bf16 and in fp32): CE probe vs cRT, τ-norm, LWS,
       post-hoc logit adjustment, NCM, over 5 long-tailed subsets (seeds). Every hyperparameter (C, τ, cRT's weight
       decay) is chosen by finegrain.heads.longtail on one balanced validation split (5 images a class from the
       training images the long-tailed subset left out), never on test; test = the balanced cub100 test split.
cifar  CIFAR-10-LT (ρ = 100, 12,406 training images; test = the balanced 10,000) from ../shared/data/cifar10, a
       scaled reproduction of Cao et al. (NeurIPS 2019) Table 2: ResNet-32 from scratch, SGD lr 0.1, momentum 0.9,
       weight decay 2e-4, batch 128, 5 warm-up epochs, pad-crop-flip, E epochs (DRW at 0.8 E). Methods: CE,
       class-balanced focal, LDAM-DRW; on the CE model, post-hoc logit adjustment (τ = 1, the theory's value: nothing
       is tuned on test), τ-normalisation (τ = 1) and cRT (class-balanced re-training on the frozen CE features).

  python -m bench.longtail cub
  python -m bench.longtail cifar --epochs 20     # about 85 minutes on 2 cores (1.3 min an epoch a method)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from bench.common import RESULTS, ROOT, record, require_dataset
from finegrain.data import Sample
from finegrain.embed import FeatureStore, create_normalizer
from finegrain.heads.decoupled import LinearHead

STORE = os.path.join(ROOT, "bench", "cache", "cub100-lite0-finegrain")


def _shots(y_true, y_pred, counts, many, few, missing=float("nan")) -> dict:
    """{"many", "medium", "few"}: shot-group accuracies rounded to 4 decimals, `missing` for an empty group."""
    from finegrain.evaluate.longtail import shot_accuracy
    from finegrain.evaluate.metrics import per_class_accuracy

    shots = shot_accuracy(per_class_accuracy(y_true, y_pred, len(counts)), counts, many=many, few=few)
    return {k.removesuffix("_shot"): missing if v is None else round(v, 4) for k, v in shots.items()}


def cub(args) -> None:
    """cub100-LT over `--seeds` long-tailed subsets and both feature precisions; mean ± std and per-seed values."""
    require_dataset("cub100")
    stores = {"bf16": STORE, "fp32": fp32_store()}
    runs = {
        prec: [_cub_one(FeatureStore.open(path), args, seed) for seed in range(args.seeds)]
        for prec, path in stores.items()
    }
    summary = {prec: _summarise(rows) for prec, rows in runs.items()}
    best = max(summary["fp32"]["gain_over_ce_points"].items(), key=lambda kv: kv[1]["mean"])
    record(
        "longtail.json",
        "cub100_lt",
        {
            "imbalance_ratio": args.rho,
            "seeds": list(range(args.seeds)),
            "shot_thresholds": {"many": f"> {args.many}", "few": f"< {args.few}"},
            "val_per_class": args.val_per_class,
            "selection": SELECTION,
            "features": "efficientnet_lite0, GeM, 256 px full frame, flip-averaged, L2",
            "precisions": {prec: FeatureStore.open(p).meta.get("precision") for prec, p in stores.items()},
            "summary": summary,
            "per_seed": runs,
        },
    )
    record(
        "longtail.json",
        "headline",
        {
            "cub100_lt_best_gain_mean_points": best[1]["mean"],
            "cub100_lt_best_gain_std_points": best[1]["std"],
            "cub100_lt_best_gain_method": best[0],
            "seeds": args.seeds,
            "precision": "fp32",
            "bf16_same_gain_mean_points": summary["bf16"]["gain_over_ce_points"][best[0]]["mean"],
            "bf16_same_gain_std_points": summary["bf16"]["gain_over_ce_points"][best[0]]["std"],
            "command": "python -m bench.longtail cub",
        },
    )


SELECTION = (
    "every hyperparameter (the CE probe's C, τ of τ-norm and logit adjustment, cRT's weight decay) is chosen by "
    "finegrain.heads.longtail.fit_long_tail_heads: balanced accuracy on the same class-balanced validation split "
    "(up to 5 images a class from the training images the long-tailed subset left out; the few largest classes "
    "have fewer or none, all their images being in the subset), never on test"
)


def fp32_store() -> str:
    """The recommended extraction in fp32 (ONNX Runtime computes fp32), cached beside the bf16 one."""
    from finegrain.backbones import Preprocess, create_backbone
    from finegrain.data import load_image_set
    from finegrain.embed import extract_to_store

    out = STORE + "-fp32"
    backbone = create_backbone("efficientnet_lite0")
    pp = backbone.preprocess.to_dict()
    backbone.preprocess = Preprocess.from_dict({**pp, "input_size": 256, "crop_pct": 1.0})
    data = load_image_set(require_dataset("cub100"))
    extract_to_store(data, backbone, out, poolings=("gap", "gem"), flip=True, precision="fp32", runtime="onnx")
    return out


def _cub_one(store, args, seed: int) -> dict:
    """One long-tailed subset (seed): {method: scores + chosen hyperparameter}."""
    from finegrain.data.longtail import make_longtailed
    from finegrain.heads.longtail import fit_long_tail_heads

    entries = store.index()
    feats = store.features("gem")
    train = [e for e in entries if e.split == "train"]
    lt = make_longtailed(
        [Sample(e.path, e.label, "train") for e in train], imbalance_ratio=args.rho, seed=seed, n_max=30
    )
    chosen = {s.path for s in lt}
    rng = np.random.default_rng(seed)
    val_rows = []
    for c in range(len(store.classes)):
        rest = [e.row for e in train if e.label == c and e.path not in chosen]
        val_rows += rng.permutation(rest)[: args.val_per_class].tolist()
    tr_rows = [e.row for e in train if e.path in chosen]
    ytr = np.array([e.label for e in train if e.path in chosen])
    label_of_row = {e.row: e.label for e in entries}
    yval = np.array([label_of_row[r] for r in val_rows])
    test = [e for e in entries if e.split == "test"]
    norm = create_normalizer("l2").fit(np.asarray(feats[tr_rows]))
    Xtr, Xval = norm.transform(np.asarray(feats[tr_rows])), norm.transform(np.asarray(feats[val_rows]))
    Xte, yte = norm.transform(np.asarray(feats[[e.row for e in test]])), np.array([e.label for e in test])
    counts = np.bincount(ytr, minlength=len(store.classes))
    heads = fit_long_tail_heads(Xtr, ytr, Xval, yval, seed=seed)
    out = {"_split": next(iter(heads.values())).split}
    for name, sel in heads.items():
        pred = sel.estimator.predict(Xte)
        per_class = [np.mean(pred[yte == c] == c) for c in range(len(store.classes))]
        out[name] = {
            "top1": round(float(np.mean(pred == yte)), 4),
            "mean_per_class": round(float(np.mean(per_class)), 4),
            **_shots(yte, pred, counts, args.many, args.few),
            "chosen": sel.value,
            "val_balanced_accuracy": round(sel.score, 4),
        }
        assert sel.split == out["_split"], "every method must choose on the same validation split"
    print(f"seed {seed}", {k: v["top1"] for k, v in out.items() if k != "_split"}, flush=True)
    return out


def _summarise(rows: list[dict]) -> dict:
    """Mean ± std (ddof 1) over seeds of each method's top-1, and of its gain over the CE probe in points."""
    methods = [k for k in rows[0] if not k.startswith("_")]
    top1 = {m: np.array([r[m]["top1"] for r in rows]) for m in methods}

    def ms(a):
        return {"mean": round(float(a.mean()), 4), "std": round(float(a.std(ddof=1)) if len(a) > 1 else 0.0, 4)}

    return {
        "top1": {m: ms(top1[m]) for m in methods},
        "gain_over_ce_points": {m: ms(100 * (top1[m] - top1["CE probe"])) for m in methods if m != "CE probe"},
    }


def cifar(args) -> None:
    from finegrain.config import TrainConfig
    from finegrain.data import ImageSet, load_image_set
    from finegrain.data.longtail import make_longtailed
    from finegrain.train.engine import Trainer

    full = load_image_set(require_dataset("cifar10"))
    train = make_longtailed(full.split("train"), imbalance_ratio=args.rho, seed=args.seed, n_max=5000)
    test = full.split("test")
    if args.test_subset:
        test = test[:: max(1, len(test) // args.test_subset)]
    image_set = ImageSet(full.root, full.classes, train + test)
    counts = np.bincount([s.label for s in train], minlength=len(full.classes))
    common = dict(
        data=full.root,
        backbone="resnet32_cifar",
        regime="scratch",
        pretrained=False,
        epochs=args.epochs,
        batch_size=128,
        lr=0.1,
        momentum=0.9,
        nesterov=False,
        weight_decay=2e-4,
        warmup_epochs=5,
        augment="pad-crop-flip",
        label_smoothing=0.0,
        drop_rate=0.0,
        val_fraction=0.0,
        channels_last=False,
        seed=args.seed,
    )
    methods = {
        "CE": {},
        # Cui et al.'s form (reference code, src/cifar_main.py + model_base.py): sigmoid focal, β = 0.9999, γ = 1,
        # the head's bias started at -log(C - 1); "CB focal (softmax form)" in longtail.json is the earlier run.
        "CB focal": {"loss": "cb", "loss_options": {"beta": 0.9999, "base": "sigmoid-focal", "gamma": 1.0}},
        "LDAM-DRW": {"loss": "ldam", "normed_head": True, "loss_options": {"drw_start": 0.8, "s": 30.0}},
    }
    results, t_all = {}, time.perf_counter()

    def scores(y, logits) -> dict:
        pred = logits.argmax(1)
        per_class = [np.mean(pred[y == c] == c) for c in range(len(counts))]
        return {
            "top1": round(float(np.mean(pred == y)), 4),
            "top1_error": round(100 * (1 - float(np.mean(pred == y))), 2),
            "mean_per_class": round(float(np.mean(per_class)), 4),
            **_shots(y, pred, counts, 100, 20, missing=None),
        }

    for name, opts in methods.items():
        if args.only and name not in args.only.split(","):
            continue
        out = os.path.join(ROOT, "bench", "cache", f"cifar10lt-{name.replace(' ', '-')}")
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        trainer = Trainer(TrainConfig(out=out, **common, **opts), progress=False, image_set=image_set)
        t0 = time.perf_counter()
        trainer.fit()
        logits, feats, y = _logits_and_features(trainer, test)
        results[name] = {**scores(y, logits), "train_minutes": round((time.perf_counter() - t0) / 60, 1)}
        print(name, results[name], flush=True)
        if name == "CE":
            prior = counts / counts.sum()
            results["CE + logit adjustment (τ = 1)"] = scores(y, logits - np.log(prior))
            w = trainer.model.head.weight.detach().numpy()
            b = trainer.model.head.bias.detach().numpy()
            norms = np.linalg.norm(w, axis=1)
            results["CE + τ-norm (τ = 1)"] = scores(y, feats @ (w / norms[:, None]).T + b / norms)
            tr_logits, tr_feats, tr_y = _logits_and_features(trainer, train)
            crt = LinearHead(sampler="class-balanced", epochs=30).fit(tr_feats, tr_y)
            results["CE + cRT"] = scores(y, crt.decision_function(feats))
            for k in ("CE + logit adjustment (τ = 1)", "CE + τ-norm (τ = 1)", "CE + cRT"):
                print(k, results[k], flush=True)
        _record_cifar(args, counts, test, results, common, t_all)
    _ = torch


def cifar_crt(args) -> None:
    """Representation quality of each trained CIFAR-10-LT model: cRT (class-balanced re-training of a linear head) on
    its frozen penultimate features. A loss that learns worse features scores lower here whatever its classifier."""
    import finegrain
    from finegrain.data import load_image_set
    from finegrain.data.longtail import make_longtailed
    from finegrain.evaluate.inference import predict_paths

    full = load_image_set(require_dataset("cifar10"))
    train = make_longtailed(full.split("train"), imbalance_ratio=args.rho, seed=args.seed, n_max=5000)
    test = full.split("test")
    key = f"cifar10_lt_rho{args.rho:g}_e{args.epochs}_seed{args.seed}"
    with open(os.path.join(RESULTS, "longtail.json")) as f:
        entry = json.load(f)[key]
    for name in ("CE", "CB focal", "LDAM-DRW"):
        run = os.path.join(ROOT, "bench", "cache", f"cifar10lt-{name.replace(' ', '-')}")
        if not os.path.exists(os.path.join(run, "model")):
            print(f"{name}: no trained model in {run}; skipped", flush=True)
            continue
        predictor = finegrain.load(run)
        tr = predict_paths(predictor, [s.path for s in train], features=True)
        te = predict_paths(predictor, [s.path for s in test], features=True)
        ytr = np.array([s.label for s in train])[tr.index]
        yte = np.array([s.label for s in test])[te.index]
        crt = LinearHead(sampler="class-balanced", epochs=30).fit(tr.features, ytr)
        top1 = float(np.mean(crt.predict(te.features) == yte))
        entry["methods"][f"{name} features + cRT"] = {
            "top1": round(top1, 4),
            "top1_error": round(100 * (1 - top1), 2),
            "mean_per_class": round(top1, 4),
            "note": "cRT on the frozen features of this model (representation quality)",
        }
        print(name, "features + cRT", round(top1, 4), flush=True)
    entry["train_command"] = entry.get("train_command", entry.get("command"))
    record("longtail.json", key, entry)


def _record_cifar(args, counts, test, results, common, t_all) -> None:
    """Record after every method, merged with the methods of earlier runs of the same setting (`--only` runs)."""
    key = f"cifar10_lt_rho{args.rho:g}_e{args.epochs}_seed{args.seed}"
    path = os.path.join(RESULTS, "longtail.json")
    earlier = {}
    if os.path.exists(path):
        with open(path) as f:
            earlier = json.load(f).get(key, {}).get("methods", {})
    from finegrain.data.longtail import describe_counts

    record(
        "longtail.json",
        key,
        {
            "epochs": args.epochs,
            "drw_at_epoch": int(np.ceil(0.8 * args.epochs)),
            "seed": args.seed,
            "counts": describe_counts(counts),
            "test_images": len(test),
            "methods": {**earlier, **results},
            "paper_top1_error_200_epochs": {"CE": 29.64, "LDAM-DRW": 22.97},
            "minutes_this_run": round((time.perf_counter() - t_all) / 60, 1),
            "recipe": common,
        },
    )


@torch.no_grad()
def _logits_and_features(trainer, samples) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits [N, C], pooled features [N, D] and labels [N] of `samples` through the trained model (eval mode)."""
    from finegrain.train.augment import build_eval_transform

    model = trainer.model.eval()
    loader = trainer.steps.loader(samples, build_eval_transform(model.preprocess))
    logits, feats, ys = [], [], []
    for x, y, _, _ in loader:
        if x is None:
            continue
        f = model.pool(model.forward_features(trainer.runtime.to_input(x, model.preprocess)))
        feats.append(f.numpy())
        logits.append(model.head(f).numpy())
        ys.append(y.numpy())
    return np.concatenate(logits), np.concatenate(feats), np.concatenate(ys)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("cub")
    p.add_argument("--rho", type=float, default=10.0)
    p.add_argument("--seeds", type=int, default=5, help="long-tailed subsets (seeds 0..N-1)")
    p.add_argument("--val-per-class", type=int, default=5)
    p.add_argument("--many", type=int, default=20, help="many-shot: more than this many training images")
    p.add_argument("--few", type=int, default=10, help="few-shot: fewer than this many training images")
    p = sub.add_parser("cifar")
    p.add_argument("--rho", type=float, default=100.0)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", help="comma list of methods: CE, CB focal, LDAM-DRW")
    p.add_argument("--test-subset", type=int, default=0, help="evaluate on about this many test images (smoke runs)")
    p = sub.add_parser("cifar-crt", help="cRT on the frozen features of each trained CIFAR-10-LT model")
    p.add_argument("--rho", type=float, default=100.0)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    {"cub": cub, "cifar": cifar, "cifar-crt": cifar_crt}[args.what](args)


if __name__ == "__main__":
    main()
