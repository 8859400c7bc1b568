"""One function per subcommand: config in, library calls, files and a short summary out.

Each returns the exit code: 0 all done, 1 partly done (inputs skipped: the summary says how many and where they are
listed); input errors raise FinegrainError (exit 2). Results go to stdout, skipped inputs and warnings to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from finegrain.config import EvalConfig, ExtractConfig, build_config, config_dict, save_config
from finegrain.errors import FinegrainError
from finegrain.runtime.settings import resolve_device  # noqa: F401 - serve_cmd and suggest_cmd import it here

CLI_DEFAULTS = {"device": "auto"}  # under the YAML file and the command line, over the dataclass defaults
PRECISIONS = ("auto", "fp32", "bf16")
EVAL_CHOICES = {
    "classifier": ("probe", "knn", "ncm"),
    "norm": ("none", "l2", "cl2n", "pca-whiten", "pca-whiten:K"),
    "metric": ("cosine", "l2"),
    "weights": ("temperature", "distance", "uniform"),
    "solver": ("auto", "lbfgs", "stream"),
}


def _overrides(args: argparse.Namespace, cls) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _with_device(cfg):
    return dataclasses.replace(cfg, device=resolve_device(cfg.device))


def _cli_config(cls, args: argparse.Namespace, overrides: dict, choices: dict):
    """A command's config: CLI defaults <- --config YAML <- options, validated, with its device resolved."""
    cfg = build_config(cls, yaml_path=args.config, overrides=overrides, defaults=CLI_DEFAULTS, choices=choices)
    return _with_device(cfg)


def _skipped_summary(skipped: list[tuple[str, str]], n: int | None, listed: str) -> None:
    """The first skipped inputs and their reasons on stderr, then how many and where all of them are listed."""
    for path, reason in skipped[:10]:
        _stderr(f"  skipped {path}: {reason}")
    of = f" of {n}" if n is not None else ""
    _stderr(f"finegrain: {len(skipped)}{of} input(s) skipped, listed in {listed}")


def cmd_extract(args: argparse.Namespace) -> int:
    cfg = _cli_config(ExtractConfig, args, _overrides(args, ExtractConfig), {"precision": PRECISIONS})
    return run_extract(cfg, progress=not args.no_progress, runtime=getattr(args, "runtime", "torch"))


def _is_model_path(name: str) -> bool:
    """A finegrain model folder, a training run folder, or one of a run's weight files (not a timm name)."""
    return os.path.isdir(name) or os.path.isfile(name)


def _trained_backbone(path: str, checkpoint: str | None):
    """`--backbone RUN`: the trunk of a saved finegrain model (fine-tuned weights, its preprocessing). The store
    records it as a checkpoint source, so search and the probes rebuild the same trunk."""
    from finegrain.models import find_model_folder, load_model

    if checkpoint is not None:
        raise FinegrainError("--backbone RUN already names the weights: drop --checkpoint")
    folder, weights = find_model_folder(path)
    model, _ = load_model(path)
    backbone = model.backbone
    backbone.source = "checkpoint:" + os.path.abspath(weights or os.path.join(folder, "model.safetensors"))
    return backbone


def run_extract(cfg: ExtractConfig, *, progress: bool = True, runtime: str = "torch") -> int:
    from finegrain.backbones import create_backbone
    from finegrain.data import load_image_set
    from finegrain.embed import extract_to_store

    image_set = load_image_set(cfg.data)
    if _is_model_path(cfg.backbone):
        backbone = _trained_backbone(cfg.backbone, cfg.checkpoint)
    else:
        backbone = create_backbone(cfg.backbone, checkpoint=cfg.checkpoint)
    backbone.preprocess = backbone.preprocess.with_geometry(cfg.image_size, cfg.crop_pct)
    dist = _torchrun_context(cfg.device)  # torchrun: each rank extracts its shard, rank 0 merges (embed/shard.py)
    if dist is not None:
        from functools import partial

        from finegrain.embed.shard import extract_sharded

        extract_to_store = partial(extract_sharded, dist=dist)  # noqa: F811
        progress = progress and dist.is_main
    result = extract_to_store(
        image_set,
        backbone,
        cfg.out,
        poolings=cfg.pooling,
        flip=cfg.flip,
        batch_size=cfg.batch_size,
        num_workers=cfg.workers,
        precision=cfg.precision,
        channels_last=cfg.channels_last,
        device=cfg.device if dist is None else str(dist.device),  # torchrun on GPUs: cuda:LOCAL_RANK
        overwrite=cfg.overwrite,
        progress=progress,
        runtime=runtime,
    )
    if dist is not None:
        dist.close()  # an orderly gloo / nccl shutdown: exiting with the group alive can abort a rank
        if not dist.is_main:
            return 1 if result.skipped else 0  # rank 0 reports and writes
    resolved = {"precision": result.store.meta["precision"], "runtime": result.store.meta.get("runtime", "torch")}
    save_config(cfg, cfg.out, extra={"resolved": {**resolved, "backbone": backbone.describe()}})
    listed = os.path.join(cfg.out, "skipped.csv")
    if result.skipped and result.n_extracted + result.n_reused == 0:
        raise FinegrainError(f"none of the {result.n_images} images of {cfg.data} could be read (listed in {listed})")
    print(
        f"{result.n_images} images, {len(image_set.classes)} classes, splits {image_set.splits}: "
        f"{result.n_extracted} extracted ({result.images_per_second:.1f} img/s), {result.n_reused} reused, "
        f"{len(result.skipped)} skipped -> {cfg.out}"
    )
    if result.skipped:
        _skipped_summary(result.skipped, result.n_images, listed)
    return 1 if result.skipped else 0


def _torchrun_context(device: str):
    """The DistContext of a torchrun job (gloo on CPU, nccl on CUDA), None for a plain process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from finegrain.train.distributed import DistContext

    return DistContext.from_env(device)


def _eval_cfg(args: argparse.Namespace, classifier: str) -> EvalConfig:
    over = _overrides(args, EvalConfig)
    over["classifier"] = classifier
    return build_config(EvalConfig, yaml_path=args.config, overrides=over, choices=EVAL_CHOICES)


def run_eval(cfg: EvalConfig) -> dict:
    """Fit the configured classifier on the store's train split, score the test split, write the outputs."""
    from finegrain.embed import FeatureStore
    from finegrain.evaluate.representations import (
        fit_and_score,
        fitted_state,
        train_test_from_store,
        write_outputs,
    )
    from finegrain.heads import create_classifier
    from finegrain.heads.to_model import save_store_model

    store = FeatureStore.open(cfg.store)
    pooling = cfg.pooling or store.poolings[0]
    train, test, test_name = train_test_from_store(
        store,
        pooling=pooling,
        train_split=cfg.train_split,
        test_split=cfg.test_split,
        test_size=cfg.test_size,
        seed=cfg.seed,
    )
    if len(set(train.y.tolist())) < 2:
        raise FinegrainError(
            f"{cfg.store}: the {cfg.train_split} split holds one class ({store.classes[int(train.y[0])]!r}); "
            "a classifier needs at least 2 classes"
        )
    if cfg.classifier == "knn":
        clf = create_classifier(
            "knn", n_neighbors=cfg.k, metric=cfg.metric, weights=cfg.weights, temperature=cfg.temperature
        )
    elif cfg.classifier == "ncm":
        clf = create_classifier("ncm", metric=cfg.metric)
    else:
        clf = create_classifier(cfg.classifier, random_state=cfg.seed)
    metrics, scores, norm = fit_and_score(clf, train, test, normalizer=cfg.norm, classes=store.classes)
    name = f"{cfg.classifier}{cfg.k if cfg.classifier == 'knn' else ''}-{cfg.norm}-{pooling}"
    out = cfg.out or os.path.join(cfg.store, "eval", name.replace(":", "_"))
    extra = {k: getattr(clf, k) for k in ("C_",) if hasattr(clf, k)}
    metrics = {**metrics, "classifier": name, "test_split": test_name, "n_train": len(train.y), **extra}
    model_dir = save_store_model(
        store, clf, norm, os.path.join(out, "model"), pooling=pooling, train_X=train.X, train_y=train.y,
        extra={"normalizer_name": cfg.norm, "metrics": {k: metrics[k] for k in ("top1", "mean_per_class")}},
    )  # fmt: skip
    write_outputs(
        out,
        metrics=metrics,
        config={**config_dict(cfg), "pooling": pooling, "out": out, "backbone": store.meta["backbone"]},
        test=test,
        scores=scores,
        classes=store.classes,
        state=fitted_state(norm, clf),
    )
    print(
        f"{name}: top-1 {metrics['top1']:.4f}  top-5 {metrics['top5']:.4f}  "
        f"mean per-class {metrics['mean_per_class']:.4f}  (train {len(train.y)}, test {len(test.y)}) -> {out}; "
        f"model: {model_dir}"
    )
    return metrics


def _probe_solver(cfg: EvalConfig) -> str:
    from finegrain.embed import FeatureStore
    from finegrain.heads.stream_probe import choose_solver

    store = FeatureStore.open(cfg.store)
    n_train = sum(e.split == cfg.train_split for e in store.index()) or len(store.index())
    return choose_solver(cfg.solver, n_train, store.dim_of(cfg.pooling))


def _run_stream_probe(cfg: EvalConfig) -> dict:
    """The streaming probe (heads/stream_probe.py) on features left on disk; DDP across ranks under torchrun."""
    import numpy as np

    from finegrain.embed import FeatureStore, create_normalizer
    from finegrain.evaluate.metrics import classification_metrics
    from finegrain.evaluate.representations import SplitData, fitted_state, scores_matrix, write_outputs
    from finegrain.heads.stream_probe import StreamingProbe, lazy_splits
    from finegrain.heads.to_model import save_store_model

    if cfg.norm not in ("none", "l2"):
        raise FinegrainError(f"--solver stream takes --norm l2 or none (row-wise), not {cfg.norm!r}")
    dist = _torchrun_context("cpu")
    store = FeatureStore.open(cfg.store)
    pooling = cfg.pooling or store.poolings[0]
    train, test, test_name = lazy_splits(store, pooling, train_split=cfg.train_split, test_split=cfg.test_split,
                                         test_size=cfg.test_size, seed=cfg.seed)  # fmt: skip
    clf = StreamingProbe(normalize="l2" if cfg.norm == "l2" else None, random_state=cfg.seed).fit(*train[:2])
    if dist is not None:
        dist.close()
        if not dist.is_main:
            return {}
    test_data = SplitData(test[0], test[1], test[2])
    scores = scores_matrix(clf, test[0], len(store.classes))
    # row-wise: nothing learned
    norm = create_normalizer(cfg.norm).fit(np.zeros((1, store.dim_of(pooling)), np.float32))
    name = f"probe-stream-{cfg.norm}-{pooling}"
    out = cfg.out or os.path.join(cfg.store, "eval", name)
    metrics = {**classification_metrics(scores, test[1]), "classifier": name, "test_split": test_name,
               "n_train": len(train[1]), "C_": clf.C_, "solver": "stream"}  # fmt: skip
    model_dir = save_store_model(store, clf, norm, os.path.join(out, "model"), pooling=pooling, train_X=None,
                                 train_y=train[1], extra={"normalizer_name": cfg.norm})  # fmt: skip
    write_outputs(out, metrics=metrics, test=test_data, scores=scores, classes=store.classes,
                  config={**config_dict(cfg), "pooling": pooling, "out": out, "backbone": store.meta["backbone"]},
                  state=fitted_state(norm, clf))  # fmt: skip
    print(f"{name}: top-1 {metrics['top1']:.4f}  top-5 {metrics['top5']:.4f}  (train {len(train[1])}, "
          f"test {len(test[1])}, C {clf.C_}) -> {out}; model: {model_dir}")  # fmt: skip
    return metrics


def cmd_knn(args: argparse.Namespace) -> int:
    cfg = _eval_cfg(args, "knn")
    (run_eval if _probe_solver(cfg) == "lbfgs" else _run_disk_knn)(cfg)  # lbfgs: the training split fits in RAM
    return 0


def _run_disk_knn(cfg: EvalConfig) -> dict:
    """k-NN on a store larger than memory: IVF-PQ over the training rows' memory map, re-ranked exactly from it.
    Writes metrics and predictions; no model folder (a k-NN model would copy the whole gallery)."""
    import numpy as np

    from finegrain.embed import FeatureStore
    from finegrain.evaluate.metrics import classification_metrics
    from finegrain.evaluate.representations import SplitData, write_outputs
    from finegrain.heads import create_classifier
    from finegrain.heads.index import FaissIndex
    from finegrain.heads.stream_probe import lazy_splits

    if cfg.norm not in ("none", "l2"):
        raise FinegrainError(f"a store larger than memory takes --norm l2 or none (row-wise), not {cfg.norm!r}")
    store = FeatureStore.open(cfg.store)
    pooling = cfg.pooling or store.poolings[0]
    (Xtr, ytr, _), (Xte, yte, pte), test_name = lazy_splits(store, pooling, train_split=cfg.train_split,
        test_split=cfg.test_split, test_size=cfg.test_size, seed=cfg.seed)  # fmt: skip
    clf = create_classifier("knn", n_neighbors=cfg.k, metric=cfg.metric, weights=cfg.weights,
                            temperature=cfg.temperature)  # fmt: skip
    clf.classes_, clf.gallery_labels_ = np.unique(ytr, return_inverse=True)
    clf.index_, clf.n_features_in_ = FaissIndex(cfg.metric, kind="ivfpq").add(Xtr), store.dim_of(pooling)
    scores = np.zeros((len(yte), len(store.classes)))
    for start in range(0, len(yte), 4096):
        scores[start : start + 4096, clf.classes_] = clf.predict_proba(Xte[start : start + 4096])
    name = f"knn{cfg.k}-ivfpq-{cfg.norm}-{pooling}"
    out = cfg.out or os.path.join(cfg.store, "eval", name)
    metrics = {**classification_metrics(scores, yte), "classifier": name, "test_split": test_name, "n_train": len(ytr)}
    write_outputs(out, metrics=metrics, test=SplitData(None, yte, pte), scores=scores, classes=store.classes,
                  config={**config_dict(cfg), "pooling": pooling, "out": out}, state={})  # fmt: skip
    print(f"{name}: top-1 {metrics['top1']:.4f} (train {len(ytr)}, test {len(yte)}, IVF-PQ) -> {out}")
    return metrics


def cmd_ncm(args: argparse.Namespace) -> int:
    run_eval(_eval_cfg(args, "ncm"))
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    cfg = _eval_cfg(args, "probe")
    (_run_stream_probe if _probe_solver(cfg) == "stream" else run_eval)(cfg)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from finegrain.heads.search import search_store

    if args.store and args.index and args.store != args.index:
        raise FinegrainError(f"two stores given ({args.store} and --index {args.index}): give one")
    store = args.store or args.index
    if not store:
        raise FinegrainError("give the store: finegrain search STORE --query IMAGE")
    results = search_store(store, args.query, k=args.k, pooling=args.pooling, norm=args.norm)
    if args.json:
        queries = [
            {
                "query": q,
                "hits": [{"rank": r, "score": s, "path": p, "label": lab} for r, (s, p, lab) in enumerate(h, 1)],
            }
            for q, h in results.items()
        ]
        _print_json({"store": store, "queries": queries})
        return 0
    for query, hits in results.items():
        print(query)
        for rank, (score, path, label) in enumerate(hits, 1):
            print(f"  {rank:2d}  {score:.4f}  {label}  {path}")
    return 0


def _train_choices() -> dict[str, tuple[str, ...]]:
    """The names each TrainConfig choice accepts, from the registries (`name:K`: a name that takes an argument)."""
    from finegrain.losses import LOSSES
    from finegrain.models.pooling import POOLINGS
    from finegrain.train.augment import AUGMENTATIONS
    from finegrain.train.optim import OPTIMIZERS
    from finegrain.train.regimes import REGIME_KINDS
    from finegrain.train.samplers import SAMPLERS
    from finegrain.train.schedule import SCHEDULE_KINDS

    return {
        "regime": ("auto", *("last:K" if k == "last" else k for k in REGIME_KINDS)),
        "loss": tuple(LOSSES.names()),
        "sampler": tuple(SAMPLERS.names()),
        "pooling": (*(n for n in POOLINGS.names() if not getattr(POOLINGS.get(n), "frozen_only", False)), "gem:P"),
        "optimizer": tuple(OPTIMIZERS.names()),
        "augment": tuple(AUGMENTATIONS.names()),
        "schedule": tuple(SCHEDULE_KINDS),
        "precision": ("fp32", "bf16", "amp"),
        "head_init": ("msra", "probe"),
    }


def train_config(args: argparse.Namespace):
    """TrainConfig from defaults <- --config YAML <- key=value words <- --name VALUE options (all YAML-parsed)."""
    from finegrain.config import TrainConfig, parse_overrides

    options = _overrides(args, TrainConfig)
    for k, v in options.items():  # --loss-options "{beta: 0.99}", --crop-scale "[0.2, 1]": read as YAML, as name=value
        if isinstance(v, str) and v.strip()[:1] in ("[", "{"):
            options[k] = parse_overrides([f"{k}={v}"])[k]
    over = {**parse_overrides(args.overrides), **options}
    return _cli_config(TrainConfig, args, over, _train_choices())


def _check_two_classes(data: str) -> None:
    from finegrain.data import load_image_set

    image_set = load_image_set(data)
    if len(image_set.classes) < 2:
        raise FinegrainError(
            f"{data} holds one class ({', '.join(image_set.classes) or 'none'}): training needs at least 2 classes, "
            "one folder per class"
        )


def cmd_train(args: argparse.Namespace) -> int:
    from finegrain.train.engine import train

    cfg = train_config(args)
    _check_two_classes(cfg.data)
    if getattr(args, "unlabeled", None):
        result = _train_distilled(cfg, args)
    else:
        result = train(cfg, progress=not args.no_progress)
    line = f"best epoch {result.best_epoch}: val top-1 {result.best_val_top1:.4f}"
    if result.test_metrics:
        t = result.test_metrics
        line += f"; test top-1 {t['top1']:.4f}, mean per-class {t['mean_per_class']:.4f}"
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"{line} -> {cfg.out}")
    if result.skipped:
        _skipped_summary(result.skipped, None, os.path.join(cfg.out, "metrics.json"))
    return 1 if result.skipped else 0


def _train_distilled(cfg, args: argparse.Namespace):
    """train --unlabeled DIR: the folder checked (one-line errors), then the distilled student (semi/distill.py)."""
    from finegrain.data import load_image_set
    from finegrain.recipe.unlabeled import unlabeled_paths
    from finegrain.semi.distill import train_distilled

    paths = unlabeled_paths(args.unlabeled, load_image_set(cfg.data))
    return train_distilled(cfg, paths, temperature=args.distill_temperature, weight=args.distill_weight,
                           progress=not args.no_progress)  # fmt: skip


def cmd_fit(args: argparse.Namespace) -> int:
    from finegrain.recipe import FitConfig, fit

    choices = {"precision": PRECISIONS, "runtime": ("auto", "torch", "onnx")}
    cfg = _cli_config(FitConfig, args, _overrides(args, FitConfig), choices)
    result = fit(cfg, progress=not args.no_progress)
    est = result.chosen.estimate
    line = f"chose {result.chosen.name}: {'validation' if est == 'val' else est} top-1 {result.chosen.score_top1:.4f}"
    if result.test:
        m = result.test["metrics"]
        how = "TRANSDUCTIVE: test images used unlabeled" if cfg.transductive else "scored once, at the end"
        line += f"; test top-1 {m['top1']:.4f}, mean per-class {m['mean_per_class']:.4f} ({how})"
    print(f"{line}; {result.seconds / 60:.1f} min -> {os.path.join(cfg.out, 'model')}")
    print(f"  predict with: finegrain predict {os.path.join(cfg.out, 'model')} IMAGE...")
    return 0


def _print_json(doc: dict) -> None:
    """--json: one document on stdout (NaN written as null, numpy scalars as numbers)."""
    import json
    import math

    def clean(v):
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        if hasattr(v, "item") and not isinstance(v, str):
            v = v.item() if getattr(v, "ndim", 0) == 0 else v.tolist()
        return None if isinstance(v, float) and not math.isfinite(v) else v

    print(json.dumps(clean(doc), indent=1), flush=True)


def _unreadable(path: str) -> str | None:
    """Why `path` cannot be an image file (None: it may be one; decoding decides)."""
    if os.path.isdir(path):
        return "is a directory, not an image file"
    if not os.path.exists(path):
        return "no such file"
    return None


def cmd_predict(args: argparse.Namespace) -> int:
    from finegrain.data import ImageDecodeError
    from finegrain.evaluate.predictor import load

    if args.k < 1:
        raise FinegrainError(f"k must be an integer >= 1, got {args.k}")
    predictor = load(args.model, device=resolve_device(args.device), runtime=args.runtime)
    skipped, predictions = [], []
    for path in args.images:
        reason = _unreadable(path)
        try:
            top = predictor.predict([path], k=args.k)[0] if reason is None else None
        except ImageDecodeError as e:
            reason = str(e)
        if reason is not None:
            skipped.append((path, reason))
            continue
        predictions.append({"path": path, "top": [{"class": name, "probability": p} for name, p in top]})
        if not args.json:
            print(path + "\t" + "  ".join(f"{name} {p:.3f}" for name, p in top), flush=True)
    if args.json:
        _print_json(
            {"model": args.model, "predictions": predictions, "skipped": [{"path": p, "reason": r} for p, r in skipped]}
        )
    if len(skipped) == len(args.images):
        reasons = "; ".join(f"{p}: {r}" for p, r in skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
        raise FinegrainError(f"nothing predicted, all {len(skipped)} input(s) skipped: {reasons}")
    if skipped:
        _skipped_summary(skipped, len(args.images), "the lines above")
    say_engines(predictor)
    return 1 if skipped else 0


def say_engines(predictor) -> None:
    """On stderr, last: which engine ran each model and why (--runtime auto measures it)."""
    for member in getattr(predictor, "members", [predictor]):
        for note in getattr(member, "engine_notes", []):
            _stderr(f"finegrain: engine at {note}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from finegrain.evaluate.evaluation import EvaluateConfig, evaluate_models
    from finegrain.evaluate.tta import TTA

    tta = TTA.parse(args.tta, args.sizes)
    first = args.model[0].rstrip("/")
    out = args.out or os.path.join(first, f"eval-{args.split}-{tta.describe().replace(' @ ', '@').replace(',', '-')}")
    values = dict(models=tuple(args.model), data=args.data, out=out, split=args.split, tta=args.tta, sizes=tta.sizes)
    for name in ("batch_size", "workers", "precision", "bootstrap", "many", "few", "allow_train_images"):
        values[name] = getattr(args, name)
    values["device"] = resolve_device(args.device)
    values["runtime"] = getattr(args, "runtime", "torch")
    cfg = build_config(EvaluateConfig, overrides=values, choices={"precision": PRECISIONS})
    if args.sweep:
        return _evaluate_sweep(args, cfg)
    s = evaluate_models(cfg, progress=not args.no_progress)
    m, ci = s["metrics"], s["intervals"]
    if args.json:
        _say_scored(s["scored_images"])
        _print_json({**s, "out": out})
        return 1 if s["skipped"] else 0

    def fmt(k):
        lo_hi = ci.get(k)
        return f"{m[k]:.4f}" + (f" [{lo_hi[0]:.4f}, {lo_hi[1]:.4f}]" if lo_hi else "")

    _say_scored(s["scored_images"])
    print(f"{s['n']} images, {s['tta']['spec']} ({s['tta']['views']} views), {len(cfg.models)} model(s)")
    for k in ("top1", "top5", "mean_per_class", "ece", "many_shot", "medium_shot", "few_shot"):
        if m.get(k) is not None:
            print(f"  {k:15s} {fmt(k)}")
    for pair in s["most_confused"][:3]:
        print(f"  confused: {pair['true']} -> {pair['predicted']} ({pair['count']}x)")
    print(f"-> {out}")
    if s["skipped"]:
        skipped = [(item["path"], item["reason"]) for item in s["skipped"]]
        _skipped_summary(skipped, s["n"] + len(skipped), os.path.join(out, "metrics.json"))
    for note in s.get("engines", []):
        _stderr(f"finegrain: engine at {note}")
    return 1 if s["skipped"] else 0


def _say_scored(scored: dict) -> None:
    """On stderr: which images the split contract kept, or that training images were scored on request."""
    if scored.get("selection"):
        _stderr(f"finegrain: scoring {scored['selection']} (the others trained or validated the model)")
    if scored.get("includes_training_images"):
        _stderr(f"warning: {scored['training_images_scored']} scored image(s) trained or validated the model")


def _evaluate_sweep(args: argparse.Namespace, cfg) -> int:
    """The test-resolution sweep: one evaluation per size (each in OUT/<size>/), a table, and sweep.json."""
    import dataclasses

    from finegrain.atomic import atomic_write_json
    from finegrain.evaluate.evaluation import evaluate_models
    from finegrain.evaluate.tta import TTA

    sizes = TTA.parse("none", args.sweep).sizes
    if cfg.sizes:
        raise FinegrainError("use --sweep or --sizes, not both")
    rows = {}
    say = (lambda line: None) if args.json else print
    say("size  top-1   [95% interval]      mean per-class")
    for size in sizes:
        sub = dataclasses.replace(cfg, sizes=(size,), out=os.path.join(cfg.out, str(size)))
        s = evaluate_models(sub, progress=not args.no_progress)
        m, ci = s["metrics"], s["intervals"].get("top1") or [float("nan")] * 2
        rows[str(size)] = {"top1": m["top1"], "top1_ci95": ci, "mean_per_class": m["mean_per_class"]}
        say(f"{size:4d}  {m['top1']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]  {m['mean_per_class']:.4f}")
    atomic_write_json(os.path.join(cfg.out, "sweep.json"), {"tta": cfg.tta, "sizes": rows})
    if args.json:
        _print_json({"tta": cfg.tta, "sizes": rows, "out": cfg.out})
    say(f"-> {cfg.out}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from finegrain.atomic import atomic_write, atomic_write_json
    from finegrain.data import ImageDecodeError
    from finegrain.evaluate.predictor import load
    from finegrain.explain import explain_images, overlay

    predictor = load(args.model, device=resolve_device(args.device))
    os.makedirs(args.out, exist_ok=True)
    records, seen, skipped = [], set(), []
    for path in args.images:
        reason = _unreadable(path)
        try:
            if reason is None:
                (e,) = explain_images(
                    predictor,
                    [path],
                    method=args.method,
                    target=args.target,
                    layer=args.layer,
                    threshold=args.threshold,
                )
        except ImageDecodeError as err:
            reason = str(err)
        if reason is not None:
            skipped.append((path, reason))
            records.append({"path": path, "skipped": reason})
            continue
        stem = os.path.splitext(os.path.basename(path))[0]
        name, i = f"{stem}-{e.method}.png", 1
        while name in seen:
            name, i = f"{stem}-{i}-{e.method}.png", i + 1
        seen.add(name)
        img = overlay(e.view, e.heatmap, e.box)
        atomic_write(os.path.join(args.out, name), lambda f, img=img: img.save(f, format="PNG"))
        records.append({**e.to_dict(), "overlay": name})
        print(f"{path}\t{e.target_name} {e.probability:.3f}\tbox {e.box_original}\t-> {name}")
    atomic_write_json(os.path.join(args.out, "explanations.json"), records)
    listed = os.path.join(args.out, "explanations.json")
    if len(skipped) == len(args.images):
        raise FinegrainError(f"nothing explained, all {len(skipped)} input(s) skipped (listed in {listed})")
    if skipped:
        _skipped_summary(skipped, len(args.images), listed)
    return 1 if skipped else 0


def _fixres_samples(model: str, data: str, split: str, classes: list[str]):
    """The images fixres may fit on: the split asked for; in a flat folder, the run's recorded train (or val)
    images, never its recorded test holdout."""
    import numpy as np

    from finegrain.config import load_splits
    from finegrain.data import load_image_set
    from finegrain.evaluate.evaluation import samples_for_model

    if load_image_set(data).splits != ["all"]:
        return samples_for_model(data, split, classes)[:2]
    record = load_splits(model)
    if record is None or not record[1].get(split):
        raise FinegrainError(
            f"{data} is a flat folder and {model} records no {split} split: fixres would fit on images the test "
            "score may use; give a folder with train/ and test/ or the run trained on this folder"
        )
    allowed = {os.path.abspath(p) for p in record[1][split]}
    paths, labels, _ = samples_for_model(data, "all", classes)
    keep = [i for i, p in enumerate(paths) if os.path.abspath(p) in allowed]
    return [paths[i] for i in keep], np.asarray(labels)[keep]


def cmd_fixres(args: argparse.Namespace) -> int:
    from finegrain.evaluate.fixres import fix_resolution, save_predictor
    from finegrain.evaluate.predictor import load

    if args.split in ("test", "all"):
        raise FinegrainError(
            f"fixres fits BatchNorm statistics and the head on --split {args.split}, whose images must stay unseen "
            "for an honest test score: use --split train (the default) or val"
        )
    predictor = load(args.model, device=resolve_device(args.device))
    paths, labels = _fixres_samples(args.model, args.data, args.split, predictor.classes)
    fixed = fix_resolution(
        predictor,
        paths,
        labels,
        args.size,
        head_epochs=args.head_epochs,
        head_lr=args.head_lr,
        bn_layers=args.bn_layers,
        max_images=args.max_images,
        seed=args.seed,
    )
    save_predictor(fixed, args.out)
    info = fixed.meta["fixres"]
    print(
        f"adapted to {args.size}px: BatchNorm statistics from {info['bn_images']} images, "
        f"head fine-tuned {info['head_epochs']} epochs -> {args.out}"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from finegrain.report.run_report import build_run_report

    path = build_run_report(
        args.run,
        data=args.data,
        out=args.out,
        split=args.split,
        tta=args.tta,
        gallery=args.gallery,
        progress=not args.no_progress,
        allow_train_images=args.allow_train_images,
    )
    print(f"report -> {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """`fit` on the bundled sample (2 minutes), then the chosen model predicts three of its test images."""
    from finegrain.evaluate.predictor import load
    from finegrain.recipe import FitConfig, fit

    data = args.data or _default_demo_data()
    out = os.path.join(args.out, "fit")
    result = fit(FitConfig(data=data, out=out, budget_min=2.0, workers=0), progress=not args.no_progress)
    model = load(os.path.join(out, "model"))
    test_dir = os.path.join(data, "test")
    examples = sorted(os.path.join(d, f) for d, _, files in os.walk(test_dir) for f in files if f.endswith(".jpg"))
    for path, top in zip(examples[::15][:3], model.predict(examples[::15][:3], k=2)):
        print(f"  {os.path.relpath(path, data)} -> " + ", ".join(f"{name} {p:.3f}" for name, p in top))
    m = result.test["metrics"] if result.test else None
    score = f"test top-1 {m['top1']:.3f}, mean per-class {m['mean_per_class']:.3f}" if m else "no test split"
    print(f"demo: fit chose {result.chosen.name}: {score}; model in {os.path.join(out, 'model')}")
    return 0


def _default_demo_data() -> str:
    """The bundled sample: package data of finegrain, so a wheel install has it too."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(here, "_demo", "birds10")
    if os.path.isdir(path):
        return path
    raise FinegrainError("demo data not found in the installed package: pass --data FOLDER")


def cmd_backbones(args: argparse.Namespace) -> int:
    from finegrain.backbones import list_backbones

    for name in list_backbones():
        print(name)
    print("(any timm model name or hf-hub:org/name works too where a network exists)")
    return 0
